"""The micro-batch pipeline with in-memory twins: what is emitted, and when a batch is released."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.models.student import Prediction
from worker.schemas import BufferSample, DeadLetter, Intent
from worker.stream.buffer import MemoryBufferSink
from worker.stream.metrics import WorkerMetrics
from worker.stream.pipeline import InputRecord, OutputRecord, Pipeline, PipelineOptions, decode_batch
from worker.stream.sampling import BufferCounters, DropReason, Sampler, SamplingPolicy
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

LABELS = ("Action", "Other", "Recall")


def keyword_classify(texts: Sequence[str]) -> tuple[list[Prediction], float]:
    """A stand-in student: 'alarm' is Action, 'yesterday' is Recall, the rest Other."""
    out = []
    for text in texts:
        label = "Action" if "alarm" in text else "Recall" if "yesterday" in text else "Other"
        scores = {name: 0.9 if name == label else 0.05 for name in LABELS}
        out.append(Prediction(label=label, scores=scores, margin=0.85, logits=(1.0, 0.0, 0.0)))
    return out, 0.1


class Emitter:
    """Records every send; the test decides when (and whether) the broker acknowledges."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.acks: list[asyncio.Future[object]] = []

    async def send_many(self, records: Sequence[OutputRecord]) -> Awaitable[object]:
        self.sent += [(r.topic, r.key, r.value) for r in records]
        ack: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack

    def acknowledge(self) -> None:
        for ack in self.acks:
            if not ack.done():
                ack.set_result(None)

    def fail(self, error: Exception) -> None:
        for ack in self.acks:
            if not ack.done():
                ack.set_exception(error)


def record(offset: int, value: bytes | None, key: bytes | None = None) -> InputRecord:
    return InputRecord(UTTERANCES, 0, offset, key, value, received=0.0)


def utterance(i: int, text: str) -> bytes:
    return json.dumps({"id": f"u{i}", "text": text, "locale": "en"}).encode()


def make_pipeline(
    emitter: Emitter, executor: ThreadPoolExecutor, *, sink: MemoryBufferSink | None = None, **options: int
) -> Pipeline:
    counters = sink.counters if sink is not None else BufferCounters()
    return Pipeline(
        keyword_classify,
        "test-model",
        emitter,
        executor,
        sampler=Sampler(
            SamplingPolicy(rate=1.0, budget_per_s=1e9, dedup_window_s=0),
            rng=random.Random(0),
            counters=counters,
        ),
        sink=sink if sink is not None else MemoryBufferSink(counters=counters),
        metrics=WorkerMetrics(),
        options=PipelineOptions(**options),
        label_set="three@1",
    )


async def settle(rounds: int = 200) -> None:
    """Let the pipeline's tasks and its inference thread run a while."""
    for _ in range(rounds):
        await asyncio.sleep(0.001)


BAD_INPUTS = {
    b"{not json": "not_json",
    b"\xff\xfe\x00garbage": "not_utf8",
    b'{"id": "b1"}': "text_missing",
    b'{"id": "b2", "text": 42}': "text_wrong_type",
    b'{"id": "b3", "text": "   "}': "text_empty",
    b'{"id": null, "text": "hello"}': "id_null",
    b"[1, 2]": "not_object",
}


def test_decode_keeps_valid_utterances_and_names_every_bad_one() -> None:
    long_text = json.dumps({"id": "b4", "text": "x" * 20_000}).encode()
    extra = b'{"id": "ok", "text": "set an alarm", "colour": "blue", "schema_version": 1}'
    records = [record(i, raw) for i, raw in enumerate([*BAD_INPUTS, long_text, extra, None])]
    decoded = decode_batch(records, max_text_chars=10_000, max_original_bytes=1_000, now=1.0)
    assert [u.id for _, u in decoded.utterances] == ["ok"]
    reasons = [r.reason for r in decoded.rejected]
    assert reasons == [*BAD_INPUTS.values(), "text_too_long", "no_value"]
    letter = decoded.rejected[1].letter
    assert letter.original() == b"\xff\xfe\x00garbage" and (letter.topic, letter.offset) == (UTTERANCES, 1)
    truncated = decoded.rejected[len(BAD_INPUTS)].letter
    assert truncated.original_truncated and truncated.original_size == len(long_text)


def test_outputs_are_keyed_by_id_and_the_batch_is_released_only_after_every_ack() -> None:
    async def scenario() -> None:
        emitter = Emitter()
        released: list[int] = []
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor)
            batch = [
                record(0, utterance(0, "set an alarm")),
                record(1, b"{bad", key=b"k1"),
                record(2, utterance(2, "what did I say yesterday")),
            ]
            await pipeline.submit(batch, lambda: released.append(1))
            await settle()
            assert len(emitter.sent) == 3 and released == []  # sent, not yet acknowledged
            emitter.acknowledge()
            await pipeline.drain()
            assert released == [1]
            await pipeline.close()
        intents = [
            (key, Intent.from_json_bytes(value)) for topic, key, value in emitter.sent if topic == INTENTS
        ]
        assert [(key, i.id, i.label, i.model_version) for key, i in intents] == [
            (b"u0", "u0", "Action", "test-model"),
            (b"u2", "u2", "Recall", "test-model"),
        ]
        [(_, key, value)] = [sent for sent in emitter.sent if sent[0] == DEAD_LETTERS]
        letter = DeadLetter.from_json_bytes(value)
        assert key == b"k1" and letter.original() == b"{bad" and letter.offset == 1

    asyncio.run(scenario())


def test_a_failed_ack_releases_neither_its_batch_nor_any_later_one() -> None:
    async def scenario() -> None:
        emitter = Emitter()
        released: list[str] = []
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor, max_inflight_batches=2)
            await pipeline.submit([record(0, utterance(0, "one"))], lambda: released.append("first"))
            await settle()
            emitter.fail(RuntimeError("broker said no"))
            await pipeline.submit([record(1, utterance(1, "two"))], lambda: released.append("second"))
            await settle()
            emitter.acknowledge()  # the second batch's outputs are acked, but it follows a failure
            with pytest.raises(RuntimeError, match="broker said no"):
                await pipeline.drain()
            await pipeline.close()
        assert released == []

    asyncio.run(scenario())


def test_batches_are_released_in_order_while_the_next_one_is_classified() -> None:
    async def scenario() -> None:
        emitter = Emitter()
        released: list[int] = []
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor, max_inflight_batches=3)
            for n in range(3):
                await pipeline.submit([record(n, utterance(n, f"text {n}"))], lambda n=n: released.append(n))
            await settle()
            assert len(emitter.sent) == 1  # batch 1 waits for batch 0 before it emits
            for _ in range(3):
                emitter.acknowledge()
                await settle()
            await pipeline.drain()
            await pipeline.close()
        assert released == [0, 1, 2]
        assert [key for _, key, _ in emitter.sent] == [b"u0", b"u1", b"u2"]

    asyncio.run(scenario())


class StuckSink(MemoryBufferSink):
    """A buffer whose writes hang until ``unblock`` is set (Redis hanging past every timeout)."""

    def __init__(self, counters: BufferCounters) -> None:
        super().__init__(counters=counters)
        self.unblock = asyncio.Event()

    async def write(self, samples: Sequence[BufferSample]) -> int:
        await self.unblock.wait()
        return await super().write(samples)


def test_samples_are_dropped_not_awaited_when_buffer_writes_pile_up() -> None:
    async def scenario() -> BufferCounters:
        emitter = Emitter()
        counters = BufferCounters()
        sink = StuckSink(counters)
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor, sink=sink, buffer_max_pending_writes=2)
            for n in range(5):
                await pipeline.submit([record(n, utterance(n, f"sample me {n}"))], lambda: None)
                await settle(rounds=20)
                emitter.acknowledge()
            await asyncio.wait_for(pipeline.drain(), 5)  # classification never waited on the buffer
            sink.unblock.set()
            await pipeline.close()
        return counters

    counters = asyncio.run(scenario())
    assert counters.selected == 5
    assert counters.dropped_by_reason == {DropReason.BACKLOG.value: 3}
    assert counters.kept == 2  # the two writes in flight finished once Redis answered


def test_a_failure_is_reported_at_once_not_at_the_next_batch() -> None:
    async def scenario() -> list[BaseException]:
        emitter = Emitter()
        heard: list[BaseException] = []
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor)
            pipeline.on_failure = heard.append
            await pipeline.submit([record(0, utterance(0, "one"))], lambda: None)
            await settle()
            emitter.fail(RuntimeError("broker said no"))
            await settle(rounds=5)
            await pipeline.close()
        return heard

    [failure] = asyncio.run(scenario())
    assert str(failure) == "broker said no"


def test_a_swap_mid_batch_leaves_that_batch_to_the_old_model_and_labels_each_output_with_its_version_and_label_set() -> (
    None
):
    def shouting(texts: Sequence[str]) -> tuple[list[Prediction], float]:
        predictions, ms = keyword_classify(texts)
        return [Prediction("Other", p.scores, p.margin, p.logits) for p in predictions], ms

    async def scenario() -> None:
        emitter = Emitter()
        sink = MemoryBufferSink()
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor, sink=sink)
            await pipeline.submit([record(0, utterance(0, "set an alarm"))], lambda: None)
            assert pipeline.swap(shouting, "new-model", label_set="four@1") == "test-model"  # batch 0 started
            await pipeline.submit([record(1, utterance(1, "set an alarm"))], lambda: None)
            while pipeline.inflight:  # batch 1 emits only once batch 0 is acknowledged
                await settle()
                emitter.acknowledge()
            await pipeline.drain()
            await settle()
            await pipeline.close()
        intents = [Intent.from_json_bytes(value) for topic, _, value in emitter.sent if topic == INTENTS]
        assert [(i.id, i.label, i.model_version, i.label_set) for i in intents] == [
            ("u0", "Action", "test-model", "three@1"),
            ("u1", "Other", "new-model", "four@1"),
        ]
        assert [(s.id, s.model_version) for s in sink.samples] == [("u0", "test-model"), ("u1", "new-model")]

    asyncio.run(scenario())


def test_a_swapped_out_model_is_closed_once_its_last_batch_is_done() -> None:
    closed: list[str] = []

    async def scenario() -> None:
        emitter = Emitter()
        with ThreadPoolExecutor(1) as executor:
            pipeline = make_pipeline(emitter, executor)
            pipeline.swap(keyword_classify, "first", close=lambda: closed.append("first"))
            await pipeline.submit([record(0, utterance(0, "set an alarm"))], lambda: None)
            pipeline.swap(keyword_classify, "second", close=lambda: closed.append("second"))
            await settle()
            assert closed == []  # batch 0, of the first model, waits for its acks
            emitter.acknowledge()
            await pipeline.drain()
            await settle()
            assert closed == ["first"]
            await pipeline.close()
            pipeline.close_model()
        assert closed == ["first", "second"]

    asyncio.run(scenario())
