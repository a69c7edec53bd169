"""The offset guard: a committed offset past the end of its log is reset, logged and counted.

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

The guard also keeps the numbers ``intent_worker_consumer_lag`` reports, and the time of the
broker's last answer, which ``/health`` reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import faust
import structlog
from aiokafka.errors import KafkaError
from faust.types import TP

from worker.stream.faust_adapter import (
    CONSUMER_NOT_READY,
    faust_offsets,
    last_fetch_ms,
    log_end,
    reset_partition,
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
            known.append(self.read + 1)
        return bool(known) and max(known) > self.log_end


def reset_target(policy: OffsetResetPolicy, *, log_start: int, log_end: int) -> int:
    """The offset a replaced partition resumes at."""
    return log_start if policy is OffsetResetPolicy.EARLIEST else log_end


class OffsetGuard:
    """Runs on a faust timer; see the module docstring."""

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
            if not judge:
                if not went_back:
                    self._remember(tp, offsets)
            elif offsets.past_the_end():
                await self._reset(tp, offsets, seek=True)
            elif went_back:
                # A log end never goes back: the log was replaced, even though the consumer already
                # stands inside the new one (faust forgot the old offsets in the rebalance). Where it
                # stands may come from an offset committed with the old log's bookkeeping, so it
                # moves per the policy too: at worst, records read since are read again.
                await self._reset(tp, offsets, seek=True)
            else:
                self._remember(tp, offsets)
        self.offsets = seen

    async def _reset(self, tp: TP, offsets: PartitionOffsets, *, seek: bool) -> None:
        end = offsets.log_end if offsets.log_end is not None else offsets.position or 0
        start = 0
        if self.policy is OffsetResetPolicy.EARLIEST:
            try:
                start = int((await self.app.consumer.earliest_offsets(tp)).get(tp, 0))
            except KafkaError:
                start = 0  # a log that was just replaced starts at 0
        target = reset_target(self.policy, log_start=start, log_end=end) if seek else offsets.position
        if seek:
            await reset_partition(self.app, tp, target or 0)
        # What the old log held beyond where this worker got: acknowledged to its producers, never
        # read here, gone with the log (a lower bound: records after its last fetch are unknown).
        high, done = self._high.pop(tp, 0), self._done.pop(tp, 0)
        replaced = offsets.log_end is not None and offsets.log_end < high  # the log's end went back
        unread = max(0, high - done) if replaced else 0
        self.resets += 1
        self.metrics.offset_resets.labels(tp.topic, str(tp.partition), self.policy.value).inc()
        self.metrics.offset_reset_unread.labels(tp.topic, str(tp.partition)).inc(unread)
        log.warning(
            "offset_reset",
            topic=tp.topic,
            partition=tp.partition,
            # Where this worker stood: in the replaced log when the end went back, else faust's commit.
            offset=done
            if replaced and done
            else offsets.committed
            if offsets.committed is not None
            else offsets.position,
            position=offsets.position,
            log_end=offsets.log_end,
            reset_to=target,
            policy=self.policy.value,
            unread_in_replaced_log=unread,
            reason="log_end_went_back" if replaced else "past_the_end_or_position_moved_back",
        )

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
