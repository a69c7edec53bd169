"""The person-facing Kafka clients (``send``, ``tail``) against a real Tansu broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from worker_harness import produce

from worker.dev.client import follow_intents
from worker.dev.services import start_kafka
from worker.schemas import Intent
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

pytestmark = pytest.mark.integration


def label(uid: str) -> tuple[bytes, bytes]:
    intent = Intent(
        id=uid,
        label="Action",
        scores={"Action": 0.9, "Other": 0.1},
        model_version="test",
        locale="en",
        latency_ms=1.0,
        timestamp=time.time(),
    )
    return uid.encode(), intent.to_json_bytes()


def test_tail_shows_only_the_labels_produced_after_it_started(tmp_path: Path) -> None:
    with start_kafka(tmp_path) as kafka:
        asyncio.run(create_topics(kafka.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 1)))
        # Two batches: Tansu 0.6 answers ListOffsets(latest) with the last batch's base offset + 1.
        produce(kafka.bootstrap, INTENTS, [label(f"old-{i}") for i in range(15)])
        produce(kafka.bootstrap, INTENTS, [label(f"old-{i}") for i in range(15, 30)])

        async def tail_then_send() -> list[str]:
            seen: list[str] = []
            tail = asyncio.create_task(
                follow_intents(
                    kafka.bootstrap, lambda intent, text, raw: seen.append(intent.id), count=1, timeout_s=30
                )
            )
            await asyncio.sleep(2.0)  # tail has joined and fetched by now
            producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
            await producer.start()
            try:
                key, value = label("new")
                await (await producer.send(INTENTS, value, key=key))
            finally:
                await producer.stop()
            await tail
            return seen

        assert asyncio.run(tail_then_send()) == ["new"]
