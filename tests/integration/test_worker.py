"""The real worker (``intent-worker run`` in a subprocess) on a real Tansu broker and valkey.

Topic names are fixed (``worker/topics.py``), so each scenario gets a broker of its own
(Tansu starts in milliseconds) instead of a unique topic; groups and Redis prefixes are
unique as usual.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis import Redis
from worker_harness import WorkerProcess, consume, produce, utterance

from worker.config import REPO_ROOT
from worker.dev.harness import worker_env
from worker.dev.services import EmbeddedService, start_kafka, start_redis
from worker.schemas import BufferSample, DeadLetter, Intent
from worker.stream.admin import create_topics
from worker.topics import BUFFER_FIELD, DEAD_LETTERS, INTENTS, UTTERANCES, buffer_key

pytestmark = pytest.mark.integration

PARTITIONS = 2
SAMPLE_EVERYTHING = {"INTENT_SAMPLE_RATE": "1.0", "INTENT_SAMPLE_BUDGET_PER_S": "1000000"}
OBVIOUS = {
    "set an alarm for 7am": "Action",
    "turn off the lights in the kitchen": "Action",
    "play some jazz music": "Action",
    "what is on my shopping list": "Recall",
    "what alarms have I set": "Recall",
    "what is the weather like today": "Other",
    "tell me a joke": "Other",
}


def new_broker(directory: Path) -> EmbeddedService:
    service = start_kafka(directory)
    partitions = dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), PARTITIONS)
    asyncio.run(create_topics(service.bootstrap, partitions))
    return service


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    with new_broker(tmp_path_factory.mktemp("tansu")) as service:
        yield service


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedService]:
    with new_broker(tmp_path / "tansu") as service:
        yield service


@pytest.fixture(scope="module")
def worker(
    module_broker: EmbeddedService,
    redis_service: EmbeddedService,
    tmp_path_factory: pytest.TempPathFactory,
    student: Path,
) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        kafka=module_broker.bootstrap,
        redis=redis_service.url,
        run_dir=tmp_path_factory.mktemp("run"),
        group="labelling",
        prefix=f"test-worker-{time.time_ns()}",
        student=student,
        partitions=PARTITIONS,
        extra=SAMPLE_EVERYTHING,
    )
    with process:
        process.wait_healthy()
        yield process


def intents_by_id(bootstrap: str, ids: set[str], timeout_s: float = 60.0) -> dict[str, list[Intent]]:
    records = consume(
        bootstrap, [INTENTS], lambda rs: ids <= {r.key.decode() for r in rs if r.key}, timeout_s=timeout_s
    )
    found: dict[str, list[Intent]] = {}
    for record in records:
        intent = Intent.from_json_bytes(record.value)
        assert record.key == intent.id.encode()
        if intent.id in ids:
            found.setdefault(intent.id, []).append(intent)
    return found


def card_version(student: Path) -> str:
    return str(json.loads((student / "card.json").read_text())["version"])


def test_obvious_utterances_get_their_labels(worker: WorkerProcess, student: Path) -> None:
    sent = {f"obvious-{i}": text for i, text in enumerate(OBVIOUS)}
    produce(worker.kafka, UTTERANCES, [utterance(uid, text) for uid, text in sent.items()])
    found = intents_by_id(worker.kafka, set(sent))
    assert {uid: [i.label for i in intents] for uid, intents in found.items()} == {
        uid: [OBVIOUS[text]] for uid, text in sent.items()
    }
    for (intent,) in found.values():
        assert intent.model_version == card_version(student) and intent.locale == "en"
        assert intent.scores[intent.label] == max(intent.scores.values())


def test_a_label_arrives_within_a_fraction_of_a_second_at_a_low_rate(worker: WorkerProcess) -> None:
    # faust's own consumer waits up to 1.5 s per fetch, and Tansu holds a fetch for about half of
    # that even when records arrive: each utterance then waited ~0.4 s (median) before the worker
    # saw it. INTENT_CONSUMER_FETCH_MAX_WAIT_S (0.1 s) bounds that wait.
    async def latencies(n: int) -> list[float]:
        consumer = AIOKafkaConsumer(
            INTENTS, bootstrap_servers=worker.kafka, group_id=None, fetch_max_wait_ms=20
        )  # the test's own consumer must not hold its fetches either
        producer = AIOKafkaProducer(bootstrap_servers=worker.kafka, acks="all")
        await consumer.start()
        await producer.start()
        sent: dict[bytes, float] = {}
        arrived: dict[bytes, float] = {}
        try:
            await consumer.getmany(timeout_ms=200)  # at the end of the topic before the first send
            for i in range(n):
                key, value = utterance(f"quick-{i}", "set an alarm for 7am")
                sent[key] = time.monotonic()
                await (await producer.send(UTTERANCES, value, key=key))
                deadline = time.monotonic() + 10
                while key not in arrived and time.monotonic() < deadline:
                    for batch in (await consumer.getmany(timeout_ms=50)).values():
                        for record in batch:
                            arrived.setdefault(record.key, time.monotonic())
        finally:
            await producer.stop()
            await consumer.stop()
        assert set(sent) <= set(arrived)
        return sorted(arrived[key] - sent[key] for key in sent)

    seconds = asyncio.run(latencies(15))
    assert seconds[len(seconds) // 2] < 0.25, seconds


def test_every_bad_input_is_labelled_or_dead_lettered_and_the_worker_carries_on(
    worker: WorkerProcess,
) -> None:
    huge = json.dumps({"id": "bad-huge", "text": "a" * 1_000_000}).encode()
    bad = {
        b"bad-json": (b'{"id": "bad-json", "text": "unterminated', "not valid JSON", "not_json"),
        b"bad-utf8": (b'{"id": "bad-utf8", "text": "caf\xe9"}', "not valid UTF-8", "not_utf8"),
        b"bad-missing": (b'{"id": "bad-missing", "locale": "en"}', "field 'text' is missing", "text_missing"),
        b"bad-type": (
            b'{"id": "bad-type", "text": ["a", "list"]}',
            "field 'text' must be a string",
            "text_wrong_type",
        ),
        b"bad-empty": (b'{"id": "bad-empty", "text": ""}', "field 'text' is empty", "text_empty"),
        b"bad-huge": (huge, "has 1000000 characters", "text_too_long"),
        b"bad-null-id": (b'{"id": null, "text": "set an alarm"}', "field 'id' is null", "id_null"),
    }
    extra = json.dumps(
        {"id": "extra-fields", "text": "set an alarm for 7am", "colour": "blue", "nested": {"a": [1]}}
    ).encode()
    after = utterance("after-the-bad-ones", "turn off the lights in the kitchen")
    produce(
        worker.kafka,
        UTTERANCES,
        [(key, raw) for key, (raw, _, _) in bad.items()] + [(b"extra-fields", extra), after],
    )

    letters = consume(
        worker.kafka, [DEAD_LETTERS], lambda rs: set(bad) <= {r.key for r in rs if r.key}, timeout_s=60
    )
    by_key = {record.key: DeadLetter.from_json_bytes(record.value) for record in letters if record.key in bad}
    assert set(by_key) == set(bad)
    for key, (raw, message, _) in bad.items():
        letter = by_key[key]
        assert message in letter.error_message, (key, letter.error_message)
        assert (letter.topic, letter.stage.value, letter.error_type) == (UTTERANCES, "decode", "BadInput")
        assert letter.original_size == len(raw)
        assert raw.startswith(letter.original()) and letter.original_truncated == (
            len(raw) > len(letter.original())
        )
        assert base64.b64decode(letter.original_key_base64 or "") == key
    assert by_key[b"bad-huge"].original_truncated

    found = intents_by_id(worker.kafka, {"extra-fields", "after-the-bad-ones"})
    assert [i.label for i in found["extra-fields"]] == ["Action"]
    assert [i.label for i in found["after-the-bad-ones"]] == ["Action"]
    intent_ids = {r.key for r in consume(worker.kafka, [INTENTS], lambda rs: False, timeout_s=1.0)}
    assert not intent_ids & set(bad)  # none of the bad ones was labelled too

    assert worker.alive() and worker.get("/health")[0] == 200
    metrics = worker.metrics()
    for _, _, reason in bad.values():
        assert metrics[f'intent_worker_dead_letters_total{{reason="{reason}",stage="decode"}}'] >= 1


def test_samples_land_in_the_redis_buffer(worker: WorkerProcess, redis_service: EmbeddedService) -> None:
    sent = {f"sample-{i}": f"set an alarm for {i} minutes past {i % 12 + 1}" for i in range(30)}
    produce(worker.kafka, UTTERANCES, [utterance(uid, text) for uid, text in sent.items()])
    intents_by_id(worker.kafka, set(sent))
    prefix = worker.env["INTENT_REDIS_KEY_PREFIX"]
    client = Redis.from_url(redis_service.url)
    try:
        samples: list[BufferSample] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entries = client.xrange(buffer_key(prefix))
            samples = [BufferSample.from_json_bytes(fields[BUFFER_FIELD.encode()]) for _, fields in entries]
            if set(sent) <= {s.id for s in samples}:
                break
            time.sleep(0.2)
    finally:
        client.close()
    ours = {s.id: s for s in samples if s.id in sent}
    assert set(ours) == set(sent)  # sampling rate 1: every distinct text is kept
    assert all(s.text == sent[s.id] and s.stratum == f"en|{s.label}" for s in ours.values())
    metrics = worker.metrics()
    assert metrics["intent_worker_samples_kept_total"] >= len(sent)
    assert metrics["intent_worker_buffer_length"] >= 0


def test_send_and_tail_find_the_running_worker_through_its_run_directory(worker: WorkerProcess) -> None:
    env = worker_env({"INTENT_RUN_DIR": str(worker.run_dir)})  # no INTENT_KAFKA_BOOTSTRAP
    sent = subprocess.run(
        [sys.executable, "-m", "worker.cli", "send", "set an alarm for 7am", "--locale", "en"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (uid,) = sent.stdout.split()
    intents_by_id(worker.kafka, {uid})
    tail = subprocess.run(
        [sys.executable, "-m", "worker.cli", "tail", "--from-beginning", "--timeout", "4", "--quiet"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    [line] = [line for line in tail.stdout.splitlines() if line.startswith(uid + "\t")]
    columns = line.split("\t")
    assert columns[1] == "Action" and columns[3] == "en" and columns[-1] == "set an alarm for 7am"


def test_labelling_goes_on_while_redis_is_down_and_sampling_resumes_after(
    broker: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    redis = start_redis(tmp_path / "valkey")
    port = redis.port
    extra = {**SAMPLE_EVERYTHING, "INTENT_REDIS_BREAKER_COOLDOWN_S": "0.5"}
    process = WorkerProcess(
        kafka=broker.bootstrap, redis=redis.url, run_dir=tmp_path / "run", group="outage",
        prefix="outage", student=student, partitions=PARTITIONS, extra=extra,
    )  # fmt: skip
    try:
        with process:
            process.wait_healthy()

            def round_(name: str, n: int) -> None:
                sent = {f"{name}-{i}": f"turn the volume up to {i} in {name}" for i in range(n)}
                produce(broker.bootstrap, UTTERANCES, [utterance(uid, text) for uid, text in sent.items()])
                found = intents_by_id(broker.bootstrap, set(sent))
                assert set(found) == set(sent)

            round_("before", 20)
            kept_before = process.metrics()["intent_worker_samples_kept_total"]
            assert kept_before >= 1

            redis.stop()
            round_("during", 200)
            metrics = process.metrics()
            dropped = sum(
                v for k, v in metrics.items() if k.startswith("intent_worker_samples_dropped_total")
            )
            assert dropped >= 1
            assert process.alive() and process.get("/health")[0] == 200

            redis = start_redis(tmp_path / "valkey", port=port)
            time.sleep(0.6)  # the breaker's cool-down
            round_("after", 50)
            deadline = time.monotonic() + 10
            while (
                process.metrics()["intent_worker_samples_kept_total"] <= kept_before
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            assert process.metrics()["intent_worker_samples_kept_total"] > kept_before
    finally:
        redis.stop()


def test_sigterm_finishes_commits_and_a_restart_labels_nothing_twice(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    total = 3_000
    ids = {f"u-{i}" for i in range(total)}
    produce(
        broker.bootstrap,
        UTTERANCES,
        [utterance(f"u-{i}", f"wake me up at {i % 12 + 1} o'clock {i}") for i in range(total)],
    )

    def start() -> WorkerProcess:
        return WorkerProcess(
            kafka=broker.bootstrap, redis=redis_service.url, run_dir=tmp_path / "run", group="restart",
            prefix=f"restart-{time.time_ns()}", student=student, partitions=PARTITIONS,
        ).start()  # fmt: skip

    first = start()
    with first:
        consume(broker.bootstrap, [INTENTS], lambda rs: len(rs) >= 300, timeout_s=60)
        assert first.terminate() == 0
    events = [e.get("event") for e in first.log_events()]
    assert "worker_stopped" in events and "classifier_failed" not in events
    # faust's, mode's and aiokafka's own INFO chatter (start, stop, ...) stays out of the log.
    chatter = [e for e in first.log_events() if "logger" in e and e.get("level") in ("debug", "info")]
    assert chatter == []
    labelled_first = consume(broker.bootstrap, [INTENTS], lambda rs: False, timeout_s=1.0)
    assert 300 <= len(labelled_first) < total  # stopped part-way

    with start() as second:
        records = consume(broker.bootstrap, [INTENTS], lambda rs: len(rs) >= total, timeout_s=120)
        time.sleep(1.0)
        records = consume(broker.bootstrap, [INTENTS], lambda rs: False, timeout_s=1.0)
        assert second.terminate() == 0
    counts = Counter(r.key.decode() for r in records if r.key)
    assert set(counts) == ids  # nothing lost
    assert [uid for uid, n in counts.items() if n > 1] == []  # nothing labelled twice: the stop committed


def test_an_output_the_broker_refuses_stops_the_worker_and_a_restart_loses_nothing(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    before = [utterance(f"before-{i}", f"play song number {i}") for i in range(20)]
    huge = (b"huge", json.dumps({"id": "huge", "text": "a" * 1_000_000}).encode())
    after = [utterance(f"after-{i}", f"play album number {i}") for i in range(20)]
    produce(broker.bootstrap, UTTERANCES, [*before, huge, *after])

    def worker(**extra: str) -> WorkerProcess:
        return WorkerProcess(
            kafka=broker.bootstrap, redis=redis_service.url, run_dir=tmp_path / "run", group="refused",
            prefix=f"refused-{time.time_ns()}", student=student, partitions=PARTITIONS, extra=extra,
        )  # fmt: skip

    # Keeping all of a 1 MB original, and allowing a dead letter of 4 MB, makes it larger than the
    # producer's request limit: the send fails, which is no bad input but an unexpected error.
    with worker(INTENT_DLQ_MAX_ORIGINAL_BYTES="4000000", INTENT_DLQ_MAX_MESSAGE_BYTES="4000000") as first:
        assert first.process is not None
        assert first.process.wait(timeout=60) == 1  # it stops by itself, promptly
    assert "classifier_failed" in [e.get("event") for e in first.log_events()]
    assert b"huge" not in {r.key for r in consume(broker.bootstrap, [DEAD_LETTERS], lambda rs: False, 1.0)}

    with worker() as second:
        ids = {key.decode() for key, _ in [*before, *after]}
        found = intents_by_id(broker.bootstrap, ids)
        letters = consume(broker.bootstrap, [DEAD_LETTERS], lambda rs: b"huge" in {r.key for r in rs}, 30)
        assert second.terminate() == 0
    assert set(found) == ids
    [letter] = [DeadLetter.from_json_bytes(r.value) for r in letters if r.key == b"huge"]
    assert letter.original_truncated and "1000000 characters" in letter.error_message


def test_two_workers_split_the_partitions_and_a_killed_ones_share_is_not_lost(
    broker: EmbeddedService, redis_service: EmbeddedService, tmp_path: Path, student: Path
) -> None:
    def worker(name: str) -> WorkerProcess:
        return WorkerProcess(
            kafka=broker.bootstrap, redis=redis_service.url, run_dir=tmp_path / name, group="pair",
            prefix=f"pair-{time.time_ns()}", student=student, partitions=PARTITIONS,
        )  # fmt: skip

    def partitions(process: WorkerProcess) -> list[str]:
        status, body = process.get("/health")
        return list(json.loads(body)["partitions"]) if status == 200 else []

    with worker("a") as a, worker("b") as b:
        a.wait_healthy()
        b.wait_healthy()
        deadline = time.monotonic() + 30
        while not (len(partitions(a)) == len(partitions(b)) == 1) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert sorted(partitions(a) + partitions(b)) == [f"{UTTERANCES}:{p}" for p in range(PARTITIONS)]

        total = 6_000
        ids = {f"p-{i}" for i in range(total)}
        produce(
            broker.bootstrap,
            UTTERANCES,
            [utterance(f"p-{i}", f"turn on the heating in room {i}") for i in range(total)],
        )
        consume(broker.bootstrap, [INTENTS], lambda rs: len(rs) >= 1_000, timeout_s=60)
        assert b.process is not None
        b.process.kill()  # SIGKILL: nothing is committed on the way out
        records = consume(
            broker.bootstrap,
            [INTENTS],
            lambda rs: ids <= {r.key.decode() for r in rs if r.key},
            timeout_s=120,
        )
        assert a.alive()
    assert {r.key.decode() for r in records if r.key} == ids  # duplicates allowed, losses not
