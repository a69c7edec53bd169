"""Plumbing of the worker benchmarks: data, brokers, topic offsets, worker processes, statistics.

Everything talks to services on loopback only, and every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from worker.dev.services import EmbeddedService, start_kafka
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

ROOT = Path(__file__).resolve().parent.parent

WORKER_TOPICS = (UTTERANCES, INTENTS, DEAD_LETTERS)
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # room for the 1 MB bad inputs


# -- Data --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    id: str
    text: str
    locale: str


def shared_texts(shared: Path) -> list[tuple[str, str]]:
    """(text, locale) of every MASSIVE and Tatoeba row in ``shared`` (read in place)."""
    files = [*sorted((shared / "massive").glob("*.jsonl")), shared / "tatoeba" / "tatoeba.jsonl"]
    rows = []
    for path in files:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                rows.append((str(record["text"]), str(record.get("locale") or "")))
    if not rows:
        raise SystemExit(f"no MASSIVE/Tatoeba texts under {shared}")
    return rows


def cycled(rows: Sequence[tuple[str, str]], n: int, prefix: str) -> list[Text]:
    """``n`` texts cycling through ``rows``, each with a unique id."""
    return [
        Text(f"{prefix}-{i}", text, locale)
        for i, (text, locale) in zip(range(n), itertools.cycle(rows), strict=False)
    ]


def utterance_bytes(item: Text, timestamp: float | None = None) -> bytes:
    record: dict[str, object] = {"id": item.id, "text": item.text}
    if item.locale:
        record["locale"] = item.locale
    if timestamp is not None:
        record["timestamp"] = timestamp
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


# -- Kafka -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def broker(directory: Path, partitions: int, extra_topics: Sequence[str] = ()) -> Iterator[EmbeddedService]:
    """A fresh Tansu broker with the worker's topics (and ``extra_topics``) created."""
    with start_kafka(directory) as service:
        topics = dict.fromkeys((*WORKER_TOPICS, *extra_topics), partitions)
        asyncio.run(create_topics(service.bootstrap, topics))
        yield service


def new_producer(bootstrap: str, *, linger_ms: int = 10) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        max_request_size=MAX_REQUEST_BYTES,
    )


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]
) -> tuple[int, float]:
    """Produce as fast as the broker takes them; (count, messages per second)."""
    producer = new_producer(bootstrap)
    await producer.start()
    started = time.perf_counter()
    n = 0
    try:
        pending = []
        for key, value in messages:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                n += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        n += len(pending)
    finally:
        await producer.stop()
    return n, n / max(time.perf_counter() - started, 1e-9)


async def produce_at_rate(
    bootstrap: str,
    items: Sequence[Text],
    rate: float,
    *,
    sent_at: dict[str, float] | None = None,
    linger_ms: int = 0,
) -> float:
    """Produce ``items`` to ``utterances`` at ``rate`` per second; returns the achieved rate.

    ``sent_at`` receives each id's wall-clock time just before its send (the latency start).
    """
    producer = new_producer(bootstrap, linger_ms=linger_ms)
    await producer.start()
    started = time.monotonic()
    try:
        pending = []
        for index, item in enumerate(items):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            if sent_at is not None:
                sent_at[item.id] = now
            pending.append(await producer.send(UTTERANCES, utterance_bytes(item, now), key=item.id.encode()))
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(items) / max(time.monotonic() - started, 1e-9)


class TopicWatch:
    """End offsets of a topic, read without joining any consumer group.

    They are the high watermarks of fetch responses, not ListOffsets(latest): Tansu 0.6 answers
    that with a far smaller offset than the partition's end (1 for a partition of 750 records).
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=1024,  # the records themselves are not wanted
        )
        self.partitions: list[TopicPartition] = []
        self._ends: dict[TopicPartition, int] = {}

    async def __aenter__(self) -> Self:
        await self.consumer.start()
        ids = self.consumer.partitions_for_topic(self.topic)
        if not ids:
            await self.consumer.stop()
            raise RuntimeError(f"topic {self.topic!r} has no partitions on {self.bootstrap}")
        self.partitions = [TopicPartition(self.topic, p) for p in sorted(ids)]
        self.consumer.assign(self.partitions)
        self.consumer.pause(*self.partitions)  # fetched only while asked (unassigning hangs aiokafka's stop)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.consumer.stop()

    async def ends(self, timeout_s: float = 10.0) -> dict[int, int]:
        """Each partition's end offset, from a fetch response received after this call began."""
        asked_ms = time.time() * 1000
        self.consumer.resume(*self.partitions)
        try:
            for tp in self.partitions:
                self.consumer.seek(tp, max(0, self._ends.get(tp, 0) - 1))  # one record back: a short answer
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                await self.consumer.getmany(timeout_ms=100)
                fresh = all(
                    (self.consumer.last_poll_timestamp(tp) or 0) >= asked_ms for tp in self.partitions
                )
                if fresh:
                    break
            else:
                raise RuntimeError(
                    f"no fetch response for every partition of {self.topic!r} in {timeout_s} s"
                )
            self._ends = {tp: int(self.consumer.highwater(tp) or 0) for tp in self.partitions}
        finally:
            self.consumer.pause(*self.partitions)
        return {tp.partition: end for tp, end in self._ends.items()}

    async def wait_for(
        self, start: Mapping[int, int], n: int, timeout_s: float, *, alive: Callable[[], bool] | None = None
    ) -> int:
        """Poll until ``n`` records were appended since ``start``; returns how many were."""
        deadline = time.monotonic() + timeout_s
        appended = 0
        while time.monotonic() < deadline:
            exited = alive is not None and not alive()  # before reading: its last outputs count
            ends = await self.ends()
            appended = sum(ends[p] - start.get(p, 0) for p in ends)
            if appended >= n or exited:
                return appended
            await asyncio.sleep(0.5)
        return appended


async def topic_ends(bootstrap: str, topic: str) -> dict[int, int]:
    async with TopicWatch(bootstrap, topic) as watch:
        return await watch.ends()


async def read_topic(
    bootstrap: str, topic: str, start: Mapping[int, int] | None = None, *, timeout_s: float = 120.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from ``start`` (default: the beginning) to its current end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        async with TopicWatch(bootstrap, topic) as watch:
            ends = await watch.ends()
        for tp in partitions:
            consumer.seek(tp, (start or {}).get(tp.partition, 0))
        deadline = time.monotonic() + timeout_s
        remaining = {tp for tp in partitions if await consumer.position(tp) < ends[tp.partition]}
        while remaining and time.monotonic() < deadline:
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=20_000)
            for tp, batch in batches.items():
                records.extend(r for r in batch if r.offset < ends[tp.partition])
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp.partition]}
    finally:
        await consumer.stop()
    return records


def span_rate(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[str, float]:
    """Messages per second between the first and the last record's timestamp (set by their producer)."""
    stamps = sorted(r.timestamp for r in records)
    span_s = max((stamps[-1] - stamps[0]) / 1000, 1e-3)
    return {"per_s": round((len(stamps) - 1) / span_s, 1), "span_s": round(span_s, 3), "n": len(stamps)}


# -- A student without a model, to see what the worker costs besides inference ------------------------


def null_student(template: Path, out: Path) -> Path:
    """``template``'s tokenizer and labels with a trivial graph (logits from the mask's row sum).

    Serving it, the worker still tokenises, builds every output and samples, but spends almost
    nothing in onnxruntime: the difference to the real student is the cost of inference.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    labels = json.loads((template / "labels.json").read_text())
    count = len(labels["labels"] if isinstance(labels, dict) else labels)
    weights = numpy_helper.from_array(np.linspace(0.1, 0.2, count, dtype=np.float32)[None, :], "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["mask", "axes"], ["length"], keepdims=1),
            helper.make_node("MatMul", ["length", "w"], ["logits"]),
        ],
        "null_student",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", count])],
        initializer=[weights, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    for name in ("tokenizer.json", "labels.json"):
        shutil.copy(template / name, out / name)
    (out / "card.json").write_text(json.dumps({"version": "null-model", "note": null_student.__doc__}))
    return out


# -- Statistics ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
