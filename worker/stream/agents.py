"""The Faust agent: raw ``utterances`` in micro-batches through the :mod:`worker.stream.pipeline`.

**Raw bytes.** The agent's topic uses the ``raw`` serializers and decodes inside the
pipeline: faust acknowledges a message it fails to deserialize before any agent sees it,
which would lose it instead of dead-lettering it.

**When an offset may be committed.** Faust commits, per partition, the offsets of the
contiguous run of *acknowledged* messages (``Consumer._new_offset``), and a message is
acknowledged when its reference count drops to zero (``Message.ack``; the conductor sets it
to the number of subscribed streams, here 1). ``Stream.take_events`` acknowledges a batch
in the ``finally`` around its ``yield``: when the agent asks for the next batch, but also
when the generator is closed because the agent failed or was cancelled. That alone would
commit a batch whose outputs never reached the broker. So the agent *holds* every message
(``incref``) as soon as it receives the batch; take's acknowledgement then only drops the
count to 1, and the pipeline's ``release`` drops it to 0 once every output and dead letter
of the batch is acknowledged by the broker. A batch that fails is never released: its
offsets, and every later one of its partitions, stay uncommitted and are redone by the
next owner of the partition.

**Shutdown.** On SIGTERM, faust stops fetching and waits (``stream_wait_empty``) until every
message it delivered is acknowledged, committing as it goes, before it stops the agent:
the batches in flight finish, are released and committed, and the worker exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from functools import partial
from time import monotonic
from typing import Any, cast

import faust
import structlog
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP, EventT, StreamT
from mode import CrashingSupervisor

from worker.stream.faust_adapter import hold, raw_producer, release
from worker.stream.pipeline import InputRecord, OutputRecord, Pipeline
from worker.topics import UTTERANCES

log = structlog.get_logger(__name__)


@dataclass
class WorkerState:
    """What the health check reports: group membership, and a failure if one happened."""

    assigned: frozenset[TP] | None = None  # None until the first assignment
    failure: BaseException | None = None
    batches: int = 0


class BatchEmitter:
    """The pipeline's :class:`~worker.stream.pipeline.Emitter` on the app's aiokafka producer.

    A micro-batch's outputs go to the broker as one record batch per partition
    (``create_batch`` / ``send_batch``), keyed and partitioned exactly as a per-message
    ``send`` would (aiokafka's default partitioner: murmur2 of the key, as Kafka's Java
    clients do). Per-message sends cost a future, a partitioner call and an accumulator
    lookup each, plus faust's sensor bookkeeping: the single biggest share of the event
    loop's time per utterance.
    """

    def __init__(self, app: faust.App, *, batch_bytes: int) -> None:
        self.app = app
        self.partitioner = DefaultPartitioner()
        #: A record larger than this goes alone through the producer's ``send``, which checks it
        #: against the request size limit (a record batch is not checked before it is sent).
        self.batch_bytes = batch_bytes

    async def send_many(self, records: Sequence[OutputRecord]) -> Awaitable[object]:
        # faust exposes only its per-message send; the aiokafka producer under it is started
        # and stopped with the app (and flushed at shutdown) by faust itself.
        producer = raw_producer(self.app)
        partitions: dict[str, list[int]] = {}
        grouped: dict[tuple[str, int], list[OutputRecord]] = {}
        for record in records:
            ids = partitions.get(record.topic)
            if ids is None:
                ids = partitions[record.topic] = sorted(await producer.partitions_for(record.topic))
            partition = self.partitioner(record.key, ids, ids)
            grouped.setdefault((record.topic, partition), []).append(record)
        acks: list[asyncio.Future[object]] = []
        for (topic, partition), group in grouped.items():
            batch = producer.create_batch()
            for record in group:  # in order: a partition's records keep the input order
                if len(record.value) + len(record.key or b"") > self.batch_bytes:
                    if batch.record_count():
                        acks.append(await producer.send_batch(batch, topic, partition=partition))
                        batch = producer.create_batch()
                    acks.append(await producer.send(topic, record.value, record.key, partition=partition))
                elif batch.append(key=record.key, value=record.value, timestamp=None) is None:  # full
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=record.key, value=record.value, timestamp=None)
            if batch.record_count():
                acks.append(await producer.send_batch(batch, topic, partition=partition))
        return asyncio.gather(*acks)


def to_record(event: EventT[Any]) -> InputRecord:
    message = event.message
    return InputRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        received=message.time_in or monotonic(),
    )


def register_classifier(
    app: faust.App, pipeline: Pipeline, state: WorkerState, *, max_batch: int, max_wait_s: float
) -> None:
    """Add the ``classify`` agent on ``utterances`` to ``app``.

    An unexpected error crashes the whole worker (``CrashingSupervisor``), rather than faust's
    default of restarting the agent in-process past the failed batch; the process exits non-zero
    and its orchestrator restarts it from the committed offsets.
    """
    topic = app.topic(UTTERANCES, key_serializer="raw", value_serializer="raw")

    async def classify(stream: StreamT[bytes]) -> None:
        batches = cast("faust.Stream[bytes]", stream).take_events(max_batch, within=max_wait_s)
        # A batch fails in its own task, maybe while the agent waits for input: interrupt the wait.
        agent = asyncio.current_task()

        def interrupt(failure: BaseException) -> None:
            if agent is not None:
                agent.cancel()

        pipeline.on_failure = interrupt
        try:
            try:
                async for events in batches:
                    hold(events)
                    state.batches += 1
                    await pipeline.submit(
                        [to_record(event) for event in events], partial(release, app, events)
                    )
            except asyncio.CancelledError:
                if pipeline.failure is None:
                    raise  # faust is stopping the agent
                raise pipeline.failure from None
        except Exception as exc:
            state.failure = exc
            log.error("classifier_failed", error=repr(exc), exc_info=exc)
            raise
        finally:
            await pipeline.close()

    app.agent(topic, name="classify", supervisor_strategy=CrashingSupervisor)(classify)
