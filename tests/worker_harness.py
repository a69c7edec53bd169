"""Run the real ``intent-worker run`` as a subprocess against test services, and talk to Kafka.

The worker gets its settings through ``INTENT_*`` variables, as in production; nothing of the
test process's own environment that starts with ``INTENT_`` leaks into it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from worker.config import MODELS_DIR
from worker.connections import KafkaConnection, as_kafka
from worker.dev import harness
from worker.topics import INTENTS, UTTERANCES


def student_dir() -> Path:
    """The shipped student in models/student; its absence fails the test."""
    candidate = MODELS_DIR / "student"
    if not (candidate / "model.onnx").is_file():
        pytest.fail(f"no student to serve: {candidate} holds no model.onnx")
    return candidate


class WorkerProcess(harness.WorkerProcess):
    """The harness's worker with short broker sessions (it joins in about 2 s, and a stopped
    worker's partitions move in about 4 s); it is killed at the end of its ``with`` block, and
    anything that goes wrong with it fails the test, with its log."""

    settings: ClassVar[Mapping[str, str]] = {
        "INTENT_BROKER_SESSION_TIMEOUT_S": "3.0",
        "INTENT_BROKER_HEARTBEAT_INTERVAL_S": "0.8",
        "INTENT_COMMIT_INTERVAL_S": "0.5",
    }

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.alive():
            self.kill()

    def wait_healthy(self, timeout_s: float = 60.0) -> dict[str, object]:
        try:
            return super().wait_healthy(timeout_s)
        except harness.HarnessError as exc:
            pytest.fail(str(exc))

    def terminate(self, timeout_s: float = 30.0) -> int:
        code = super().terminate(timeout_s)
        if self.killed_after_timeout:
            pytest.fail(f"the worker did not stop within {timeout_s} s of SIGTERM:\n{self.log_tail()}")
        return code


# -- Kafka helpers -----------------------------------------------------------------------------------


def produce(kafka: str | KafkaConnection, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Send ``messages`` (key, value) and wait for every acknowledgement; a plain ``host:port``
    means PLAINTEXT, a `KafkaConnection` also TLS or SASL."""

    async def run() -> int:
        producer = AIOKafkaProducer(
            **as_kafka(kafka).aiokafka_kwargs(), acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024
        )
        try:
            await producer.start()  # inside: a refused start is stopped too
            acks = [await producer.send(topic, value, key=key) for key, value in messages]
            await asyncio.gather(*acks)
            return len(acks)
        finally:
            await producer.stop()

    return asyncio.run(run())


def consume(
    kafka: str | KafkaConnection,
    topics: Sequence[str],
    until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    timeout_s: float = 60.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topics`` from the start, until ``until(records)`` or the timeout."""

    async def run() -> list[ConsumerRecord[bytes, bytes]]:
        consumer = AIOKafkaConsumer(
            *topics,
            **as_kafka(kafka).aiokafka_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not until(records):
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
        finally:
            await consumer.stop()
        return records

    return asyncio.run(run())


def utterance(uid: str, text: str, locale: str | None = "en") -> tuple[bytes, bytes]:
    record: dict[str, object] = {"id": uid, "text": text}
    if locale is not None:
        record["locale"] = locale
    return uid.encode(), json.dumps(record).encode()


def send_and_await_labels(
    kafka: str | KafkaConnection, worker: WorkerProcess, prefix: str, text: str, n: int = 20
) -> list[tuple[bytes, bytes]]:
    """Send ``n`` utterances (``{prefix}-{i}``, ``text`` with ``{i}`` filled in) and wait until
    the worker has labelled every one, or fail with the end of its log; the (key, value) sent."""
    sent = [utterance(f"{prefix}-{i}", text.format(i=i)) for i in range(n)]
    produce(kafka, UTTERANCES, sent)
    want = {key for key, _ in sent}
    found = consume(kafka, [INTENTS], lambda rs: want <= {r.key for r in rs}, 60)
    assert want <= {r.key for r in found}, worker.log()[-3000:]
    return sent
