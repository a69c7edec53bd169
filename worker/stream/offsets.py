"""The offset guard: an offset that does not belong to its log is reset, logged and counted.

A broker that restarts with an empty store (Tansu's memory storage, a cluster rebuilt) or a
topic deleted and created again leaves the group's offsets pointing past the new logs' ends.
Kafka answers such a fetch with ``OFFSET_OUT_OF_RANGE`` and aiokafka moves its position by
itself, in silence; Tansu answers with no records at all. Either way faust keeps its own idea
of the partition (the last offset it read, the last it committed), drops every record below it,
and would commit the old log's offsets into the new one on the way out: acknowledged utterances
skipped without a word.

Every second (:data:`CHECK_INTERVAL_S`) the guard compares, for each partition this worker
holds, the end of the log (the high watermark of the latest fetch response) with the furthest
of the consumer's position and faust's read and committed offsets, and the position with
faust's committed offset. Past the end, or a position moved back below what faust committed
(aiokafka's own silent reset), means the log was replaced: the partition is reset per ``INTENT_OFFSET_RESET_POLICY`` (``earliest``: read
what the new log holds; ``latest``: skip to its end), the reset is logged (``offset_reset``)
and counted (``intent_worker_offset_resets_total``), and the new offset is committed.

An offset of a replaced log can also lie *inside* the new log: a worker of a broker that came
back empty commits its old offsets into the new log (faust still counts them as its own), and
once the new log has grown past them nothing is past any end. So every commit names its log: the
log's topic id (a new one for every topic created, Kafka's and Tansu's alike) is stamped in the
commit's metadata and, for brokers that drop commit metadata (Tansu 0.6), committed as the
partition's offset in a group of its own (:func:`stamp_group`). A partition is committed only
while the topic id of the log faust's offsets come from is the topic's id at the broker now
(checked at each commit: the fence), and only after the guard has judged the commit it found on
assignment (:func:`judge_commit`): one stamped with another id is *foreign* and reset like a
replaced log (``reason="foreign_log"``), as is a partition whose topic id changed while held
(``reason="topic_replaced"``). A commit with no stamp (a worker before this, a broker without
topic ids) is trusted, as before.

The guard also keeps the numbers ``intent_worker_consumer_lag`` reports, and the time of the
broker's last answer, which ``/health`` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import faust
import structlog
from aiokafka.errors import KafkaError
from faust.types import TP

from worker.stream.faust_adapter import (
    CONSUMER_NOT_READY,
    NO_TOPIC_ID,
    GroupCommit,
    Stamp,
    commit_offsets,
    consumer_group,
    faust_offsets,
    fence_commits,
    group_commits,
    last_fetch_ms,
    log_end,
    reset_partition,
    topic_ids,
)
from worker.stream.metrics import PartitionLag, WorkerMetrics

log = structlog.get_logger(__name__)

CHECK_INTERVAL_S = 1.0


class OffsetResetPolicy(StrEnum):
    """Where a partition whose committed offset is past its log's end resumes."""

    EARLIEST = "earliest"  # the beginning of what the log holds now: nothing it holds is skipped
    LATEST = "latest"  # its end: only what arrives from now on


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    """What the consumer knows of one partition; offsets are "next to read"."""

    log_end: int | None  # high watermark of the last fetch response; None before the first
    position: int | None
    read: int | None  # faust: the last offset it delivered (records below are dropped)
    committed: int | None  # faust: the last offset it committed (acks below are ignored)

    def past_the_end(self) -> bool:
        """Whether the log was replaced under the consumer: it stands beyond the log's end, or the
        client moved its position back below what faust committed (aiokafka's own reset, after an
        out-of-range fetch or a group the broker no longer knows)."""
        if self.position is not None and self.committed is not None and self.position < self.committed:
            return True  # faust would drop every record below its read offset, in silence
        if self.log_end is None:
            return False
        known = [o for o in (self.position, self.committed) if o is not None]
        if self.read is not None:
            # faust's read offset is the last offset it delivered, except right after a seek, where
            # it is the offset seeked to (the commit) and equals the position: a worker restarted
            # on a log it had read to the end is not past the end.
            known.append(self.read if self.read == self.position else self.read + 1)
        return bool(known) and max(known) > self.log_end


def reset_target(policy: OffsetResetPolicy, *, log_start: int, log_end: int) -> int:
    """The offset a replaced partition resumes at."""
    return log_start if policy is OffsetResetPolicy.EARLIEST else log_end


class ResetReason(StrEnum):
    """Why the guard reset a partition (the ``reason`` of ``offset_reset`` and of the counter)."""

    PAST_THE_END = "past_the_end_or_position_moved_back"
    LOG_END_WENT_BACK = "log_end_went_back"
    FOREIGN_LOG = "foreign_log"  # the commit found on assignment is stamped with another log's id
    TOPIC_REPLACED = "topic_replaced"  # the topic's id changed while this worker held the partition


# -- stamps: which log a commit belongs to ------------------------------------------------------

#: The stamp group of consumer group ``g`` is ``g`` + this.
STAMP_GROUP_SUFFIX = ".topic-ids"
_METADATA_PREFIX = "topic_id="


def stamp_group(group: str) -> str:
    """The group in which ``group``'s stamps are committed, one "offset" per partition."""
    return f"{group}{STAMP_GROUP_SUFFIX}"


def stamp_number(topic_id: uuid.UUID) -> int:
    """A topic id as a committable offset: 62 bits of its hash (never negative: -1 is "none")."""
    return int.from_bytes(hashlib.blake2b(topic_id.bytes, digest_size=8).digest(), "big") >> 2


def stamp_of(topic_id: uuid.UUID) -> Stamp:
    """What a commit of a partition of the topic with ``topic_id`` carries."""
    if topic_id == NO_TOPIC_ID:
        return Stamp("", None)
    return Stamp(f"{_METADATA_PREFIX}{topic_id}", stamp_number(topic_id))


@dataclass(frozen=True, slots=True)
class FoundCommit:
    """A group's commit of one partition as the broker answers it, with the stamp beside it."""

    offset: int | None
    metadata: str = ""
    stamped: int | None = None  # the partition's offset in the stamp group

    def stamp(self) -> int | None:
        """The stamp, from the metadata where the broker kept it, else from the stamp group."""
        if self.metadata.startswith(_METADATA_PREFIX):
            try:
                return stamp_number(uuid.UUID(self.metadata.removeprefix(_METADATA_PREFIX)))
            except ValueError:
                pass  # not ours after all
        return self.stamped


class CommitVerdict(StrEnum):
    NONE = "none"  # nothing committed: the consumer starts per its own reset policy
    UNSTAMPED = "unstamped"  # no stamp (a worker before stamps) or no topic id to compare: trusted
    OWN = "own"  # stamped with the topic id the broker has now
    FOREIGN = "foreign"  # stamped with another topic id: an offset of a replaced log


def judge_commit(commit: FoundCommit, topic_id: uuid.UUID) -> CommitVerdict:
    """Whether ``commit`` belongs to the log of the topic whose id is ``topic_id`` now."""
    if commit.offset is None:
        return CommitVerdict.NONE
    stamp = commit.stamp()
    if stamp is None or topic_id == NO_TOPIC_ID:
        return CommitVerdict.UNSTAMPED
    return CommitVerdict.OWN if stamp == stamp_number(topic_id) else CommitVerdict.FOREIGN


class LogIdentities:
    """Per partition held, the topic id of the log faust's offsets of it come from, once its commit
    has been judged (by the guard, or by the commit fence at the first commit, whichever comes
    first). The fence (``faust_adapter.fence_commits``) calls it from the consumer's thread, and
    lets a partition be committed only while that id is the topic's id at the broker."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.stamp_group = stamp_group(group)
        self._ids: dict[TP, uuid.UUID] = {}
        self._committed: dict[TP, int] = {}  # what went through the fence, per partition

    def last_committed(self, tp: TP) -> int | None:
        return self._committed.get(tp)

    def committed(self, offsets: Mapping[TP, int]) -> None:
        self._committed.update(offsets)

    def get(self, tp: TP) -> uuid.UUID | None:
        return self._ids.get(tp)

    def vouch(self, tp: TP, topic_id: uuid.UUID) -> None:
        self._ids[tp] = topic_id

    def forget(self, tp: TP) -> None:
        self._ids.pop(tp, None)
        self._committed.pop(tp, None)

    def held(self) -> set[TP]:
        return set(self._ids)

    def unjudged(self, tps: Iterable[TP]) -> list[TP]:
        return [tp for tp in tps if tp not in self._ids]

    def judge(
        self, tp: TP, commit: GroupCommit | None, stamp: GroupCommit | None, topic_id: uuid.UUID
    ) -> CommitVerdict:
        """Judge the group's commit of ``tp`` against the topic's id now, and vouch for ``tp``
        unless the commit is foreign (then the guard resets it first)."""
        verdict = judge_commit(_found(commit, stamp), topic_id)
        if verdict is not CommitVerdict.FOREIGN:
            self._ids[tp] = topic_id
        return verdict

    def stamps(self, offsets: Mapping[TP, int], topic_ids: Mapping[str, uuid.UUID]) -> dict[TP, Stamp]:
        """The partitions of ``offsets`` whose log is the one the broker holds now, with stamps."""
        allowed = {}
        for tp in offsets:
            vouched = self._ids.get(tp)
            if vouched is not None and vouched == topic_ids.get(tp.topic):
                allowed[tp] = stamp_of(vouched)
        return allowed


class OffsetGuard:
    """Runs on a faust timer; see the module docstring. It fences the app's commits, so the app
    needs the adapter's transport (``faust_adapter.use_fetch_wait``) first."""

    def __init__(self, app: faust.App, policy: OffsetResetPolicy, metrics: WorkerMetrics) -> None:
        self.app = app
        self.policy = policy
        self.metrics = metrics
        self.offsets: dict[TP, PartitionOffsets] = {}
        self.resets = 0
        #: When the broker last answered a fetch, as last seen (the consumer forgets it when it
        #: loses its assignment, which a silent broker causes).
        self.answered_ms: float | None = None
        #: Per partition, since its last reset: the furthest log end and position seen.
        self._high: dict[TP, int] = {}
        self._done: dict[TP, int] = {}
        #: What commits are fenced and stamped with.
        self.identities = LogIdentities(consumer_group(app))
        fence_commits(app, self.identities)
        #: Partitions reset before the broker told their topic id: vouched for once it does.
        self._reset_unvouched: set[TP] = set()

    def broker_silent_s(self, now_ms: float | None = None, *, waiting: bool = False) -> float | None:
        """Seconds since the broker last answered a fetch of this worker (None: not yet known).

        ``waiting``: the worker holds partitions, so it expects answers; if none came yet, the
        silence counts from the first time it was asked while waiting."""
        now = time.time() * 1000 if now_ms is None else now_ms
        latest = last_fetch_ms(self.app)
        if latest is not None:
            self.answered_ms = max(latest, self.answered_ms or latest)
        elif self.answered_ms is None and waiting:
            self.answered_ms = now
        if self.answered_ms is None:
            return None
        return max(0.0, (now - self.answered_ms) / 1000)

    async def check(self) -> None:
        self.broker_silent_s()  # remember the last answer while the consumer still knows it
        # While faust revokes and seeks, positions are in flux: only remember what the log showed,
        # and judge once the partitions are assigned again.
        judge = not self.app.rebalancing
        consumer = self.app.consumer
        try:
            assigned = consumer.assignment()
        except CONSUMER_NOT_READY:
            return
        for tp in self.identities.held() - set(assigned):
            # Another worker may commit it meanwhile: its commit is judged again if it comes back.
            self.identities.forget(tp)
        self._reset_unvouched &= set(assigned)
        ids, found = await self._commits_to_judge(assigned) if judge else ({}, {})
        seen: dict[TP, PartitionOffsets] = {}
        for tp in sorted(assigned):
            try:
                position = await consumer.position(tp)
            except (KafkaError, AssertionError, CONSUMER_NOT_READY):
                continue  # revoked meanwhile, or the broker is away: next time
            read, committed = faust_offsets(self.app, tp)
            offsets = PartitionOffsets(log_end(self.app, tp), position, read, committed)
            seen[tp] = offsets
            high = self._high.get(tp)
            went_back = high is not None and offsets.log_end is not None and offsets.log_end < high
            topic_id = ids.get(tp.topic)
            vouched = self.identities.get(tp)
            verdict = None
            if tp in found and topic_id is not None and vouched is None:
                verdict = self.identities.judge(tp, *found[tp], topic_id)
            if not judge:
                if not went_back:
                    self._remember(tp, offsets)
            elif offsets.past_the_end():
                await self._reset(tp, offsets, topic_id, ResetReason.PAST_THE_END)
            elif verdict is CommitVerdict.FOREIGN:
                # Faust seeked to an offset another log's reader committed; from there it reads
                # (and would commit) this log as if everything below were done.
                await self._reset(tp, offsets, topic_id, ResetReason.FOREIGN_LOG, foreign=found[tp][0])
            elif vouched is not None and topic_id is not None and vouched != topic_id:
                # The topic was created again under the consumer (a broker back empty, the topic
                # deleted): where it stands comes from the old log, wherever the new log's end is.
                await self._reset(tp, offsets, topic_id, ResetReason.TOPIC_REPLACED)
            elif went_back:
                # A log end never goes back: the log was replaced, even though the consumer already
                # stands inside the new one (faust forgot the old offsets in the rebalance). Where it
                # stands may come from an offset committed with the old log's bookkeeping, so it
                # moves per the policy too: at worst, records read since are read again.
                await self._reset(tp, offsets, topic_id, ResetReason.LOG_END_WENT_BACK)
            else:
                self._remember(tp, offsets)
                if topic_id is not None and tp in self._reset_unvouched:
                    self.identities.vouch(tp, topic_id)
                    self._reset_unvouched.discard(tp)
                await self._catch_up(tp, offsets.committed, topic_id)
        self.offsets = seen

    async def _catch_up(self, tp: TP, committed: int | None, topic_id: uuid.UUID | None) -> None:
        """Commit what faust counts as committed where the fence held it back (before the partition
        was judged, or while the broker did not tell its topic id): faust commits only above it."""
        vouched = self.identities.get(tp)
        if committed is None or vouched is None or vouched != topic_id:
            return
        last = self.identities.last_committed(tp)
        if last is None or committed > last:
            await self._commit(tp, committed)

    async def _commit(self, tp: TP, offset: int) -> None:
        try:
            await commit_offsets(self.app, {tp: offset})
        except KafkaError as exc:  # faust's next commit of it will do
            log.warning("offset_commit_failed", topic=tp.topic, partition=tp.partition, error=repr(exc))

    async def _commits_to_judge(
        self, assigned: Iterable[TP]
    ) -> tuple[dict[str, uuid.UUID], dict[TP, tuple[GroupCommit | None, GroupCommit | None]]]:
        """The topic ids the broker has now, and the group's commit and stamp of each partition not
        yet judged; nothing while the broker does not tell."""
        assigned = list(assigned)
        if not assigned:
            return {}, {}
        try:
            ids = await topic_ids(self.app, {tp.topic for tp in assigned})
            unjudged = [tp for tp in self.identities.unjudged(assigned) if tp.topic in ids]
            unjudged = [tp for tp in unjudged if tp not in self._reset_unvouched]
            if not unjudged:
                return ids, {}
            commits = await group_commits(self.app, self.identities.group, unjudged)
            stamps = await group_commits(self.app, self.identities.stamp_group, unjudged)
        except (KafkaError, CONSUMER_NOT_READY) as exc:
            log.debug("offset_guard_identify_failed", error=repr(exc))  # the broker is away: next time
            return {}, {}
        return ids, {tp: (commits.get(tp), stamps.get(tp)) for tp in unjudged}

    async def _reset(
        self,
        tp: TP,
        offsets: PartitionOffsets,
        topic_id: uuid.UUID | None,
        reason: ResetReason,
        *,
        foreign: GroupCommit | None = None,
    ) -> None:
        end = offsets.log_end if offsets.log_end is not None else offsets.position or 0
        start = 0
        if self.policy is OffsetResetPolicy.EARLIEST:
            try:
                start = int((await self.app.consumer.earliest_offsets(tp)).get(tp, 0))
            except KafkaError:
                start = 0  # a log that was just replaced starts at 0
        else:
            # Asked, not the last fetch's: a replaced topic may not have been fetched from yet.
            with contextlib.suppress(KafkaError):
                end = int((await self.app.consumer.highwaters(tp)).get(tp, end))
        target = reset_target(self.policy, log_start=start, log_end=end)
        await reset_partition(self.app, tp, target)
        # What the old log held beyond where this worker got: acknowledged to its producers, never
        # read here, gone with the log (a lower bound: records after its last fetch are unknown).
        high, done = self._high.pop(tp, 0), self._done.pop(tp, 0)
        # The log was replaced: its topic id changed, or its end went back.
        replaced = reason is ResetReason.TOPIC_REPLACED or (
            offsets.log_end is not None and offsets.log_end < high
        )
        unread = max(0, high - done) if replaced else 0
        if reason is ResetReason.PAST_THE_END and replaced:
            reason = ResetReason.LOG_END_WENT_BACK  # (as before topic ids: the same fault)
        stood: int | None
        if foreign is not None:
            stood = foreign.offset  # the foreign commit faust started from
        elif replaced and done:
            stood = done  # where this worker stood in the replaced log
        else:
            stood = offsets.committed if offsets.committed is not None else offsets.position
        self.resets += 1
        self.metrics.offset_resets.labels(tp.topic, str(tp.partition), self.policy.value, reason.value).inc()
        self.metrics.offset_reset_unread.labels(tp.topic, str(tp.partition)).inc(unread)
        log.warning(
            "offset_reset",
            topic=tp.topic,
            partition=tp.partition,
            offset=stood,
            position=offsets.position,
            log_end=offsets.log_end,
            reset_to=target,
            policy=self.policy.value,
            unread_in_replaced_log=unread,
            reason=reason.value,
        )
        if topic_id is None:
            # The broker did not tell the topic's id: commits wait until it does (next look).
            self.identities.forget(tp)
            self._reset_unvouched.add(tp)
            return
        self.identities.vouch(tp, topic_id)
        self._reset_unvouched.discard(tp)
        # Committed now, stamped: a worker that stops before its first acknowledgement leaves the
        # new log's offset, not the foreign one, and the next worker does not reset it again.
        await self._commit(tp, target)

    def _remember(self, tp: TP, offsets: PartitionOffsets) -> None:
        if offsets.log_end is not None:
            self._high[tp] = max(self._high.get(tp, 0), offsets.log_end)
        done = max((o for o in (offsets.position, offsets.committed) if o is not None), default=None)
        if done is not None:
            self._done[tp] = max(self._done.get(tp, 0), done)

    def lag(self) -> list[PartitionLag]:
        """End of log minus the committed offset (the position before the first commit)."""
        entries = []
        for tp, offsets in self.offsets.items():
            done = offsets.committed if offsets.committed is not None else offsets.position
            if offsets.log_end is None or done is None:
                continue
            entries.append(PartitionLag(tp.topic, tp.partition, max(0, offsets.log_end - done)))
        return sorted(entries, key=lambda e: (e.topic, e.partition))


def _found(commit: GroupCommit | None, stamp: GroupCommit | None) -> FoundCommit:
    return FoundCommit(
        offset=None if commit is None else commit.offset,
        metadata="" if commit is None else commit.metadata,
        stamped=None if stamp is None else stamp.offset,
    )
