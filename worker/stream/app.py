"""The Faust app: broker and web settings, the classify agent, ``/metrics`` and ``/health``.

:func:`build_worker` wires a loaded student, the Redis buffer and the metrics into a
``faust.App``; :func:`run_worker` runs it until SIGTERM/SIGINT (graceful) or a failure.
The web server binds ``Settings.web_host`` (loopback by default), never all interfaces
unless configured so.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faust
import structlog
from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST

from worker.config import Settings
from worker.connections import KafkaConnection, RedisConnection, SecurityProtocol
from worker.errors import ModelError, ServiceError
from worker.logging import stdlib_logging_config
from worker.models.card import StudentCard
from worker.models.registry import Registry, Release
from worker.models.student import Student, classify_chunked
from worker.models.student_process import StudentProcess
from worker.stream.agents import BatchEmitter, WorkerState, register_classifier
from worker.stream.buffer import RedisBufferSink
from worker.stream.faust_adapter import (
    BoundedShutdownWorker,
    monitor_offsets,
    serve_only_our_views,
    use_fetch_wait,
)
from worker.stream.metrics import (
    ModelLoadCollector,
    PartitionLag,
    WorkerCollector,
    WorkerMetrics,
    lag_by_partition,
)
from worker.stream.offsets import CHECK_INTERVAL_S as OFFSET_CHECK_INTERVAL_S
from worker.stream.offsets import OffsetGuard, OffsetResetPolicy
from worker.stream.pipeline import Classify, Pipeline, PipelineOptions
from worker.stream.sampling import BufferCounters, Sampler, SamplingPolicy

log = structlog.get_logger(__name__)

DEFAULT_WEB_PORT = 6066  # faust's own default
BUFFER_LENGTH_INTERVAL_S = 5.0
RELOAD_RETRY_S = 30.0  # a promoted model that failed to load is tried again after this
PRODUCER_MAX_BATCH_BYTES = 256 * 1024  # one partition's share of a 256-utterance batch fits in one request


@dataclass
class Worker:
    """A built worker: the app and what it runs on."""

    app: faust.App
    state: WorkerState
    pipeline: Pipeline
    metrics: WorkerMetrics
    sink: RedisBufferSink
    executor: ThreadPoolExecutor
    web_url: str
    watcher: ModelWatcher
    offsets: OffsetGuard | None = None
    #: /health is 503 when the broker has answered no fetch for longer (INTENT_HEALTH_BROKER_TIMEOUT_S).
    broker_timeout_s: float = 15.0
    #: A stop that takes longer ends the process with status 1 (INTENT_SHUTDOWN_TIMEOUT_S).
    shutdown_timeout_s: float = 15.0


class ModelWatcher:
    """Hot reload: serve whatever ``current.json`` of the registry names, once it loads.

    A new version is loaded and probed off the event loop, then swapped in whole between two
    micro-batches; a version that fails to load is logged and counted, and the worker keeps
    serving the one it has (and tries again only when the pointer changes).
    """

    def __init__(
        self, registry: Registry, pipeline: Pipeline, metrics: WorkerMetrics, settings: Settings
    ) -> None:
        self.registry = registry
        self.pipeline = pipeline
        self.metrics = metrics
        self.settings = settings
        self.stamp = registry.stamp()
        self.retry_at = math.inf  # after a failed load: when to try the same pointer again
        self.served: LabelContract | None = None  # the labels and label set being served

    async def check(self) -> None:
        stamp = self.registry.stamp()
        if stamp == self.stamp and time.monotonic() < self.retry_at:
            return
        self.stamp = stamp
        self.retry_at = math.inf
        try:
            release = self.registry.current()
            if release is None or release.version == self.pipeline.model_version:
                return
            student = await asyncio.to_thread(self.read, release)
            served = await asyncio.to_thread(serve, student, self.settings)  # the one load
        # Any failure of a reload (a bad file, a half-copied volume, onnxruntime) must leave the
        # worker serving what it has: a crashing timer would take the whole worker down.
        except Exception as exc:
            self.metrics.model_reloads.labels("failed").inc()
            self.retry_at = time.monotonic() + RELOAD_RETRY_S
            log.error(
                "model_reload_failed",
                serving=self.pipeline.model_version,
                error=repr(exc),
                retry_in_s=RELOAD_RETRY_S,
            )
            return
        previous = self.served
        old = self.pipeline.swap(*served, label_set=student.label_set)
        self.served = LabelContract.of(student)
        self.metrics.serving(student.version)
        self.metrics.model_reloads.labels("ok").inc()
        log.info("model_reloaded", old=old, new=student.version, action=release.action)
        if previous is not None and previous.label_set != student.label_set:
            log.warning(
                "label_set_changed",
                old=previous.label_set,
                new=student.label_set,
                labels=list(student.labels),
            )

    def read(self, release: Release) -> StudentCard:
        """The release's card and labels, checked; the model itself is loaded once, by :func:`serve`."""
        student = StudentCard(self.registry.directory(release))
        if student.version != release.version:
            raise ModelError(
                f"{release.path} holds version {student.version}, the pointer says {release.version}"
            )
        if self.served is not None:
            check_label_set(student, self.served)
        return student


@dataclass(frozen=True)
class LabelContract:
    """What consumers of the intents rely on: the label names, and the label set they belong to."""

    labels: frozenset[str]
    label_set: str
    declared: bool  # the card names its label set (students from before label sets do not)

    @classmethod
    def of(cls, student: StudentCard) -> LabelContract:
        return cls(frozenset(student.labels), student.label_set, student.card.get("label_set") is not None)


def check_label_set(student: StudentCard, served: LabelContract) -> None:
    """Refuse a student whose labels break the contract with what is ``served``.

    Routing services act on label names. A student that names its label set in its card
    (``label_set``, written by the trainer) may bring a new one: a deliberate change, which
    the gate allows only with ``promote --new-label-set``, and which every intent then carries.
    Between students older than label sets the names are the contract, as before; and one label
    set with other names is a broken model.
    """
    if set(student.labels) == served.labels:
        return
    declared = student.card.get("label_set") is not None or served.declared
    if declared and student.label_set != served.label_set:
        return
    raise ModelError(
        f"{student.version} has labels {list(student.labels)}, not {sorted(served.labels)}, "
        f"in the same label set {student.label_set}"
        if declared
        else f"{student.version} has labels {list(student.labels)}, not {sorted(served.labels)}"
    )


#: How the pipeline runs a student: the classify callable, the version, and how to stop it.
Served = tuple[Classify, str, Callable[[], None] | None]


def serve(student: StudentCard, settings: Settings) -> Served:
    """Load ``student`` where it will run, once, and say how the pipeline runs it.

    With ``inference_process`` (the default) the model is loaded and run by a child process of
    its own (:mod:`worker.models.student_process`), and this process holds only its card;
    otherwise it is loaded here and runs on the pipeline's inference thread.
    """
    if settings.inference_process:
        process = StudentProcess(
            student.directory, threads=settings.inference_threads, rows=settings.inference_rows
        )
        if process.version != student.version:
            process.close()
            raise ModelError(
                f"{student.directory} changed while loading: {process.version} != {student.version}"
            )
        return process.classify, process.version, process.close
    loaded = (
        student
        if isinstance(student, Student)
        else Student(student.directory, threads=settings.inference_threads)
    )
    if loaded.version != student.version:
        raise ModelError(f"{student.directory} changed while loading: {loaded.version} != {student.version}")
    return partial(classify_chunked, student=loaded, rows=settings.inference_rows), loaded.version, None


@dataclass(frozen=True)
class OpenStudent:
    """A student directory being served: its card, and how the pipeline runs it."""

    card: StudentCard
    served: Served


def open_student(directory: Path, settings: Settings) -> OpenStudent:
    """Read ``directory``'s card and serve it (:func:`serve`: the one load of the model)."""
    card = StudentCard(directory)
    return OpenStudent(card, serve(card, settings))


def resolve_web_port(settings: Settings) -> int:
    """``web_port`` as configured; unset: 6066 if free, else a port the OS picks; 0: the OS picks."""
    if settings.web_port is not None and settings.web_port != 0:
        return settings.web_port
    candidates = [DEFAULT_WEB_PORT, 0] if settings.web_port is None else [0]
    for candidate in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((settings.web_host, candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ServiceError(f"no free port for the web server on {settings.web_host}")


def broker_urls(bootstrap: str) -> list[str]:
    """``host:port,host:port`` as faust broker URLs."""
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def faust_credentials(connection: KafkaConnection) -> faust.types.auth.CredentialsT | None:
    """faust's ``broker_credentials`` for the connection's security protocol (None: PLAINTEXT)."""
    if connection.uses_sasl:
        return faust.SASLCredentials(
            username=connection.username,
            password=None if connection.password is None else connection.password.get_secret_value(),
            ssl_context=connection.ssl_context(),  # None for SASL_PLAINTEXT
            mechanism=connection.sasl_mechanism.value,
        )
    if connection.security_protocol is SecurityProtocol.SSL:
        return faust.SSLCredentials(connection.ssl_context())
    return None


def new_faust_app(
    settings: Settings, *, group: str, kafka_bootstrap: str, datadir: Path, web_port: int
) -> faust.App:
    """A faust app on raw bytes with the worker's broker, commit and web settings (the Faust
    ceiling benchmark builds its forwarder with this too, so both run the same configuration)."""
    connection = KafkaConnection.from_settings(settings, kafka_bootstrap)
    return faust.App(
        group,
        broker=connection.broker_urls(),
        broker_credentials=faust_credentials(connection),
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_linger=settings.producer_linger_s,
        producer_max_batch_size=PRODUCER_MAX_BATCH_BYTES,
        producer_acks=-1,
        stream_wait_empty=True,  # shutdown and rebalances wait until delivered messages are acked
        topic_disable_leader=True,  # no leader topic: we use no faust tables or timers-on-leader
        topic_allow_declare=False,  # `intent-worker run` creates the topics, with their partition count
        web_enabled=True,  # web_enabled=False does not stop faust's web server: bind it to web_host
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=web_port,
    )


def build_worker(
    settings: Settings,
    *,
    kafka_bootstrap: str,
    redis_url: str | RedisConnection,
    student: StudentCard,
    web_port: int,
    served: Served | None = None,
) -> Worker:
    """The faust app with the classify agent, its pipeline, and the web views.

    ``served``: ``student`` already being served (:func:`open_student`); else it is served here.
    """
    datadir = settings.run_dir / "faust" / settings.consumer_group
    datadir.parent.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = new_faust_app(
        settings,
        group=settings.consumer_group,
        kafka_bootstrap=kafka_bootstrap,
        datadir=datadir,
        web_port=web_port,
    )
    use_fetch_wait(app, settings.consumer_fetch_max_wait_s)
    serve_only_our_views(app)  # no faust index at / (always OK), /router, /table, ...
    metrics = WorkerMetrics()
    offsets = OffsetGuard(app, OffsetResetPolicy(settings.offset_reset_policy), metrics)
    counters = BufferCounters()
    sink = RedisBufferSink.from_settings(settings, redis_url, counters=counters)
    sampler = Sampler(SamplingPolicy(**settings.sampling.model_dump()), counters=counters)
    # One thread: inference runs in arrival order, and onnxruntime's own threads do the parallel work.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="student")
    classify, version, close_model = served or serve(student, settings)
    pipeline = Pipeline(
        classify,
        version,
        BatchEmitter(app, batch_bytes=PRODUCER_MAX_BATCH_BYTES),
        executor,
        sampler=sampler,
        sink=sink,
        metrics=metrics,
        options=PipelineOptions(**settings.pipeline.model_dump()),
        close_model=close_model,
        label_set=student.label_set,
    )
    state = WorkerState()
    metrics.serving(student.version)
    metrics.attach(WorkerCollector(counters, lambda: sink.length, lambda: offsets.lag() or consumer_lag(app)))
    metrics.attach(ModelLoadCollector())
    register_classifier(
        app, pipeline, state, max_batch=settings.pipeline.max_batch, max_wait_s=settings.pipeline.max_wait_s
    )
    watcher = ModelWatcher(Registry(settings.registry_dir), pipeline, metrics, settings)
    watcher.served = LabelContract.of(student)
    worker = Worker(
        app,
        state,
        pipeline,
        metrics,
        sink,
        executor,
        web_url=f"http://{settings.web_host}:{web_port}",
        watcher=watcher,
        offsets=offsets,
        broker_timeout_s=settings.health_broker_timeout_s,
        shutdown_timeout_s=settings.shutdown_timeout_s,
    )
    app.timer(settings.model_poll_interval_s)(watcher.check)
    app.timer(OFFSET_CHECK_INTERVAL_S)(offsets.check)
    _add_views(worker)
    _add_hooks(worker)
    return worker


def consumer_lag(app: faust.App) -> list[PartitionLag]:
    """Lag of each partition this worker holds, from the offsets faust's monitor tracks."""
    try:
        assigned = app.consumer.assignment()
    except ConsumerNotStarted:  # scraped before the consumer started
        return []
    end_offsets, committed = monitor_offsets(app)
    ends = {tp: offset for tp, offset in end_offsets.items() if tp in assigned}
    return lag_by_partition(ends, committed)


def health(worker: Worker) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 once the worker has joined its group and nothing failed."""
    state, app = worker.state, worker.app
    body: dict[str, Any] = {
        "model_version": worker.pipeline.model_version,
        "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in state.assigned or ()),
        "batches": state.batches,
        "inflight": worker.pipeline.inflight,
    }
    if state.failure is not None:
        body.update(status="failed", error=repr(state.failure))
        return 503, body
    if app.should_stop:
        body["status"] = "stopping"
        return 503, body
    if state.assigned is None or app.rebalancing:
        body["status"] = "starting"
        return 503, body
    offsets = worker.offsets
    silent = offsets.broker_silent_s(waiting=bool(state.assigned)) if offsets is not None else None
    if silent is not None and silent > worker.broker_timeout_s:
        body.update(status="broker_unreachable", broker_silent_s=round(silent, 1))
        return 503, body
    body["status"] = "ok"
    return 200, body


def _add_views(worker: Worker) -> None:
    app = worker.app

    async def metrics_view(view: View, request: Request) -> Response:
        return view.bytes(worker.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health_view(view: View, request: Request) -> Response:
        status, body = health(worker)
        return view.json(body, status=status)

    app.page("/metrics")(metrics_view)
    app.page("/health")(health_view)


def _add_hooks(worker: Worker) -> None:
    app, state = worker.app, worker.state

    async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0]  # the signal is sent with the new assignment
        first = state.assigned is None
        state.assigned = frozenset(assigned)
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        if first:  # the model loaded before the app started: the group join was the last step
            log.info(
                "worker_ready",
                group=app.conf.id,
                model_version=worker.pipeline.model_version,
                partitions=len(assigned),
                health=f"{worker.web_url}/health",
            )

    async def on_before_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Faust sends this once the consumer has drained: every delivered batch is released.
        try:
            await worker.pipeline.drain()
        except Exception as exc:  # a failed batch: the agent has reported it and set the failure
            log.debug("pipeline_drain_failed", error=repr(exc))
        await worker.sink.close()

    async def refresh_buffer_length() -> None:
        await worker.sink.read_length()

    # mode types receivers through mypy_extensions' NamedArg("BaseSignalT"), which no function matches.
    app.on_partitions_assigned.connect(on_assigned)  # type: ignore[arg-type]
    app.on_before_shutdown.connect(on_before_shutdown)  # type: ignore[arg-type]
    app.timer(BUFFER_LENGTH_INTERVAL_S)(refresh_buffer_length)


def run_worker(worker: Worker, *, json_logs: bool, log_level: str, loop: asyncio.AbstractEventLoop) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after a graceful stop) or a failure (exit 1)."""
    runner = BoundedShutdownWorker(
        worker.app,
        shutdown_timeout_s=worker.shutdown_timeout_s,
        loop=loop,
        quiet=True,
        redirect_stdouts=False,
        loglevel=log_level,
        logging_config=stdlib_logging_config(json_logs=json_logs, level=log_level),
    )
    code: int | str | None = 0
    log.info("worker_starting", group=worker.app.conf.id, web=worker.web_url)
    try:
        runner.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code
    finally:
        worker.executor.shutdown(wait=True, cancel_futures=True)
        worker.pipeline.close_model()
    status = 1 if worker.state.failure is not None else code if isinstance(code, int) else 1 if code else 0
    log.info("worker_stopped", exit_code=status, batches=worker.state.batches)
    return status
