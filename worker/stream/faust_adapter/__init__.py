"""Every call into faust's and aiokafka's internals, behind one door (this package; the Kafka
wire calls behind the commit stamps are in :mod:`.wire`).

The worker's at-least-once guarantee and its latency rest on behaviour that neither library
documents as API. Each function here names what it relies on, and
``tests/unit/test_faust_adapter.py`` holds one contract test per call, so an upgrade that
changes it fails there, loudly, instead of losing or redoing messages in production. The
dependency pins in ``pyproject.toml`` stop before the next minor version of both libraries.

- **Holding a message** (:func:`hold`, :func:`release`): faust commits a partition's offsets up
  to its first message whose reference count (``Message.refcount``) has not dropped to zero;
  ``Message.incref`` raises the count, ``Event.ack`` lowers it and answers whether this was the
  final acknowledgement, after which faust's own streams tell the sensors
  (``app.sensors.on_message_out``), and so do we.
- **The producer under faust** (:func:`raw_producer`): ``Producer._ensure_producer`` is the
  started ``aiokafka.AIOKafkaProducer``, for ``create_batch`` / ``send_batch``.
- **The fetch wait** (:class:`KafkaTransport`, :func:`use_fetch_wait`): faust builds its worker
  consumer in ``AIOKafkaConsumerThread._create_worker_consumer`` with ``fetch_max_wait_ms=1500``
  and no setting; aiokafka's consumer keeps it in ``_fetch_max_wait_ms`` until ``start()``.
- **Offsets faust's monitor tracks** (:func:`monitor_offsets`): ``app.monitor.tp_end_offsets``
  and ``tp_committed_offsets``, for the lag metric.
- **A log replaced under the consumer** (:func:`faust_offsets`, :func:`reset_partition`):
  faust's ``Consumer._read_offset`` (records below it are dropped as seen) and
  ``_committed_offset`` (acks below it ignored, commits only above it), ``_acked``,
  ``_acked_index``, ``_gap`` and ``_unacked_messages``; ``Message.acked``.
- **The identity of a log, stamped on every commit** (:func:`fence_commits`, :func:`topic_ids`,
  :func:`group_commits`, :func:`commit_offsets`): faust's ``AIOKafkaConsumerThread._commit``
  (commits each partition with empty metadata; replaced here by one that stamps it) and its
  ``tp_last_committed_at`` and ``crash``; the aiokafka client under the consumer
  (``AIOKafkaConsumer._client``, its ``send``, ``coordinator_lookup`` and ``get_random_node``)
  and its protocol classes (``Request``, ``RequestStruct``, ``Response``, ``Schema`` and
  types), with which the Metadata v10 request that answers topic ids is built here.
- **Broker liveness** (:func:`last_fetch_ms`): the aiokafka consumer under faust's consumer
  thread (``Consumer._thread._consumer``) and its ``last_poll_timestamp``.
- **Default web views** (:func:`serve_only_our_views`): ``Web.blueprints._enabled``, the
  blueprints faust mounts when its web server starts (``/``, ``/router``, ``/table``, ...).
- **Bounded shutdown** (:class:`BoundedShutdownWorker`): mode's ``Worker._on_sigterm`` and
  ``_on_sigint``, the handlers it installs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from time import monotonic
from typing import Any, cast

import faust
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from faust.exceptions import ConsumerNotStarted
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT

from worker.stream.faust_adapter.wire import NO_TOPIC_ID as NO_TOPIC_ID
from worker.stream.faust_adapter.wire import CommitFence as CommitFence
from worker.stream.faust_adapter.wire import GroupCommit as GroupCommit
from worker.stream.faust_adapter.wire import Stamp as Stamp
from worker.stream.faust_adapter.wire import _commit_group, _group_commits, _topic_ids

log = structlog.get_logger(__name__)

# Under "faust", whose INFO chatter the worker's logging config keeps quiet (mode would name them
# after this module otherwise, and log every start and stop at INFO).
_LOGGER = logging.getLogger(f"faust.{__name__}")


class AdapterError(RuntimeError):
    """faust or aiokafka no longer has what this module relies on: the upgrade needs a review."""


# -- holding messages until their outputs are acknowledged ------------------------------------


def hold(events: Sequence[EventT[Any]]) -> None:
    """Keep the messages un-acknowledged past ``take_events``' own acknowledgement."""
    for event in events:
        event.message.incref()


def release(app: faust.App, events: Sequence[EventT[Any]]) -> None:
    """Drop the hold: each message is now acknowledged, and its offset may be committed."""
    for event in events:
        message = event.message
        if event.ack():
            app.sensors.on_message_out(message.tp, message.offset, message)


# -- the aiokafka producer under faust's -------------------------------------------------------


def raw_producer(app: faust.App) -> AIOKafkaProducer:
    """The app's started aiokafka producer (faust starts, flushes and stops it with the app).

    Raises faust's ``NotReady`` before the app's producer has started.
    """
    return cast("AIOKafkaProducer", app.producer._ensure_producer())  # type: ignore[attr-defined]


# -- the consumer: its fetch wait, its commits ---------------------------------------------------


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    logger = _LOGGER

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """faust's commit, stamped (see :func:`fence_commits`); faust's own where no fence is set."""
        fence = getattr(self.transport, "commit_fence", None)
        if fence is None:
            return await super()._commit(offsets)
        try:
            return await self.commit_fenced(fence, offsets)
        except CommitFailedError as exc:
            if "already rebalanced" in str(exc):
                return False
            await self._commit_crashed(exc)
            return False
        except Exception as exc:  # as faust's own commit does: any other failure stops the worker
            await self._commit_crashed(exc)
            return False

    async def _commit_crashed(self, exc: BaseException) -> None:
        self.log.exception("Committing raised exception: %r (assignment %r)", exc, self.assignment())
        await self.crash(exc)

    async def commit_fenced(self, fence: CommitFence, offsets: Mapping[TP, int]) -> bool:
        """Commit those of ``offsets`` whose log the fence vouches for, each with its stamp.

        Runs in the consumer's thread. What the fence holds back is not committed (read again after
        a restart: duplicates, never losses); faust counts it as committed all the same, so the
        guard commits it once the fence lets it through (``fence.committed`` says what went
        through). Raises what the group's own commit raises.
        """
        consumer = self._ensure_consumer()
        assigned = self.assignment()
        wanted = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not wanted:
            return False
        try:
            ids = await _topic_ids(consumer._client, {tp.topic for tp in wanted})
        except KafkaError as exc:  # the broker is away: nothing is committed, and faust tries again
            log.debug(
                "commit_withheld",
                partitions=sorted(map(str, wanted)),
                reason="topic_ids_unknown",
                error=repr(exc),
            )
            return False
        unjudged = [tp for tp in fence.unjudged(wanted) if tp.topic in ids]
        if unjudged:  # the first commit since the partition came: judge what the broker holds first
            try:
                commits = await _group_commits(consumer._client, fence.group, unjudged)
                stamped = await _group_commits(consumer._client, fence.stamp_group, unjudged)
            except KafkaError as exc:
                log.debug("commit_withheld", partitions=sorted(map(str, unjudged)), error=repr(exc))
            else:
                for tp in unjudged:
                    fence.judge(tp, commits.get(tp), stamped.get(tp), ids[tp.topic])
        stamps = fence.stamps(wanted, ids)
        withheld = sorted(str(tp) for tp in wanted if tp not in stamps)
        if withheld:
            log.debug("commit_withheld", partitions=withheld, reason="log_not_vouched_for")
        if not stamps:
            return False
        numbered = {
            tp: GroupCommit(stamp.number, "") for tp, stamp in stamps.items() if stamp.number is not None
        }
        if numbered:
            try:
                await _commit_group(consumer._client, fence.stamp_group, numbered)
            except KafkaError as exc:  # the commit's metadata carries the stamp on brokers that keep it
                log.warning("commit_stamp_failed", group=fence.stamp_group, error=repr(exc))
        now = monotonic()
        self.tp_last_committed_at.update(dict.fromkeys(stamps, now))
        await consumer.commit(
            {
                faust_aiokafka.ensure_aiokafka_TP(tp): OffsetAndMetadata(wanted[tp], stamp.metadata)
                for tp, stamp in stamps.items()
            }
        )
        fence.committed({tp: wanted[tp] for tp in stamps})
        return True

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # read by AIOKafkaConsumer.start() for its Fetcher
            raise AdapterError(
                "aiokafka's consumer no longer has _fetch_max_wait_ms: update worker/stream/faust_adapter/"
            )
        consumer._fetch_max_wait_ms = getattr(transport, "fetch_max_wait_ms", consumer._fetch_max_wait_ms)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    logger = _LOGGER

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class KafkaTransport(faust_aiokafka.Transport):
    """faust's ``kafka://`` transport whose consumers wait at most ``fetch_max_wait_ms`` per fetch.

    faust's own wait is 1500 ms. A broker may hold a fetch that long when no records are waiting;
    Tansu 0.6 also keeps holding it after records arrive (measured: about half the wait), so at
    low rates every utterance waited up to ~750 ms before the worker saw it (p50 end-to-end
    ~420 ms at 500/s, of which ~40 ms in the worker). A short wait costs only idle fetches: one
    per partition leader per wait.
    """

    Consumer = _Consumer
    #: Set by :func:`fence_commits`: what the consumer's commits are stamped and fenced with.
    commit_fence: CommitFence | None = None

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


# -- offsets ---------------------------------------------------------------------------------


def monitor_offsets(app: faust.App) -> tuple[Mapping[TP, int], Mapping[TP, int]]:
    """(end offsets, committed offsets) per partition, as faust's monitor last saw them."""
    monitor = app.monitor
    return monitor.tp_end_offsets, monitor.tp_committed_offsets


# -- Issue 14: offsets past the log's end, broker liveness, web views, bounded shutdown ----------

#: What faust raises when the consumer (or its thread) is not started yet.
CONSUMER_NOT_READY = ConsumerNotStarted


def _aiokafka_consumer(app: faust.App) -> Any:
    """The aiokafka consumer under faust's consumer thread (None before it started)."""
    thread = getattr(app.consumer, "_thread", None)
    return None if thread is None else getattr(thread, "_consumer", None)


def faust_offsets(app: faust.App, tp: TP) -> tuple[int | None, int | None]:
    """faust's own (read, committed) offsets of ``tp``: records below ``read`` are dropped as
    already seen, and acknowledgements below ``committed`` ignored."""
    consumer = app.consumer
    return consumer._read_offset.get(tp), consumer._committed_offset.get(tp)  # type: ignore[attr-defined]


def log_end(app: faust.App, tp: TP) -> int | None:
    """The high watermark of ``tp`` in the last fetch response (None before the first)."""
    try:
        end = app.consumer.highwater(tp)
    except (AssertionError, IllegalStateError, ConsumerNotStarted):  # not assigned (any more)
        return None
    return None if end is None else int(end)


def last_fetch_ms(app: faust.App) -> float | None:
    """When the broker last answered a fetch of any held partition (epoch ms), or None."""
    consumer = _aiokafka_consumer(app)
    if consumer is None:
        return None
    stamps = []
    for tp in consumer.assignment():
        with contextlib.suppress(AssertionError, IllegalStateError):
            stamp = consumer.last_poll_timestamp(tp)
            if stamp:
                stamps.append(float(stamp))
    return max(stamps) if stamps else None


async def reset_partition(app: faust.App, tp: TP, offset: int) -> None:
    """Start ``tp`` over at ``offset`` of a replaced log (committed with the first acknowledged record).

    faust's bookkeeping of the old log goes: its read and committed offsets (else it drops
    the new log's records and ignores their acks), acknowledged offsets and gaps not committed,
    and the messages still in flight, which are marked acknowledged without being counted, so
    that finishing them never commits an old log's offset into the new one.
    """
    consumer = app.consumer
    for message in list(consumer._unacked_messages):  # type: ignore[attr-defined]
        if message.tp == tp:
            message.acked = True
            consumer._unacked_messages.discard(message)  # type: ignore[attr-defined]
    consumer._acked.pop(tp, None)  # type: ignore[attr-defined]
    consumer._acked_index.pop(tp, None)  # type: ignore[attr-defined]
    consumer._gap.pop(tp, None)  # type: ignore[attr-defined]
    consumer._committed_offset[tp] = None  # type: ignore[attr-defined]
    # Forgotten before the seek as well as after: records of the new log that arrive while the
    # seek is awaited (a fetch already in flight from the target) must not be dropped as read.
    consumer._read_offset[tp] = None  # type: ignore[attr-defined]
    await consumer.seek(tp, offset)
    consumer._read_offset[tp] = None  # type: ignore[attr-defined]


def _consumer_thread(app: faust.App) -> _ConsumerThread:
    thread = getattr(app.consumer, "_thread", None)
    if not isinstance(thread, _ConsumerThread):
        raise AdapterError("the app's consumer is not the adapter's: call use_fetch_wait first")
    return thread


def fence_commits(app: faust.App, fence: CommitFence) -> None:
    """Stamp and fence every commit of ``app``'s consumer with ``fence``: a partition is committed
    only while the fence vouches that faust's offsets of it belong to the log the broker holds
    now, with the log's stamp in the commit's metadata and in the fence's stamp group."""
    transport = app.transport
    if not isinstance(transport, KafkaTransport):
        raise AdapterError("commits can be fenced only on the adapter's transport: call use_fetch_wait first")
    transport.commit_fence = fence


async def topic_ids(app: faust.App, topics: Iterable[str]) -> dict[str, uuid.UUID]:
    """The broker's topic id of each of ``topics`` it knows (see :func:`_topic_ids`)."""
    thread = _consumer_thread(app)
    client = thread._ensure_consumer()._client
    return cast(dict[str, uuid.UUID], await thread.call_thread(_topic_ids, client, list(topics)))


async def group_commits(app: faust.App, group: str, tps: Iterable[TP]) -> dict[TP, GroupCommit]:
    """``group``'s commits of ``tps``, with their metadata (aiokafka's ``committed`` drops it)."""
    thread = _consumer_thread(app)
    client = thread._ensure_consumer()._client
    return cast(dict[TP, GroupCommit], await thread.call_thread(_group_commits, client, group, list(tps)))


def consumer_group(app: faust.App) -> str:
    """The group the app's consumer commits in (faust's app id)."""
    return str(app.conf.id)


async def commit_offsets(app: faust.App, offsets: Mapping[TP, int]) -> bool:
    """Commit ``offsets`` now, stamped and fenced like faust's own commits; False: none was
    committed (the fence held them back). Raises ``KafkaError`` where the commit failed."""
    thread = _consumer_thread(app)
    fence = cast(KafkaTransport, app.transport).commit_fence
    if fence is None:
        raise AdapterError("commit_offsets needs a fence: call fence_commits first")
    return cast(bool, await thread.call_thread(thread.commit_fenced, fence, dict(offsets)))


def serve_only_our_views(app: faust.App) -> None:
    """No faust default views: no index at ``/`` (it always answers OK), no ``/router``,
    ``/table``, ``/graph``, ``/stats``; only the pages the app registers itself."""
    app.web.blueprints._enabled.clear()


class BoundedShutdownWorker(faust.Worker):
    """faust's worker, whose stop on SIGTERM/SIGINT is bounded: a stop that takes longer than
    ``shutdown_timeout_s`` (a broker that is down makes aiokafka wait on every commit, flush and
    leave) is logged and ends the process with status 1; what was not committed is redone."""

    def __init__(self, *args: Any, shutdown_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._watchdog: threading.Timer | None = None

    def _arm(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Timer(self.shutdown_timeout_s, self._give_up)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _give_up(self) -> None:
        log.error("shutdown_timeout", after_s=self.shutdown_timeout_s)
        logging.shutdown()
        os._exit(1)

    def _on_sigterm(self) -> None:
        self._arm()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._arm()
        super()._on_sigint()
