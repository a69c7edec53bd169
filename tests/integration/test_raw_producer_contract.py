"""Contract test of ``faust_adapter.raw_producer`` on a started app, against a real Tansu broker.

The other internals the adapter uses are checked without a broker in
``tests/unit/test_faust_adapter.py``.
"""

from __future__ import annotations

import asyncio

import faust
import pytest
from aiokafka import AIOKafkaProducer

from worker.dev.services import EmbeddedService
from worker.stream import faust_adapter
from worker.stream.admin import create_topics

pytestmark = pytest.mark.integration


def test_the_raw_producer_is_the_started_aiokafka_producer_under_faust(
    kafka_service: EmbeddedService, unique_name: str
) -> None:
    """``Producer._ensure_producer``: the aiokafka producer faust started, which takes record batches."""

    async def run() -> int:
        await create_topics(kafka_service.bootstrap, {unique_name: 1})
        app = faust.App(
            unique_name, broker=f"kafka://{kafka_service.bootstrap}", autodiscover=False, web_enabled=False
        )
        await app.producer.start()
        try:
            producer = faust_adapter.raw_producer(app)
            assert isinstance(producer, AIOKafkaProducer)
            batch = producer.create_batch()
            batch.append(key=b"k", value=b"v", timestamp=None)
            ack = await producer.send_batch(batch, unique_name, partition=0)
            record = await ack
            return int(record.offset)
        finally:
            await app.producer.stop()

    assert asyncio.run(run()) == 0
