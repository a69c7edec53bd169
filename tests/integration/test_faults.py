"""Faults the worker survives, on a real Tansu broker and valkey: poison pills, a broker that
restarts with empty logs, a broker that freezes or is down at shutdown, and its web surface.

Each test gets a broker of its own (topic names are fixed); groups and Redis prefixes are unique.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from worker_harness import WorkerProcess, consume, produce, utterance

from worker.dev.services import EmbeddedService, start_kafka
from worker.schemas import DeadLetter
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

pytestmark = pytest.mark.integration

PARTITIONS = 2
TOPICS = dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), PARTITIONS)
PRODUCER_REQUEST_LIMIT = 1_000_000  # faust's producer_max_request_size, which the worker keeps


def new_broker(directory: Path, port: int | None = None) -> EmbeddedService:
    service = start_kafka(directory, port=port)
    asyncio.run(create_topics(service.bootstrap, TOPICS))
    return service


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedService]:
    with new_broker(tmp_path / "tansu") as service:
        yield service


def worker_on(
    broker: EmbeddedService, redis: EmbeddedService, run_dir: Path, group: str, student: Path, **extra: str
) -> WorkerProcess:
    return WorkerProcess(
        kafka=broker.bootstrap, redis=redis.url, run_dir=run_dir, group=group,
        prefix=f"{group}-{time.time_ns()}", student=student, partitions=PARTITIONS, extra=extra,
    )  # fmt: skip


def committed(bootstrap: str, group: str) -> dict[int, int | None]:
    """The group's committed offsets on ``utterances``, read without joining the group."""

    async def read() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(UTTERANCES, p)) for p in range(PARTITIONS)}
        finally:
            await consumer.stop()

    return asyncio.run(read())


def diagnosis(worker: WorkerProcess) -> str:
    """What the worker says about itself (counters, lag, resets) and the end of its log."""
    try:
        metrics = worker.metrics()
    except Exception as exc:  # a worker that stopped answering: its log says why
        metrics = {"unavailable": repr(exc)}  # type: ignore[dict-item]
    wanted = ("utterances_total", "labels_total", "lag", "reset", "batch_size_count")
    shown = {k: v for k, v in metrics.items() if any(w in k for w in wanted)}
    return f"{shown}\n{worker.log_tail()}"


def offset_resets(worker: WorkerProcess, timeout_s: float = 10.0) -> list[dict[str, object]]:
    """The worker's ``offset_reset`` log events, once one per partition has come or ``timeout_s``
    has passed (the guard looks once a second, and after a rebalance)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resets = [e for e in worker.log_events() if e.get("event") == "offset_reset"]
        if len(resets) >= PARTITIONS or time.monotonic() > deadline:
            return resets
        time.sleep(0.5)


def test_poison_pills_become_bounded_dead_letters_and_their_offsets_are_committed(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    huge_key = b"k" * 460_000  # fits a default aiokafka producer's 1 MB request with its value
    pills = {
        huge_key: b"not json at all",
        b"pill-schema-version": json.dumps(
            {"schema_version": "v" * 700_000, "id": "a", "text": "hi"}
        ).encode(),
    }
    valid = [utterance(f"after-pill-{i}", f"play song number {i}") for i in range(40)]
    produce(broker.bootstrap, UTTERANCES, [*pills.items(), *valid])

    with worker_on(broker, redis_service, tmp_path / "run", "pills", student) as worker:
        letters = consume(broker.bootstrap, [DEAD_LETTERS], lambda rs: len(rs) >= len(pills), timeout_s=60)
        intents = consume(broker.bootstrap, [INTENTS], lambda rs: len(rs) >= len(valid), timeout_s=60)
        assert worker.alive(), worker.log_tail()
        assert worker.get("/health")[0] == 200
        assert worker.terminate() == 0
    assert {r.key for r in intents} == {key for key, _ in valid}
    assert len(letters) == len(pills)
    by_size = {}
    for record in letters:
        assert len(record.key or b"") + len(record.value) < PRODUCER_REQUEST_LIMIT
        letter = DeadLetter.from_json_bytes(record.value)
        by_size[letter.original_key_size] = (record, letter)
    key_record, key_letter = by_size[len(huge_key)]
    assert key_letter.original_key_truncated and huge_key.startswith(
        base64.b64decode(key_letter.original_key_base64 or "")
    )
    assert key_record.key is not None and len(key_record.key) <= 1024 and huge_key.startswith(key_record.key)
    assert key_letter.original() == pills[huge_key] and not key_letter.original_truncated
    _, schema_letter = by_size[len(b"pill-schema-version")]
    assert schema_letter.error_message_truncated or len(schema_letter.error_message) < 1000
    assert "v" * 2000 not in schema_letter.error_message
    assert schema_letter.original_size == len(pills[b"pill-schema-version"])
    events = [e.get("event") for e in worker.log_events()]
    assert "classifier_failed" not in events and events.count("dead_lettered") == len(pills)
    # Committed past the pills: a restarted worker does not meet them again.
    ends = committed(broker.bootstrap, "pills")
    assert sum(offset or 0 for offset in ends.values()) == len(pills) + len(valid)


def test_offsets_past_the_end_of_a_restarted_brokers_log_are_reset_and_counted(
    redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    first = new_broker(tmp_path / "tansu-1")
    port = first.port
    before = [utterance(f"old-{i}", f"set an alarm for {i % 12 + 1} am") for i in range(600)]
    produce(first.bootstrap, UTTERANCES, before)
    worker = worker_on(first, redis_service, tmp_path / "run", "restarted", student).start()
    second: EmbeddedService | None = None
    try:
        worker.wait_healthy()
        consume(first.bootstrap, [INTENTS], lambda rs: len(rs) >= len(before), timeout_s=60)
        time.sleep(1.5)  # committed (every 0.5 s): 300 per partition
        os.kill(first.pid, signal.SIGKILL)  # memory storage: the logs and the offsets go with it
        first.process.wait()
        second = new_broker(tmp_path / "tansu-2", port=port)
        after = [utterance(f"new-{i}", f"turn on the lights number {i}") for i in range(100)]
        produce(second.bootstrap, UTTERANCES, after)  # 50 per partition: below the old offsets
        found = consume(
            second.bootstrap, [INTENTS], lambda rs: {k for k, _ in after} <= {r.key for r in rs}, 90
        )
        assert {k for k, _ in after} <= {r.key for r in found}, (worker.health(), diagnosis(worker))
        resets = offset_resets(worker)
        assert {int(str(e["partition"])) for e in resets} == set(range(PARTITIONS)), diagnosis(worker)
        for event in resets:
            # Seen by the topic's new id (maybe before the consumer fetched from the new log: the end
            # it shows is still the old one), or by an end below where the worker stood.
            assert event["policy"] == "earliest", resets
            assert event["reason"] == "topic_replaced" or int(str(event["log_end"])) < int(
                str(event["offset"])
            ), resets
        deadline = time.monotonic() + 20  # re-read from the new log's start and committed: no lag left
        while True:
            metrics = worker.metrics()
            lag = [v for k, v in metrics.items() if k.startswith("intent_worker_consumer_lag{")]
            if (lag and sum(lag) == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert (
            sum(v for k, v in metrics.items() if k.startswith("intent_worker_offset_resets_total"))
            >= PARTITIONS
        )
        assert [k for k in metrics if k.startswith("intent_worker_consumer_lag{")] != []
        started = time.monotonic()
        assert worker.terminate() == 0
        assert time.monotonic() - started < 20
        # What it commits on the way out belongs to the new log, not the old one: never past the
        # new log's end (that would skip records). It may commit nothing yet, since faust still
        # counts the old log's offsets as committed (a restart then re-reads: duplicates, not
        # losses); issue 14 leaves that open.
        offsets = committed(second.bootstrap, "restarted")
        # The new log holds len(after) records in all; the old one held 300 per partition.
        assert all(offset is None or offset <= len(after) for offset in offsets.values()), offsets
        assert sum(offset or 0 for offset in offsets.values()) <= len(after), offsets
        # At least once: records read from the new log before the guard's look may be read again.
    finally:
        if worker.alive():
            worker.kill()
        first.stop()
        if second is not None:
            second.stop()


def test_sigterm_with_the_broker_down_stops_within_the_shutdown_timeout(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    with worker_on(
        broker, redis_service, tmp_path / "run", "down", student, INTENT_SHUTDOWN_TIMEOUT_S="8"
    ) as worker:
        worker.wait_healthy()
        produce(broker.bootstrap, UTTERANCES, [utterance("before-down", "play some jazz")])
        consume(broker.bootstrap, [INTENTS], lambda rs: len(rs) >= 1, timeout_s=30)
        broker.process.kill()
        broker.process.wait()
        time.sleep(1.0)
        started = time.monotonic()
        code = worker.terminate(timeout_s=30)
        took = time.monotonic() - started
    assert took < 12, took
    events = [e.get("event") for e in worker.log_events()]
    assert code == 0 or "shutdown_timeout" in events, (code, events[-10:])


def test_health_is_503_while_the_broker_is_frozen_and_only_health_and_metrics_answer(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    with worker_on(
        broker, redis_service, tmp_path / "run", "frozen", student, INTENT_HEALTH_BROKER_TIMEOUT_S="3"
    ) as worker:
        worker.wait_healthy()
        assert worker.get("/metrics")[0] == 200
        for path in ("/", "/router/", "/table/", "/graph/", "/stats/"):
            assert worker.get(path)[0] == 404, path
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            status, body = worker.health()
            while status != 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                status, body = worker.health()
            assert status == 503 and body["status"] == "broker_unreachable", body
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        worker.wait_healthy(timeout_s=30)


def test_a_fresh_worker_resets_committed_offsets_past_the_end_and_labels_what_waits(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    waiting = [utterance(f"waiting-{i}", f"play track {i}") for i in range(60)]
    produce(broker.bootstrap, UTTERANCES, waiting)

    async def commit_beyond_the_end() -> None:  # what a worker of the lost broker left behind
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, group_id="fresh", enable_auto_commit=False
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(UTTERANCES, p) for p in range(PARTITIONS)]
            consumer.assign(partitions)
            await consumer.commit({tp: 6_000 for tp in partitions})
        finally:
            await consumer.stop()

    asyncio.run(commit_beyond_the_end())
    with worker_on(broker, redis_service, tmp_path / "run", "fresh", student) as worker:
        found = consume(broker.bootstrap, [INTENTS], lambda rs: len(rs) >= len(waiting), timeout_s=60)
        assert {r.key for r in found} == {key for key, _ in waiting}, worker.log_tail()
        resets = [e for e in worker.log_events() if e.get("event") == "offset_reset"]
        assert {(e["offset"], e["reset_to"]) for e in resets} == {(6_000, 0)}
        assert worker.terminate() == 0
    assert sum(offset or 0 for offset in committed(broker.bootstrap, "fresh").values()) == len(waiting)


GroupCommits = dict[str, dict[TopicPartition, OffsetAndMetadata]]


def group_commits(bootstrap: str, groups: Sequence[str]) -> GroupCommits:
    """The commits (offset and metadata) of ``groups`` on ``utterances``; groups without any left out."""

    async def read() -> GroupCommits:
        found: GroupCommits = {}
        partitions = [TopicPartition(UTTERANCES, p) for p in range(PARTITIONS)]
        for group in groups:
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
            await consumer.start()
            try:  # committed() drops the metadata; the coordinator's fetch keeps it
                commits = await consumer._coordinator.fetch_committed_offsets(partitions)
            finally:
                await consumer.stop()
            if commits:
                found[group] = dict(commits)
        return found

    return asyncio.run(read())


def commit_as(bootstrap: str, commits: GroupCommits) -> None:
    """Write ``commits`` (each group's offsets and metadata) without joining the groups."""

    async def write() -> None:
        for group, offsets in commits.items():
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
            await consumer.start()
            try:
                consumer.assign(list(offsets))
                await consumer.commit(offsets)
            finally:
                await consumer.stop()

    asyncio.run(write())


def test_a_commit_of_a_replaced_log_inside_the_new_log_is_reset_logged_and_counted(
    redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    """Issue 14: a worker of a broker that restarted empty commits the old log's offsets into the
    new log on its way out. Once the new log has grown past them nothing is past its end, yet they
    are not this log's: a worker that trusted them skipped the new log's first records, silently."""
    first = new_broker(tmp_path / "tansu-1")
    port = first.port
    old = [utterance(f"old-{i}", f"set an alarm for {i % 12 + 1} am") for i in range(100)]
    produce(first.bootstrap, UTTERANCES, old)
    with worker_on(first, redis_service, tmp_path / "run-1", "replaced", student) as worker:
        consume(first.bootstrap, [INTENTS], lambda rs: len(rs) >= len(old), timeout_s=60)
        assert worker.terminate() == 0
    # All that worker committed, as it wrote it: ~50 per partition in its group, and the stamps it
    # keeps in a group of their own for brokers that drop commit metadata (README, Operations).
    stale = group_commits(first.bootstrap, ["replaced", "replaced.topic-ids"])
    assert sum(c.offset for c in stale["replaced"].values()) == len(old), stale
    first.stop()
    second = new_broker(tmp_path / "tansu-2", port=port)
    try:
        new = [utterance(f"new-{i}", f"turn on the lights number {i}") for i in range(4 * len(old))]
        produce(second.bootstrap, UTTERANCES, new)  # 200 per partition: past the old offsets
        commit_as(second.bootstrap, stale)  # what the old worker would commit, had it seen no change
        with worker_on(second, redis_service, tmp_path / "run-2", "replaced", student) as worker:
            keys = {k for k, _ in new}
            found = consume(second.bootstrap, [INTENTS], lambda rs: keys <= {r.key for r in rs}, 60)
            skipped = keys - {r.key for r in found}
            assert not skipped, f"{len(skipped)} of {len(new)} records skipped\n{diagnosis(worker)}"
            resets = offset_resets(worker)
            assert {int(str(e["partition"])) for e in resets} == set(range(PARTITIONS)), diagnosis(worker)
            assert {e["reason"] for e in resets} == {"foreign_log"}, resets
            assert {(e["partition"], e["offset"], e["reset_to"]) for e in resets} == {
                (tp.partition, commit.offset, 0) for tp, commit in stale["replaced"].items()
            }, resets
            counted = {
                k: v for k, v in worker.metrics().items() if k.startswith("intent_worker_offset_resets_total")
            }
            assert sum(v for k, v in counted.items() if 'reason="foreign_log"' in k) == PARTITIONS, counted
            assert worker.terminate() == 0
        # What it left committed belongs to the new log: the next worker resumes there, resets nothing.
        assert sum(offset or 0 for offset in committed(second.bootstrap, "replaced").values()) == len(new)
        with worker_on(second, redis_service, tmp_path / "run-3", "replaced", student) as worker:
            worker.wait_healthy()
            time.sleep(3)  # the guard looks once a second
            assert [e for e in worker.log_events() if e.get("event") == "offset_reset"] == [], (
                worker.log_tail()
            )
            assert worker.terminate() == 0
    finally:
        second.stop()
