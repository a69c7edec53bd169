"""The worker's Prometheus metrics, in one registry per worker (``/metrics`` serves it).

Counters the pipeline updates as it goes are plain ``prometheus_client`` metrics. Values that
other objects already keep (the sampler's running totals, the buffer length, the consumer's
offsets) are read at scrape time by :class:`WorkerCollector`, so they are never stale copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.models.student import Student
from worker.models.student_process import StudentProcess
from worker.stream.sampling import BufferCounters

PREFIX = "intent_worker"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class PartitionLag:
    """How far one consumed partition's committed offset trails its end."""

    topic: str
    partition: int
    lag: int


class WorkerCollector(Collector):
    """Scrape-time metrics read from the objects that own them."""

    def __init__(
        self,
        counters: BufferCounters,
        buffer_length: Callable[[], int | None],
        lag: Callable[[], list[PartitionLag]],
    ) -> None:
        self.counters = counters
        self.buffer_length = buffer_length
        self.lag = lag

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            f"{PREFIX}_samples_selected",
            "Predictions the sampler chose for the buffer.",
            self.counters.selected,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_samples_kept", "Samples stored in the Redis buffer.", self.counters.kept
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_samples_dropped",
            "Selected samples that did not reach the buffer, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.counters.dropped_by_reason.items()):
            dropped.add_metric([reason], count)
        yield dropped
        length = self.buffer_length()
        if length is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_buffer_length", "Entries in the Redis buffer stream (last read).", length
            )
        lag = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag",
            "Messages between a partition's end and this worker's committed offset.",
            labels=["topic", "partition"],
        )
        for entry in self.lag():
            lag.add_metric([entry.topic, str(entry.partition)], entry.lag)
        yield lag


class ModelLoadCollector(Collector):
    """``intent_worker_model_loads_total``: students loaded, by the process holding the session;
    ``intent_worker_escalations_total``: utterances a cascade sent on to its second student.

    Read from the classes that load them, so a load anywhere in this process counts: ``worker``
    (this process, :class:`~worker.models.student.Student`) or ``inference`` (a child,
    :class:`~worker.models.student_process.StudentProcess`). With the inference process, one
    start or one hot reload adds one ``inference`` load and no ``worker`` load.
    """

    def collect(self) -> Iterator[Metric]:
        loads = CounterMetricFamily(
            f"{PREFIX}_model_loads",
            "Student models loaded (one ONNX session each), by process: worker (this one) or inference (a child).",
            labels=["process"],
        )
        loads.add_metric(["worker"], Student.loads)
        loads.add_metric(["inference"], StudentProcess.loads)
        yield loads
        escalations = CounterMetricFamily(
            f"{PREFIX}_escalations",
            "Utterances a cascade student sent on to its second student (0 unless a cascade is served).",
        )
        escalations.add_metric([], Student.escalations + StudentProcess.escalations)
        yield escalations


class WorkerMetrics:
    """Every metric of one worker, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.utterances = Counter(
            f"{PREFIX}_utterances", "Messages consumed from the input topic.", registry=r
        )
        self.labels = Counter(
            f"{PREFIX}_labels",
            "Intents produced and acknowledged by the broker, by label.",
            ["label"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters",
            "Inputs sent to the dead-letter topic, by stage and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Messages per micro-batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_seconds",
            "Student inference time per micro-batch (tokenise + onnxruntime).",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.latency_seconds = Histogram(
            f"{PREFIX}_latency_seconds",
            "Time an utterance spent in the worker, from consumption to the broker's ack of its output.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info", "The student being served (value 1).", ["version"], registry=r
        )
        self.offset_resets = Counter(
            f"{PREFIX}_offset_resets",
            "Partitions whose offset did not belong to their log (past its end, committed for another log, "
            "the topic created again: a broker restarted empty, a topic re-created) and were reset per "
            "INTENT_OFFSET_RESET_POLICY; reason as in the offset_reset log event.",
            ["topic", "partition", "policy", "reason"],
            registry=r,
        )
        self.offset_reset_unread = Counter(
            f"{PREFIX}_offset_reset_unread",
            "Records a replaced log held beyond this worker's position when it was replaced: acknowledged "
            "to their producers, never read, gone with the old log (a lower bound).",
            ["topic", "partition"],
            registry=r,
        )
        self.model_reloads = Counter(
            f"{PREFIX}_model_reloads",
            "Hot reloads of a promoted model, by result (ok, failed).",
            ["result"],
            registry=r,
        )

    def serving(self, version: str) -> None:
        """Mark ``version`` as the one model being served."""
        self.model_info.clear()
        self.model_info.labels(version).set(1)

    def attach(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def lag_by_partition(end_offsets: Mapping[Any, int], committed: Mapping[Any, int]) -> list[PartitionLag]:
    """Lag of each partition with both offsets known; keys are ``(topic, partition)`` tuples (faust's TP).

    Both offsets are "next to read": the end is the high watermark, the committed offset the next
    message the group will consume.
    """
    entries = []
    for tp, end in end_offsets.items():
        done = committed.get(tp)
        if done is None:
            continue
        topic, partition = tp
        entries.append(PartitionLag(str(topic), int(partition), max(0, int(end) - int(done))))
    return sorted(entries, key=lambda e: (e.topic, e.partition))
