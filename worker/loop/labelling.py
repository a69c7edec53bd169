"""The labelling job: :class:`BufferLabeller` drains the Redis buffer the workers sample into,
through a consumer group so several labellers share the work, and writes what the teacher
says into a distillation dataset (seeding from files is :mod:`worker.loop.seeding`).

**The job's delivery contract.** A buffer entry is acknowledged (``XACK`` + ``XDEL``, in one
transaction) only after the shard holding it is durably written and published in the
manifest. An entry read by a labeller that dies stays pending; the same consumer reads it
again when it restarts (``XREADGROUP ... 0``), and any labeller claims it once it has been
idle for ``claim_idle_s`` (``XAUTOCLAIM``). Re-labelled entries never become duplicate rows:
a shard is named by the entries it covers, and the dataset drops, at publication, any row
whose buffer entry it already holds. Unreadable entries go to a dead-letter stream with
their original bytes and the reason, and are acknowledged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from worker.config import LabellerSettings
from worker.errors import BadInput, DataError
from worker.loop.dataset import Commit, DatasetWriter, ShardRows
from worker.loop.seeding import shard_name
from worker.schemas import UNKNOWN_LOCALE, BufferSample
from worker.teacher import Teacher
from worker.topics import BUFFER_FIELD, buffer_dead_key, buffer_key, dataset_lock_key

log = structlog.get_logger(__name__)

DEAD_STREAM_MAXLEN = 100_000
#: The dataset lock expires this long after its holder died (a live holder renews it).
LOCK_TIMEOUT_S = 15.0
LOCK_WAIT_S = 600.0


class LabellerOptions(LabellerSettings):
    """The job's knobs: :class:`worker.config.LabellerSettings` (``settings.labeller``), and where
    it reads and who it is."""

    prefix: str
    consumer: str = "labeller"
    block_s: float = 0.2  # how long a read waits for new entries before the run ends


@dataclass
class RunReport:
    """One run of the job: what it read, wrote and measured (a line in the manifest)."""

    run: str
    started: float
    finished: float = 0.0
    entries: int = 0  # buffer entries handled (labelled, duplicate, bad or trimmed)
    rows: int = 0  # rows published in the dataset
    duplicates: int = 0  # entries the dataset already held (re-delivered after a crash)
    bad: int = 0  # unreadable entries, dead-lettered
    trimmed: int = 0  # pending entries the stream had already trimmed (lost before labelling)
    claimed: int = 0  # entries taken over from a labeller that stopped
    shards: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("redis", "decode", "teacher", "write"), 0.0)
    )
    disagreement: dict[str, list[int]] = field(default_factory=dict)  # locale -> [n, disagreements]
    #: False in the line published with each shard (what a run that is killed leaves), True at its end.
    complete: bool = False

    def tally(self, locales: Iterable[str], disagrees: Iterable[bool]) -> None:
        for locale, differs in zip(locales, disagrees, strict=True):
            counts = self.disagreement.setdefault(locale, [0, 0])
            counts[0] += 1
            counts[1] += differs

    def to_manifest(self) -> dict[str, object]:
        total = [sum(v[0] for v in self.disagreement.values()), sum(v[1] for v in self.disagreement.values())]
        return {
            "run": self.run,
            "started": self.started,
            "finished": self.finished,
            "entries": self.entries,
            "rows": self.rows,
            "duplicates": self.duplicates,
            "bad": self.bad,
            "trimmed": self.trimmed,
            "claimed": self.claimed,
            "shards": self.shards,
            "complete": self.complete,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "disagreement": {
                locale: {"n": n, "rate": round(d / n, 4) if n else 0.0}
                for locale, (n, d) in sorted({**self.disagreement, "*": total}.items())
            },
        }


class LabellerMetrics:
    """The job's Prometheus metrics (served with ``--metrics-port``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.entries = Counter(
            "intent_labeller_entries",
            "Buffer entries handled, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.stage_seconds = Counter(
            "intent_labeller_stage_seconds",
            "Time spent per stage (redis, decode, teacher, write)",
            ["stage"],
            registry=self.registry,
        )
        self.disagreement = Gauge(
            "intent_labeller_disagreement_rate",
            "Share of the last run's samples where the serving student's label differs from the teacher's",
            ["locale"],
            registry=self.registry,
        )
        self.backlog = Gauge(
            "intent_labeller_backlog",
            "Buffer entries not yet delivered to any labeller (the group's lag)",
            registry=self.registry,
        )


@dataclass(frozen=True)
class _Entry:
    id: str
    raw: bytes | None  # None: the stream trimmed the entry while it was pending


class BufferLabeller:
    """Drains the buffer stream into a dataset; one instance per labeller process."""

    def __init__(
        self,
        client: Redis,
        teacher: Teacher,
        writer: DatasetWriter,
        options: LabellerOptions,
        metrics: LabellerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.teacher = teacher
        self.writer = writer
        self.options = options
        self.metrics = metrics or LabellerMetrics()
        self.clock = clock
        self.stream = buffer_key(options.prefix)
        self.dead = buffer_dead_key(options.prefix)
        self.ensure_group()

    @staticmethod
    def redis_lock(
        client: Redis, prefix: str, location: str
    ) -> Callable[[], contextlib.AbstractContextManager[object]]:
        """The dataset lock across hosts (a Redis lock); the writer adds its local one inside."""
        return lambda: renewed_lock(client, dataset_lock_key(prefix, location))

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.options.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def backlog(self) -> int:
        """Entries no labeller has read yet (the group's lag; the stream length if unknown)."""
        for group in self.client.xinfo_groups(self.stream):
            if _text(group["name"]) == self.options.group:
                lag = group.get("lag")
                value = int(lag) if lag is not None else int(self.client.xlen(self.stream))
                self.metrics.backlog.set(value)
                return value
        return int(self.client.xlen(self.stream))

    # -- reading ------------------------------------------------------------------------------

    def _own_pending(self, count: int) -> list[_Entry]:
        """Entries this consumer read before and never acknowledged (it crashed)."""
        reply = self.client.xreadgroup(
            self.options.group, self.options.consumer, {self.stream: "0"}, count=count
        )
        return _entries(reply)

    def _claim(self, count: int) -> list[_Entry]:
        """Entries idle for ``claim_idle_s`` in another consumer's pending list."""
        idle_ms = int(self.options.claim_idle_s * 1000)
        reply = self.client.xautoclaim(
            self.stream, self.options.group, self.options.consumer, idle_ms, "0-0", count=count
        )
        claimed = reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        out = [_Entry(_text(eid), (fields or {}).get(BUFFER_FIELD.encode())) for eid, fields in claimed]
        out += [_Entry(_text(eid), None) for eid in deleted]
        return out

    def _deliveries(self, *, consumer: str | None = None, idle_s: float | None = None) -> list[int]:
        """Delivery counts of the oldest pending entries (of ``consumer``, or idle ``idle_s``);
        XPENDING reads them without delivering anything again."""
        kwargs: dict[str, Any] = {"min": "-", "max": "+", "count": self.options.shard_rows}
        if consumer is not None:
            kwargs["consumername"] = consumer
        if idle_s is not None:
            kwargs["idle"] = int(idle_s * 1000)
        return [
            int(p["times_delivered"])
            for p in self.client.xpending_range(self.stream, self.options.group, **kwargs)
        ]

    def batch_size(self, deliveries: int) -> int:
        """Entries to take again after ``deliveries`` attempts: halved on each, down to one, so a batch
        whose labeller keeps dying completes in smaller pieces, and a poison entry ends up alone."""
        return max(1, self.options.shard_rows >> max(0, deliveries - 1))

    def _new(self, count: int, block_s: float) -> list[_Entry]:
        reply = self.client.xreadgroup(
            self.options.group,
            self.options.consumer,
            {self.stream: ">"},
            count=count,
            block=max(1, int(block_s * 1000)),
        )
        return _entries(reply)

    def next_entries(self, block_s: float | None = None) -> tuple[list[_Entry], int]:
        """The next batch: own pending first, then claimed, then new entries; and how many were claimed.

        Re-delivered entries come back in batches halved by their delivery count (see
        :meth:`batch_size`)."""
        own = self._deliveries(consumer=self.options.consumer)
        if own:
            return self._without_poison(self._own_pending(self.batch_size(max(own)))), 0
        idle = self._deliveries(idle_s=self.options.claim_idle_s)
        if idle:
            claimed = self._claim(self.batch_size(max(idle)))
            if claimed:
                return self._without_poison(claimed), len(claimed)
        count = self.options.shard_rows
        return self._new(count, self.options.block_s if block_s is None else block_s), 0

    def _without_poison(self, entries: list[_Entry]) -> list[_Entry]:
        """Re-delivered entries, minus those delivered ``max_deliveries`` times already: an entry
        that keeps killing labellers is dead-lettered and acknowledged, not retried forever."""
        ids = {e.id for e in entries}
        pending = self.client.xpending_range(
            self.stream, self.options.group, min=min(ids, key=_entry_order), max=max(ids, key=_entry_order),
            count=len(entries) * 4, consumername=self.options.consumer,
        )  # fmt: skip
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        poison = [e for e in entries if deliveries.get(e.id, 0) > self.options.max_deliveries]
        for entry in poison:
            self._dead_letter(
                entry,
                BadInput(f"delivered {deliveries[entry.id]} times without being labelled", reason="poison"),
            )
        self._acknowledge([e.id for e in poison])
        return [e for e in entries if e not in poison]

    # -- one batch ----------------------------------------------------------------------------

    def process(self, entries: list[_Entry], report: RunReport) -> Commit | None:
        """Label ``entries``, publish them as one shard, then acknowledge them."""
        started = time.perf_counter()
        samples: list[tuple[str, BufferSample]] = []
        for entry in entries:
            if entry.raw is None:
                report.trimmed += 1
                self.metrics.entries.labels("trimmed").inc()
                continue
            try:
                samples.append((entry.id, BufferSample.from_json_bytes(entry.raw)))
            except BadInput as exc:
                self._dead_letter(entry, exc)
                report.bad += 1
        self.writer.refresh()
        known = self.writer.known_entries([eid for eid, _ in samples])
        fresh = [pair for pair, seen in zip(samples, known, strict=True) if not seen]
        report.duplicates += len(samples) - len(fresh)
        self.metrics.entries.labels("duplicate").inc(len(samples) - len(fresh))
        decoded = time.perf_counter()
        report.seconds["decode"] += decoded - started
        commit = None
        if fresh:
            texts = [s.text for _, s in fresh]
            logits = self.teacher.logits(texts)
            labelled = time.perf_counter()
            report.seconds["teacher"] += labelled - decoded
            teacher_labels = [self.teacher.labels[int(i)] for i in np.argmax(logits, axis=1)]
            rows = ShardRows(
                ids=[s.id for _, s in fresh],
                texts=texts,
                locales=[s.locale or UNKNOWN_LOCALE for _, s in fresh],
                teacher_logits=list(logits),
                teacher_labels=teacher_labels,
                sources=["buffer"] * len(fresh),
                weights=[s.weight for _, s in fresh],
                student_logits=[list(s.logits) for _, s in fresh],
                model_versions=[s.model_version for _, s in fresh],
                strata=[s.stratum for _, s in fresh],
                buffer_ids=[eid for eid, _ in fresh],
                sampled_at=[s.timestamp for _, s in fresh],
            )
            name = shard_name(self.teacher, (eid for eid, _ in fresh))
            locales = [sample.locale or UNKNOWN_LOCALE for _, sample in fresh]
            disagrees = [
                sample.label != label for (_, sample), label in zip(fresh, teacher_labels, strict=True)
            ]

            def run_line(commit: Commit) -> dict[str, object]:
                """The run so far, published with the shard itself: a run killed after this point
                still has a line (``complete: false``) counting the rows it published."""
                line = dataclasses.replace(
                    report,
                    entries=report.entries + len(entries),
                    rows=report.rows + commit.rows,
                    shards=[*report.shards, *([commit.name] if commit.rows else [])],
                    finished=self.clock(),
                    disagreement={k: list(v) for k, v in report.disagreement.items()},
                )
                if commit.rows == len(fresh):
                    line.tally(locales, disagrees)
                return line.to_manifest()

            commit = self.writer.write_shard(name, rows, run=run_line)
            report.seconds["write"] += time.perf_counter() - labelled
            report.rows += commit.rows
            report.duplicates += commit.duplicates
            if commit.rows:
                report.shards.append(commit.name)
            self.metrics.entries.labels("labelled").inc(commit.rows)
            self.metrics.entries.labels("duplicate").inc(commit.duplicates)
            if commit.rows == len(fresh):  # else a racing writer had some: skip the tally
                report.tally(locales, disagrees)
        acked = time.perf_counter()
        self._acknowledge([e.id for e in entries])
        report.seconds["redis"] += time.perf_counter() - acked
        report.entries += len(entries)
        return commit

    def _dead_letter(self, entry: _Entry, exc: BadInput) -> None:
        log.warning("buffer_entry_unreadable", entry=entry.id, reason=exc.reason, error=str(exc)[:300])
        self.metrics.entries.labels("bad").inc()
        self.client.xadd(
            self.dead,
            {"entry": entry.id, "reason": exc.reason, "error": str(exc)[:2000], "original": entry.raw or b""},
            maxlen=DEAD_STREAM_MAXLEN,
            approximate=True,
        )

    def _acknowledge(self, ids: list[str]) -> None:
        """Acknowledge and delete, in one transaction: the buffer keeps only unlabelled entries."""
        if not ids:
            return
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.options.group, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.execute()

    # -- runs ---------------------------------------------------------------------------------

    def run_once(self, *, max_entries: int | None = None) -> RunReport:
        """Drain what the buffer holds now (own pending, idle claims, new entries); record the run."""
        report = RunReport(run=f"{self.options.consumer}@{self.clock():.3f}", started=self.clock())
        log.debug("labelling_run_started", run=report.run, backlog=self.backlog())
        while max_entries is None or report.entries < max_entries:
            read = time.perf_counter()
            entries, claimed = self.next_entries()
            report.seconds["redis"] += time.perf_counter() - read
            if not entries:
                break
            if claimed:
                report.claimed += claimed
                log.info("entries_claimed", n=claimed, idle_s=self.options.claim_idle_s)
            self.process(entries, report)
        report.finished = self.clock()
        report.complete = True
        for stage, seconds in report.seconds.items():
            self.metrics.stage_seconds.labels(stage).inc(seconds)
        line = report.to_manifest()
        if report.disagreement:  # an empty run says nothing about drift: keep the last values
            self.metrics.disagreement.clear()
            for locale, value in line["disagreement"].items():  # type: ignore[attr-defined]
                self.metrics.disagreement.labels(locale).set(value["rate"])
        if report.entries:
            self.writer.add_run(line)
        (log.info if report.entries else log.debug)(
            "labelling_run_finished",
            run=report.run,
            entries=report.entries,
            rows=report.rows,
            duplicates=report.duplicates,
            bad=report.bad,
            trimmed=report.trimmed,
            seconds=line["seconds"],
            disagreement=line["disagreement"].get("*"),  # type: ignore[attr-defined]
        )
        return report

    def run_forever(
        self,
        *,
        every_s: float | None,
        min_samples: int | None,
        poll_s: float = 5.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """A run every ``every_s`` seconds, or as soon as ``min_samples`` wait, whichever comes first."""
        last = -float("inf")
        backoff = poll_s
        while not should_stop():
            try:
                due = every_s is not None and time.monotonic() - last >= every_s
                full = min_samples is not None and self.backlog() >= min_samples
                if due or full or (every_s is None and min_samples is None):
                    idle = not self.run_once().entries
                    last = time.monotonic()
                    backoff = poll_s
                    if idle:  # nothing waited: do not spin on an empty buffer
                        time.sleep(poll_s)
                    continue
            except RedisError as exc:  # Redis restarting or unreachable: wait, then start over
                log.warning("labeller_redis_error", error=repr(exc), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                with contextlib.suppress(RedisError):
                    self.ensure_group()  # an in-memory Redis that restarted lost the group
                continue
            time.sleep(poll_s)


@contextlib.contextmanager
def renewed_lock(client: Redis, key: str) -> Iterator[object]:
    """A Redis lock that a watchdog thread renews while it is held, so a slow critical section
    (an object store, a waiting ``flock``) never outlives it; a holder that dies frees it after
    ``LOCK_TIMEOUT_S``. Leaving it after it was lost anyway raises :class:`DataError`."""
    lock = client.lock(key, timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_WAIT_S)
    if not lock.acquire():
        raise DataError(f"could not take the dataset lock {key} within {LOCK_WAIT_S:.0f} s")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LOCK_TIMEOUT_S / 3):
            with contextlib.suppress(RedisError):
                lock.extend(LOCK_TIMEOUT_S, replace_ttl=True)

    watchdog = threading.Thread(target=renew, name="dataset-lock", daemon=True)
    watchdog.start()
    try:
        yield lock
        if not lock.owned():
            raise DataError(f"the dataset lock {key} expired while held; the manifest may need a check")
    finally:
        stop.set()
        watchdog.join()
        with contextlib.suppress(RedisError):
            lock.release()


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[_Entry]:
    """Entries of an XREADGROUP reply (one stream); a trimmed pending entry has no fields."""
    out: list[_Entry] = []
    for _stream, items in reply or []:
        for eid, fields in items:
            out.append(_Entry(_text(eid), (fields or {}).get(BUFFER_FIELD.encode())))
    return out
