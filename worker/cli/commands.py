"""The ``intent-worker`` command line.

Settings come from ``INTENT_*`` variables (see `worker.config.Settings`); thread counts and
logging are fixed here, once, before any model loads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cli import dead_letter_commands, model_commands, model_parsers, registry_commands
from worker.cli.model_commands import say
from worker.config import Settings
from worker.errors import WorkerError
from worker.logging import configure_logging

if TYPE_CHECKING:
    from worker.dev.client import InputLine, Outgoing


def _run(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded services when not configured, the topics, then the Faust worker until SIGTERM."""
    # Before the student loads: the tokenizer's thread pool reads this once.
    os.environ.setdefault("RAYON_NUM_THREADS", str(settings.inference_threads))
    from worker.connections import KafkaConnection, RedisConnection
    from worker.dev.services import RunState, ensure_services, redact_url
    from worker.models.registry import initial_model
    from worker.stream.admin import create_topics
    from worker.stream.app import build_worker, open_student, resolve_web_port, run_worker
    from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

    # Fail before starting anything; with the inference process the model loads there, once.
    opened = initial_model(settings, partial(open_student, settings=settings))
    student = opened.card
    partitions = args.partitions or settings.topic_partitions
    loop = asyncio.new_event_loop()  # faust's worker runs on this loop too
    asyncio.set_event_loop(loop)
    try:
        with ensure_services(settings) as services:
            loop.run_until_complete(
                create_topics(
                    KafkaConnection.from_settings(settings, services.kafka_bootstrap),
                    dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), partitions),
                )
            )
            redis = RedisConnection.from_settings(
                settings, services.redis_url, password=services.redis_password
            )
            worker = build_worker(
                settings,
                kafka_bootstrap=services.kafka_bootstrap,
                redis_url=redis,
                student=student,
                web_port=resolve_web_port(settings),
                served=opened.served,
            )
            # The URL without any password (a configured one stays in the settings, never in a file).
            state = RunState(services.kafka_bootstrap, redis.url, worker.web_url, os.getpid())
            state_path = state.write(settings.run_dir, redis_password=services.redis_password)
            for service in services.embedded:
                say(f"{service.name:<7} {service.address}  (embedded; log {service.log_path})")
            if not services.embedded:
                say(
                    f"kafka   {services.kafka_bootstrap}, redis {redact_url(services.redis_url)} (configured)"
                )
            say(f"worker  group {settings.consumer_group!r}, student {student.version} ({student.directory})")
            say(f"web     {worker.web_url}/metrics  {worker.web_url}/health")
            say(f"logs    worker: this terminal (stderr); addresses for send/tail/replay: {state_path}")
            say('try     intent-worker send "set an alarm for 7am" --locale en   and   intent-worker tail')
            try:
                return run_worker(worker, json_logs=args.log_json, log_level=args.log_level, loop=loop)
            finally:
                state.clear(settings.run_dir)
    finally:
        if not loop.is_closed():
            loop.close()


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise WorkerError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _input_lines(args: argparse.Namespace) -> list[InputLine]:
    from worker.dev.client import argument_lines, read_lines

    if args.texts:
        return argument_lines(args.texts)
    if args.file and args.file != "-":
        return read_lines(_read_file(args.file), args.file)
    return read_lines(sys.stdin.buffer.read(), "stdin")


def _send(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.client import outgoing_from_lines, send_all
    from worker.dev.run_state import find_kafka_connection

    kafka = find_kafka_connection(settings)
    bootstrap = kafka.bootstrap
    messages = list(outgoing_from_lines(_input_lines(args), locale=args.locale))
    if not messages:
        raise WorkerError("nothing to send: give texts, --file FILE, or lines on stdin")
    sent = asyncio.run(send_all(kafka, messages))
    for message in messages:
        print(message.key.decode("utf-8"))
    say(f"sent {sent} utterance(s) to {bootstrap}")
    return 0


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.client import outgoing_from_lines, read_lines, send_all
    from worker.dev.run_state import find_kafka_connection

    kafka = find_kafka_connection(settings)
    bootstrap = kafka.bootstrap
    lines = read_lines(_read_file(args.file), args.file)

    def messages() -> Iterator[Outgoing]:
        produced = 0
        for round_ in range(args.repeat):
            suffix = f"#{round_}" if args.repeat > 1 else ""
            for message in outgoing_from_lines(lines, locale=args.locale, suffix=suffix):
                if args.limit is not None and produced >= args.limit:
                    return
                produced += 1
                yield message

    started = time.perf_counter()
    sent = asyncio.run(send_all(kafka, messages(), rate=args.rate))
    elapsed = time.perf_counter() - started
    say(f"replayed {sent} utterance(s) in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):,.0f}/s) to {bootstrap}")
    return 0


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    if args.dead_letters:
        return dead_letter_commands.tail_dead_letters(settings, args)
    from worker.dev.client import describe, follow_intents
    from worker.dev.run_state import find_kafka_connection
    from worker.schemas import Intent

    kafka = find_kafka_connection(settings)
    dead_letter_commands.quiet_kafka_logs(args)

    def show(intent: Intent, text: str | None, raw: bytes) -> None:
        print(raw.decode("utf-8") if args.json else describe(intent, text), flush=True)

    if not args.quiet:
        say(f"labels from {kafka.bootstrap} (id, label, top score, locale, model, text); Ctrl-C stops")
    return dead_letter_commands.follow_until_stopped(follow_intents, kafka, show, args)


def _duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)") from exc


def _label(settings: Settings, args: argparse.Namespace) -> int:
    """The labelling job: buffer -> teacher -> dataset shards, through a Redis consumer group."""
    import signal
    import socket

    from prometheus_client import start_http_server

    from worker.connections import redis_client
    from worker.dev.services import find_redis
    from worker.loop.dataset import DatasetWriter
    from worker.loop.labelling import BufferLabeller, LabellerMetrics, LabellerOptions
    from worker.loop.store import Store
    from worker.teacher import load_teacher

    connection = find_redis(settings)
    # Unlike the worker's fail-fast client, the job may wait on Redis (blocking reads, the lock).
    client = redis_client(connection, timeout_s=30, connect_timeout_s=5)
    location = args.data or settings.dataset_dir
    teacher = load_teacher(settings)
    lock = BufferLabeller.redis_lock(client, settings.redis_key_prefix, Store(location).canonical)
    writer = DatasetWriter(
        location, teacher.identity, teacher.labels, label_set=teacher.label_set_id, lock=lock
    )
    options = LabellerOptions(
        **settings.labeller.model_dump(exclude={"shard_rows"}),
        shard_rows=args.shard_rows or settings.labeller.shard_rows,
        prefix=settings.redis_key_prefix,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
    )
    metrics = LabellerMetrics()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, addr=settings.web_host, registry=metrics.registry)
    labeller = BufferLabeller(client, teacher, writer, options, metrics)
    say(
        f"labelling {connection.describe()} stream of {settings.redis_key_prefix!r} "
        f"into {location} as {options.consumer}"
    )
    if args.once:
        report = labeller.run_once(max_entries=args.max_entries)
        print(json.dumps(report.to_manifest(), indent=2))
        return 0
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    labeller.run_forever(every_s=args.every, min_samples=args.min_samples, should_stop=lambda: stopping)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intent-worker",
        description="Streaming intent classification on Kafka and Redis, and the loop that distils better "
        "students: run the worker, send and tail utterances, label, train, promote. Settings come from "
        "INTENT_* environment variables (the README's configuration table).",
    )
    parser.add_argument("--log-json", action="store_true", help="JSON log lines (production)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    model_parsers.add_model_commands(commands)

    run = commands.add_parser(
        "run",
        help="run the streaming worker (embedded Kafka and Redis unless INTENT_KAFKA_BOOTSTRAP/REDIS_URL)",
    )
    run.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions of the topics it creates (INTENT_TOPIC_PARTITIONS)",
    )
    run.set_defaults(handler=_run, timing=False)
    send = commands.add_parser("send", help="send utterances: texts, --file FILE (JSONL or lines), or stdin")
    send.add_argument("texts", nargs="*", help="utterance texts (none: read --file or stdin)")
    send.add_argument("--file", help="JSONL or one text per line; '-' is stdin")
    send.add_argument("--locale", default=None, help="locale of texts that do not carry one (en, fr-FR, ...)")
    send.set_defaults(handler=_send, timing=False)
    replay = commands.add_parser("replay", help="push a JSONL (or text) data set through at a given rate")
    replay.add_argument("file", help="JSONL (utterance objects) or one text per line")
    replay.add_argument(
        "--rate", type=float, default=0.0, help="utterances per second; 0: as fast as possible"
    )
    replay.add_argument("--limit", type=int, default=None, help="send at most this many")
    replay.add_argument(
        "--repeat", type=int, default=1, help="go through the file this many times (ids get #k)"
    )
    replay.add_argument("--locale", default=None, help="locale of records that do not carry one")
    replay.set_defaults(handler=_replay, timing=False)
    tail = commands.add_parser(
        "tail", help="print labels as they arrive on the intents topic (or dead letters: --dead-letters)"
    )
    tail.add_argument(
        "--from-beginning", action="store_true", help="start at the oldest label, not the newest"
    )
    tail.add_argument("--count", type=int, default=None, help="stop after this many labels")
    tail.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    tail.add_argument(
        "--dead-letters",
        action="store_true",
        help="read utterances.dlq instead: where, stage, reason, id and the original bytes of each",
    )
    tail.add_argument(
        "--json", action="store_true", help="print each record as JSON (intent.v1, or dead_letter.v1)"
    )
    tail.add_argument("--quiet", action="store_true", help="no header line")
    tail.set_defaults(handler=_tail, timing=False)
    dead_letter_commands.add_redrive_parser(commands)

    label = commands.add_parser(
        "label", help="the labelling job: label the Redis buffer with the teacher into a dataset"
    )
    when = label.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="drain what the buffer holds now, then exit")
    when.add_argument("--every", type=_duration, default=None, help="run periodically: 90s, 10m, 2h")
    label.add_argument(
        "--min-samples", type=int, default=None, help="also run as soon as this many samples wait"
    )
    label.add_argument("--data", default=None, help="dataset directory or fsspec URL (INTENT_DATASET_DIR)")
    label.add_argument("--consumer", default=None, help="consumer name in the group (default host-pid)")
    label.add_argument(
        "--shard-rows", type=int, default=None, help="entries per shard (INTENT_LABELLER_SHARD_ROWS)"
    )
    label.add_argument("--max-entries", type=int, default=None, help="--once: stop after about this many")
    label.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    label.set_defaults(handler=_label)

    dataset = commands.add_parser(
        "dataset", help="inspect and maintain distillation datasets"
    ).add_subparsers(dest="dataset_command", required=True)
    ds_stats = dataset.add_parser("stats", help="rows, shards, locale x label counts, drift of recent runs")
    ds_stats.add_argument("dataset", help="dataset directory or fsspec URL")
    ds_stats.add_argument("--json", action="store_true")
    ds_stats.set_defaults(handler=model_commands.dataset_stats, timing=False)
    ds_compact = dataset.add_parser("compact", help="merge small shards; remove old orphan files")
    ds_compact.add_argument("dataset", help="dataset directory or fsspec URL")
    ds_compact.add_argument("--target-rows", type=int, default=100_000, help="rows per merged shard")
    ds_compact.set_defaults(handler=model_commands.dataset_compact)

    registry_commands.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(json_logs=args.log_json, level=args.log_level)
    settings = Settings()
    started = time.perf_counter()
    try:
        code: int = args.handler(settings, args)
    except WorkerError as exc:
        print(f"intent-worker: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "timing", True) and not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return code
