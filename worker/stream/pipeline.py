"""The micro-batch pipeline: decode, classify, emit, acknowledge, sample. No Faust in here.

One micro-batch goes through four steps:

1. **Decode** each raw message into an :class:`Utterance`; a bad one becomes a dead letter
   that keeps the original bytes.
2. **Classify** the texts with the student on a dedicated thread, so the event loop (and
   the consumer group's heartbeats and rebalances) never waits on inference.
3. **Emit** one ``intent.v1`` per utterance to ``intents`` (keyed by utterance id) and one
   ``dead_letter.v1`` per bad input to ``utterances.dlq``; then wait until the broker has
   acknowledged every one of them.
4. **Release** the batch's messages (the caller's callback acknowledges their offsets), and
   only then offer the predictions to the sampler, whose buffer writes run in the background.

Up to ``depth`` batches are in flight: batch N+1 is decoded and classified while batch N
waits for its acknowledgements. Inference runs in arrival order (one thread), and emission
waits for the previous batch, so outputs and releases keep the input order. A failure
anywhere propagates: the failed batch and every later one are never released, so their
offsets are never committed (at-least-once).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import structlog

from worker.config import PipelineSettings, default_of
from worker.errors import BadInput
from worker.models.student import Prediction
from worker.schemas import DLQ_MAX_KEY_BYTES, DeadLetter, DeadLetterStage, Intent, Utterance
from worker.stream.buffer import BufferSink
from worker.stream.metrics import WorkerMetrics
from worker.stream.sampling import DropReason, Sampler
from worker.topics import DEAD_LETTERS, INTENTS

log = structlog.get_logger(__name__)

#: Default of INTENT_DLQ_MAX_MESSAGE_BYTES: under the producer's 1,000,000-byte request limit.
DLQ_MAX_RECORD_BYTES: int = default_of(PipelineSettings, "dlq_max_message_bytes")


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed Kafka message, as the pipeline needs it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    received: float  # time.monotonic() when the consumer received it


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that could not be decoded, and its dead letter."""

    record: InputRecord
    letter: DeadLetter
    reason: str
    key: bytes | None  # the dead letter's own key: the input's, cut to INTENT_DLQ_MAX_KEY_BYTES


@dataclass(frozen=True)
class Decoded:
    """A micro-batch split into valid utterances and rejected messages."""

    utterances: list[tuple[InputRecord, Utterance]]
    rejected: list[Rejected]


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record for the broker: an ``intent.v1`` or a ``dead_letter.v1``."""

    topic: str
    key: bytes | None
    value: bytes


class Emitter(Protocol):
    """The producer edge: hand a batch's records over, in order; the awaitable resolves once the
    broker has acknowledged every one of them (and fails if any is refused)."""

    async def send_many(self, records: Sequence[OutputRecord]) -> Awaitable[object]: ...


#: The model edge: predictions for texts, in order, and the milliseconds it took. It runs on the
#: pipeline's executor thread (for the student: ``partial(classify_chunked, student=..., rows=...)``).
Classify = Callable[[Sequence[str]], tuple[list[Prediction], float]]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model being served: how to classify, and the version every output it makes carries."""

    classify: Classify
    version: str
    #: Stops what serves it (a child process), once no batch uses it any more.
    close: Callable[[], None] | None = None
    #: The label-set id every intent it makes carries (``Student.label_set``).
    label_set: str | None = None


def decode_batch(
    records: Sequence[InputRecord],
    *,
    max_text_chars: int,
    max_original_bytes: int,
    now: float,
    max_key_bytes: int = DLQ_MAX_KEY_BYTES,
    max_record_bytes: int = DLQ_MAX_RECORD_BYTES,
) -> Decoded:
    """Split ``records`` into utterances and dead letters (stage ``decode``).

    A dead letter never outgrows ``max_record_bytes`` (key + value), whatever the input's key,
    fields or value: one that did would be refused by the producer and stop every worker that
    meets it, on every restart (a poison pill).
    """
    utterances: list[tuple[InputRecord, Utterance]] = []
    rejected: list[Rejected] = []
    for record in records:
        try:
            if record.value is None:
                raise BadInput("utterance.v1: message has no value (a tombstone)", reason="no_value")
            utterances.append(
                (record, Utterance.from_json_bytes(record.value, max_text_chars=max_text_chars))
            )
        except BadInput as exc:
            letter = DeadLetter.from_failure(
                original=record.value,
                key=record.key,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                stage=DeadLetterStage.DECODE,
                error=exc,
                timestamp=now,
                max_original_bytes=max_original_bytes,
                max_key_bytes=max_key_bytes,
            )
            key = None if record.key is None else record.key[:max_key_bytes]
            letter = letter.within(max_record_bytes, key_bytes=len(key or b""))
            rejected.append(Rejected(record, letter, exc.reason, key))
    return Decoded(utterances, rejected)


class PipelineOptions(PipelineSettings):
    """The pipeline's knobs: :class:`worker.config.PipelineSettings` (``settings.pipeline``)."""


class Pipeline:
    """Runs micro-batches through decode → classify → emit → release → sample."""

    def __init__(
        self,
        classify: Classify,
        model_version: str,
        emitter: Emitter,
        executor: Executor,
        *,
        sampler: Sampler,
        sink: BufferSink,
        metrics: WorkerMetrics,
        options: PipelineOptions,
        close_model: Callable[[], None] | None = None,
        label_set: str | None = None,
    ) -> None:
        #: Swapped whole by :meth:`swap`; a batch takes the one in force when it is submitted, so
        #: it is classified, labelled and sampled by one model even when a new one arrives.
        self.model = ServedModel(classify, model_version, close_model, label_set)
        self.emitter = emitter
        self.executor = executor
        self.sampler = sampler
        self.sink = sink
        self.metrics = metrics
        self.options = options
        self._inflight: deque[asyncio.Task[None]] = deque()
        self._writes: set[asyncio.Task[int]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        #: The first failure of a batch; ``on_failure`` hears of it at once (not at the next submit).
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None

    @property
    def model_version(self) -> str:
        return self.model.version

    def swap(
        self,
        classify: Classify,
        version: str,
        close: Callable[[], None] | None = None,
        label_set: str | None = None,
    ) -> str:
        """Serve a new model from the next batch on; returns the version it replaces.

        The old model is closed once every batch submitted before the swap has finished. A new
        label set takes effect with the model: a batch's intents all carry the one it ran with.
        """
        old, self.model = self.model, ServedModel(classify, version, close, label_set)
        if old.close is not None:
            task = asyncio.create_task(self._retire(old.close, [t for t in self._inflight if not t.done()]))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return old.version

    async def _retire(self, close: Callable[[], None], users: list[asyncio.Task[None]]) -> None:
        if users:
            await asyncio.wait(users)
        await asyncio.to_thread(close)

    def close_model(self) -> None:
        """Close the model being served (at the very end: no batch may be submitted after this)."""
        if self.model.close is not None:
            self.model.close()

    @property
    def inflight(self) -> int:
        """Batches not finished yet."""
        return sum(not task.done() for task in self._inflight)

    async def submit(self, records: Sequence[InputRecord], release: Callable[[], None]) -> None:
        """Start a micro-batch; waits while ``depth`` batches are in flight.

        ``release`` is called once every output of the batch is acknowledged by the broker. The
        first failure of an earlier batch is raised here.
        """
        self._reap()
        while len(self._inflight) >= self.options.max_inflight_batches:
            await asyncio.wait({self._inflight[0]})
            self._reap()
        self.metrics.utterances.inc(len(records))
        self.metrics.batch_size.observe(len(records))
        previous = self._inflight[-1] if self._inflight else None
        task = asyncio.create_task(self._process(list(records), release, previous, self.model))
        task.add_done_callback(self._batch_done)
        self._inflight.append(task)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is None or self.failure is not None:
            return
        self.failure = error
        if self.on_failure is not None:
            self.on_failure(error)

    def _reap(self) -> None:
        while self._inflight and self._inflight[0].done():
            task = self._inflight.popleft()
            if task.cancelled():
                raise asyncio.CancelledError("a micro-batch was cancelled")
            error = task.exception()
            if error is not None:
                raise error

    async def drain(self) -> None:
        """Wait for every batch in flight; raise the first failure."""
        while self._inflight:
            await asyncio.wait({self._inflight[0]})
            self._reap()

    async def close(self) -> None:
        """Cancel the batches still in flight (never released: redone after a restart); finish writes."""
        for task in self._inflight:
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._inflight.clear()
        await asyncio.gather(*self._writes, *self._retiring, return_exceptions=True)

    async def _process(
        self,
        records: list[InputRecord],
        release: Callable[[], None],
        previous: asyncio.Task[None] | None,
        model: ServedModel,
    ) -> None:
        decoded = decode_batch(
            records,
            max_text_chars=self.options.max_text_chars,
            max_original_bytes=self.options.dlq_max_original_bytes,
            now=time.time(),
            max_key_bytes=self.options.dlq_max_key_bytes,
            max_record_bytes=self.options.dlq_max_message_bytes,
        )
        texts = [utterance.text for _, utterance in decoded.utterances]
        predictions: list[Prediction] = []
        if texts:
            loop = asyncio.get_running_loop()
            predictions, elapsed_ms = await loop.run_in_executor(self.executor, model.classify, texts)
            self.metrics.inference_seconds.observe(elapsed_ms / 1000)
        if previous is not None:
            await previous  # emit and release in input order; a failed predecessor fails this batch
        await self._emit(decoded, predictions, model)
        release()
        self._count(decoded, predictions)
        self._sample(decoded, predictions, model.version)

    async def _emit(self, decoded: Decoded, predictions: Sequence[Prediction], model: ServedModel) -> None:
        """Hand every output to the producer, then wait for all the broker's acks at once."""
        now = time.time()
        outputs = [
            OutputRecord(
                INTENTS,
                utterance.id.encode("utf-8"),
                Intent(
                    id=utterance.id,
                    label=prediction.label,
                    scores=prediction.scores,
                    model_version=model.version,
                    locale=utterance.locale,
                    latency_ms=round(max(0.0, time.monotonic() - record.received) * 1000, 3),
                    timestamp=now,
                    label_set=model.label_set,
                ).to_json_bytes(),
            )
            for (record, utterance), prediction in zip(decoded.utterances, predictions, strict=True)
        ]
        for rejected in decoded.rejected:
            log.info(
                "dead_lettered",
                topic=rejected.record.topic,
                partition=rejected.record.partition,
                offset=rejected.record.offset,
                stage=rejected.letter.stage.value,
                reason=rejected.reason,
                error=rejected.letter.error_message[:300],
            )
            outputs.append(OutputRecord(DEAD_LETTERS, rejected.key, rejected.letter.to_json_bytes()))
        if outputs:
            await (await self.emitter.send_many(outputs))

    def _count(self, decoded: Decoded, predictions: Sequence[Prediction]) -> None:
        now = time.monotonic()
        for (record, _), prediction in zip(decoded.utterances, predictions, strict=True):
            self.metrics.labels.labels(prediction.label).inc()
            self.metrics.latency_seconds.observe(max(0.0, now - record.received))
        for rejected in decoded.rejected:
            self.metrics.dead_letters.labels(rejected.letter.stage.value, rejected.reason).inc()

    def _sample(self, decoded: Decoded, predictions: Sequence[Prediction], version: str) -> None:
        """Choose samples now; store them in the background, or drop them when writes pile up."""
        if not predictions:
            return
        samples = self.sampler.select(
            [utterance for _, utterance in decoded.utterances],
            predictions,
            model_version=version,
            now=time.time(),
        )
        if not samples:
            return
        if len(self._writes) >= self.options.buffer_max_pending_writes:
            self.sink.counters.drop(DropReason.BACKLOG, len(samples))
            return
        task = asyncio.create_task(self.sink.write(samples))
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[int]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the sink counts Redis errors itself
            log.error("buffer_write_failed", error=repr(task.exception()))
