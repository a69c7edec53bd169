"""The offset guard's decision, and the faust/aiokafka internals it and /health rely on (one
contract test each: an upgrade that changes them fails here, not in production)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from mode import Worker as ModeWorker

from worker.stream.faust_adapter import BoundedShutdownWorker, serve_only_our_views
from worker.stream.offsets import OffsetResetPolicy, PartitionOffsets, reset_target


@pytest.mark.parametrize(
    ("offsets", "past"),
    [
        (PartitionOffsets(log_end=None, position=500, read=499, committed=500), False),  # no fetch yet
        (PartitionOffsets(log_end=500, position=500, read=499, committed=500), False),  # at the end
        (PartitionOffsets(log_end=3000, position=120, read=119, committed=100), False),  # behind: lag
        (PartitionOffsets(log_end=100, position=500, read=None, committed=None), True),  # Tansu restarted
        (
            PartitionOffsets(log_end=300, position=300, read=5999, committed=6000),
            True,
        ),  # Kafka reset silently
        (PartitionOffsets(log_end=None, position=0, read=1199, committed=1200), True),  # reset, no fetch yet
        (PartitionOffsets(log_end=2000, position=1500, read=1499, committed=1200), False),  # in flight
        (PartitionOffsets(log_end=2000, position=1200, read=1200, committed=1200), False),  # faust's seek
        (PartitionOffsets(log_end=0, position=0, read=None, committed=None), False),  # a new empty log
    ],
)
def test_past_the_end_means_the_log_was_replaced(offsets: PartitionOffsets, past: bool) -> None:
    assert offsets.past_the_end() is past


def test_the_policy_picks_the_start_or_the_end_of_the_new_log() -> None:
    assert reset_target(OffsetResetPolicy.EARLIEST, log_start=0, log_end=300) == 0
    assert reset_target(OffsetResetPolicy.LATEST, log_start=0, log_end=300) == 300


def on_new_app(check: Callable[[faust.App], None]) -> None:
    """Run ``check`` on a fresh, never started app, inside an event loop (as the worker does)."""

    async def run() -> None:
        app = faust.App("contract", broker="kafka://127.0.0.1:1", autodiscover=False)
        try:
            check(app)
        finally:
            if app._consumer is not None:  # made on first use; its thread's loop is never started
                app._consumer._thread.thread_loop.close()

    asyncio.run(run())


def test_faust_consumer_keeps_the_offsets_the_reset_clears() -> None:
    def check(app: faust.App) -> None:
        consumer = app.consumer
        for name in (
            "_read_offset",
            "_committed_offset",
            "_acked",
            "_acked_index",
            "_gap",
            "_unacked_messages",
        ):
            assert hasattr(consumer, name), name
        assert hasattr(consumer, "_thread") and hasattr(consumer._thread, "_consumer")
        assert inspect.iscoroutinefunction(consumer.seek)

    on_new_app(check)


def test_aiokafka_consumer_tells_when_a_partition_was_last_fetched() -> None:
    assert "partition" in inspect.signature(AIOKafkaConsumer.last_poll_timestamp).parameters
    assert callable(AIOKafkaConsumer.highwater)


def test_the_default_views_are_blueprints_we_can_drop() -> None:
    def check(app: faust.App) -> None:
        enabled = app.web.blueprints._enabled
        assert any(prefix == "/router" for prefix, _ in enabled)
        serve_only_our_views(app)
        assert app.web.blueprints._enabled == []

    on_new_app(check)


def test_mode_worker_has_the_signal_handlers_we_wrap() -> None:
    for name in ("_on_sigterm", "_on_sigint"):
        assert callable(getattr(ModeWorker, name))
        assert getattr(BoundedShutdownWorker, name) is not getattr(ModeWorker, name)
