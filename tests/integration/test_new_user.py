"""What a person trying the worker runs into, on real Tansu, valkey and worker processes.

Each test runs the ``intent-worker`` command line as a subprocess, as a person would, against
its own Tansu (the client commands use the fixed topic names).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from worker_harness import WorkerProcess, consume, produce

from worker.config import REPO_ROOT
from worker.dev.services import EmbeddedService, start_kafka
from worker.errors import BadInput
from worker.schemas import DeadLetter, DeadLetterStage, Utterance
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedService]:
    with start_kafka(tmp_path / "tansu") as service:
        asyncio.run(create_topics(service.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        yield service


def cli_env(bootstrap: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTENT_")}
    return {**env, "INTENT_KAFKA_BOOTSTRAP": bootstrap}


def cli(bootstrap: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=cli_env(bootstrap),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_tail(bootstrap: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "tail", *args],
            env=cli_env(bootstrap),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def stop_tail(tail: subprocess.Popen[bytes]) -> int:
    tail.send_signal(signal.SIGINT)
    return tail.wait(timeout=30)


def dead_letter(
    raw: bytes, key: bytes | None, offset: int, *, keep: int = 1 << 20
) -> tuple[bytes | None, bytes]:
    try:
        Utterance.from_json_bytes(raw)
    except BadInput as exc:
        error = exc
    else:
        raise AssertionError(f"{raw!r} is a valid utterance")
    letter = DeadLetter.from_failure(
        original=raw,
        key=key,
        topic=UTTERANCES,
        partition=1,
        offset=offset,
        stage=DeadLetterStage.DECODE,
        error=error,
        timestamp=time.time(),
        max_original_bytes=keep,
    )
    return key, letter.to_json_bytes()


NO_TEXT = b'{"id": "u-missing", "locale": "en"}'
NOT_JSON = b"book a table \xff"
LONG = b'{"id": "u-long", "text": "' + b"x" * 600 + b'"}'


def test_tail_dead_letters_shows_them_and_redrive_sends_back_the_original_bytes(
    broker: EmbeddedService,
) -> None:
    produce(
        broker.bootstrap,
        DEAD_LETTERS,
        [
            dead_letter(NO_TEXT, b"u-missing", 10),
            dead_letter(NOT_JSON, None, 11),
            dead_letter(b'{"id": "u-cut"}' + b" " * 600, b"u-cut", 12, keep=100),  # truncated
        ],
    )
    shown = cli(
        broker.bootstrap, "tail", "--dead-letters", "--from-beginning", "--count", "3", "--timeout", "30"
    )
    assert shown.returncode == 0, shown.stderr
    lines = sorted((line.split("\t") for line in shown.stdout.splitlines()), key=lambda c: c[1])
    assert [(c[1], c[2], c[3], c[4]) for c in lines] == [
        ("utterances:1:10", "decode", "text_missing", "u-missing"),
        ("utterances:1:11", "decode", "not_utf8", "-"),
        ("utterances:1:12", "decode", "text_missing", "u-cut"),  # stored with the letter
    ]
    assert "book a table" in lines[1][6]

    refused = cli(broker.bootstrap, "redrive")
    assert refused.returncode == 2 and "choose dead letters" in refused.stderr

    dry = cli(broker.bootstrap, "redrive", "--reason", "text_missing", "--dry-run")
    assert "would send 1 of 3" in dry.stderr, dry.stderr
    assert dry.returncode == 1 and "not sent: dlq:" in dry.stderr  # the truncated one cannot be

    sent = cli(broker.bootstrap, "redrive", "--reason", "text_missing", "--offset", "1:11")
    assert sent.returncode == 0, sent.stderr
    assert "sent 0 of 3" in sent.stderr  # both filters must hold: no letter is both

    sent = cli(
        broker.bootstrap, "redrive", "--id", "u-missing", "--offset", "utterances:1:11", "--offset", "1:10"
    )
    assert sent.returncode == 0 and "sent 1 of 3" in sent.stderr, sent.stderr
    records: list[ConsumerRecord[bytes, bytes]] = consume(
        broker.bootstrap, [UTTERANCES], lambda rs: len(rs) >= 1, timeout_s=30
    )
    assert [(r.key, r.value) for r in records] == [(b"u-missing", NO_TEXT)]

    everything = cli(broker.bootstrap, "redrive", "--all")
    assert everything.returncode == 1  # the truncated letter cannot be sent back, and it says so
    assert "sent 2 of 3" in everything.stderr and "kept only 100 of its" in everything.stderr
    records = consume(broker.bootstrap, [UTTERANCES], lambda rs: len(rs) >= 3, timeout_s=30)
    assert sorted(r.value for r in records) == sorted([NO_TEXT, NO_TEXT, NOT_JSON])


def test_tail_says_once_that_the_broker_is_gone_instead_of_a_flood(
    broker: EmbeddedService, tmp_path: Path
) -> None:
    log = tmp_path / "tail.err"
    tail = start_tail(broker.bootstrap, log)
    try:
        time.sleep(4)  # connected and fetching
        started = time.monotonic()
        broker.stop()
        stopped_s = time.monotonic() - started
        time.sleep(8)
    finally:
        assert stop_tail(tail) == 0
    text = log.read_text(errors="replace")
    # With a client connected, Tansu's SIGTERM waited 5 s and met our SIGKILL; SIGINT stops it at once.
    assert stopped_s < 2.0, stopped_s
    assert text.count("is not answering") == 1, text
    assert "Unable connect" not in text and "Traceback" not in text, text
    assert len(text.splitlines()) <= 3, text


def test_the_worker_logs_one_ready_line(
    broker: EmbeddedService, redis_service: EmbeddedService, student: Path, tmp_path: Path
) -> None:
    worker = WorkerProcess(
        kafka=broker.bootstrap,
        redis=redis_service.url,
        run_dir=tmp_path / "run",
        group="ready",
        prefix=f"ready-{time.time_ns()}",
        student=student,
        partitions=2,
    )
    with worker:
        worker.wait_healthy()
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "worker_ready" for e in worker.log_events()):
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.2)
        assert worker.terminate() == 0
    ready = [e for e in worker.log_events() if e.get("event") == "worker_ready"]
    assert len(ready) == 1
    assert ready[0]["group"] == "ready" and ready[0]["partitions"] == 2
    assert ready[0]["health"] == f"{worker.web}/health"
