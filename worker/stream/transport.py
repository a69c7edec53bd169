"""Faust's aiokafka transport with the one consumer knob faust does not expose: the fetch wait.

faust-streaming 0.15 builds its worker consumer with ``fetch_max_wait_ms=1500``. A broker may
hold a fetch for that long when no records are waiting; Tansu 0.6 also keeps holding it after
records arrive (measured: about half the wait), so at low rates every utterance waited up to
~750 ms before the worker saw it (p50 end-to-end ~420 ms at 500/s, of which ~40 ms in the
worker). A short wait costs only idle fetches: one per partition leader per wait.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

# Under "faust", whose INFO chatter the worker's logging config keeps quiet (mode would name them
# after this module otherwise, and log every start and stop at INFO).
_LOGGER = logging.getLogger(f"faust.{__name__}")


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    logger = _LOGGER

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # read by AIOKafkaConsumer.start() for its Fetcher
            raise RuntimeError(
                "aiokafka's consumer no longer has _fetch_max_wait_ms: update worker/stream/transport.py"
            )
        consumer._fetch_max_wait_ms = getattr(transport, "fetch_max_wait_ms", consumer._fetch_max_wait_ms)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    logger = _LOGGER

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class KafkaTransport(faust_aiokafka.Transport):
    """faust's ``kafka://`` transport whose consumers wait at most ``fetch_max_wait_ms`` per fetch."""

    Consumer = _Consumer

    def __init__(
        self,
        url: Any,
        app: faust.App,
        *,
        fetch_max_wait_ms: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(url, app, loop=loop)
        self.fetch_max_wait_ms = fetch_max_wait_ms


def use_fetch_wait(app: faust.App, fetch_max_wait_s: float) -> None:
    """Give ``app`` a consumer transport with this fetch wait; call before the app makes topics."""
    app.transport = KafkaTransport(
        app.conf.broker_consumer, app, fetch_max_wait_ms=max(1, round(fetch_max_wait_s * 1000))
    )
