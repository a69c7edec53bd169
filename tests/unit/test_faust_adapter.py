"""Contract tests: one per faust/aiokafka internal that ``worker/stream/faust_adapter/`` uses.

Each asserts the behaviour the worker relies on, against the installed libraries, without a
broker (the started producer is checked against a real one in
``tests/integration/test_raw_producer_contract.py``). A failure here after an upgrade means the
adapter needs a review before the worker can be trusted with its offsets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import pytest
from faust.events import Event
from faust.exceptions import NotReady
from faust.types import TP
from faust.types.tuples import Message

from worker.stream import faust_adapter


def on_new_app(check: Callable[[faust.App], Awaitable[None]]) -> None:
    """Run ``check`` on a fresh, never started app, inside an event loop (as the worker does)."""

    async def run() -> None:
        app = faust.App("contract", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
        try:
            await check(app)
        finally:
            if app._consumer is not None:  # made on first use; its thread's loop is never started
                app._consumer._thread.thread_loop.close()

    asyncio.run(run())


def delivered(app: faust.App, offset: int) -> Event[Any]:
    """An event as faust's conductor hands it to the one stream that subscribes to its topic."""
    message = Message("utterances", 0, offset, 0.0, 0, None, b"k", b"v", None)
    message.refcount = 1  # the conductor: one per subscribed stream
    return Event(app, b"k", b"v", {}, message)


class OutSensor(faust.Sensor):
    def __init__(self) -> None:
        super().__init__()
        self.out: list[tuple[TP, int]] = []

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        self.out.append((tp, offset))


def test_a_held_message_survives_the_streams_acknowledgement() -> None:
    """``incref`` + ``Event.ack``: take_events' ack does not make the message final."""

    async def check(app: faust.App) -> None:
        event = delivered(app, 7)
        faust_adapter.hold([event])
        assert event.ack() is False  # what take_events does after each batch
        assert event.message.acked is False

    on_new_app(check)


def test_release_makes_the_message_final_and_tells_the_sensors() -> None:
    """The final ``Event.ack`` marks the message acked, and ``sensors.on_message_out`` sees it once."""

    async def check(app: faust.App) -> None:
        sensor = OutSensor()
        app.sensors.add(sensor)
        event = delivered(app, 7)
        faust_adapter.hold([event])
        event.ack()
        faust_adapter.release(app, [event])
        assert event.message.acked is True
        assert sensor.out == [(TP("utterances", 0), 7)]
        faust_adapter.release(app, [event])  # a second release changes nothing
        assert sensor.out == [(TP("utterances", 0), 7)]

    on_new_app(check)


def test_the_raw_producer_is_faust_s_own_and_not_ready_before_start() -> None:
    """``Producer._ensure_producer`` exists and refuses before the app's producer started."""

    async def check(app: faust.App) -> None:
        with pytest.raises(NotReady):
            faust_adapter.raw_producer(app)

    on_new_app(check)


def test_the_worker_consumer_gets_the_configured_fetch_wait() -> None:
    """``_create_worker_consumer`` still builds an aiokafka consumer with ``_fetch_max_wait_ms``."""

    async def check(app: faust.App) -> None:
        faust_adapter.use_fetch_wait(app, 0.05)

        def ignore(*args: object) -> None:
            return None

        consumer = app.transport.Consumer(
            app.transport, callback=ignore, on_partitions_revoked=ignore, on_partitions_assigned=ignore
        )
        thread = consumer._thread  # type: ignore[attr-defined]
        worker_consumer = thread._create_worker_consumer(app.transport)
        try:
            assert worker_consumer._fetch_max_wait_ms == 50
        finally:
            await worker_consumer.stop()
            thread.thread_loop.close()

    on_new_app(check)


def test_the_monitor_tracks_end_and_committed_offsets() -> None:
    """``app.monitor.tp_end_offsets`` / ``tp_committed_offsets``: per-partition offset maps."""

    async def check(app: faust.App) -> None:
        app.monitor.on_tp_commit({TP("utterances", 0): 5})
        ends, committed = faust_adapter.monitor_offsets(app)
        assert dict(ends) == {}
        assert dict(committed) == {TP("utterances", 0): 5}

    on_new_app(check)
