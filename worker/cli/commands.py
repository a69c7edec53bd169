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

from worker.cli import dead_letter_commands, model_commands, registry_commands
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

    teacher = commands.add_parser("teacher", help="the embedded teacher").add_subparsers(
        dest="teacher_command", required=True
    )
    build = teacher.add_parser("build", help="build (or verify) the cached teacher files")
    build.set_defaults(handler=model_commands.teacher_build)
    fit = teacher.add_parser("fit", help="train the teacher head on the shared labelled data")
    fit.add_argument("--out", default="models/teacher", help="directory for head, labels and card")
    fit.set_defaults(handler=model_commands.teacher_fit)
    ev = teacher.add_parser("eval", help="accuracy and macro-F1 of the teacher on labelled JSONL")
    ev.add_argument("--data", nargs="+", required=True, help="JSONL files with text, locale, intent|label")
    ev.add_argument("--split", default=None, help="only rows with this split (e.g. validation)")
    ev.add_argument("--mapping", nargs="*", help="intent→label mapping files (default: the shared ones)")
    ev.add_argument("--exclude-ambiguous", action="store_true", help="drop intents marked ambiguous")
    ev.add_argument("--out", help="write the JSON report here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--labels", help="a label-set file: evaluate the zero-shot teacher on it")
    ev.set_defaults(handler=model_commands.teacher_eval)
    zs = teacher.add_parser(
        "zero-shot",
        help="score texts against a label-set file (e5 zero-shot, or the NLI model in INTENT_TEACHER_DIR)",
    )
    zs.add_argument("--labels", required=True, help="the label-set file (schemas/label_set.v1.json)")
    zs.add_argument("texts", nargs="*", help="texts to score (default: one per line from --file or stdin)")
    zs.add_argument("--file", help="read texts from this file, one per line")
    zs.add_argument("--json", action="store_true", help="one JSON object per text")
    zs.set_defaults(handler=model_commands.teacher_zero_shot)
    corpus = commands.add_parser("corpus", help="distillation corpora").add_subparsers(
        dest="corpus_command", required=True
    )
    cb = corpus.add_parser("build", help="label texts with the teacher into a versioned dataset")
    cb.add_argument("--out", required=True, help="dataset directory (created or extended)")
    cb.add_argument(
        "--data", nargs="*", help="JSONL files (default: MASSIVE train + Tatoeba from the shared data)"
    )
    cb.add_argument("--split", default="train", help="rows of this split; rows without a split always count")
    cb.add_argument("--no-translations", action="store_true", help="skip the 'en' field of translation pairs")
    cb.add_argument(
        "--per-file", type=int, default=None, help="label at most this many rows of each file (default: all)"
    )
    cb.add_argument(
        "--held-back",
        type=float,
        default=None,
        metavar="FRACTION",
        help="label only the rows the trainer holds back at this validation fraction (e.g. 0.05): "
        "the evaluation slice of a corpus too big to label whole here",
    )
    cb.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="K",
        help="write K augmented variants per row (case/punctuation, code-switching) instead of the rows",
    )
    cb.add_argument(
        "--lexicon",
        type=int,
        default=0,
        metavar="K",
        help="write K word-by-word translations of each English row, into languages drawn at random, "
        "with a lexicon the teacher induces from the other rows' words, instead of the rows",
    )
    cb.add_argument(
        "--device",
        default="cpu",
        help="label on this torch device (e.g. cuda) with the embedded teacher's torch twin; "
        "needs the train extra (default: cpu, the ONNX teacher)",
    )
    cb.add_argument("--quiet", action="store_true")
    cb.set_defaults(handler=model_commands.corpus_build)

    train = commands.add_parser(
        "train", help="distil a student (cnn, bag or pruned transformer) into a model directory"
    )
    train.add_argument(
        "--arch",
        choices=["cnn", "bag", "pruned"],
        required=True,
        help="cnn: the paper's CNN (shipped); bag: mean of embeddings + MLP; pruned: teacher layers",
    )
    train.add_argument("--data", nargs="*", help="distillation dataset directories")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument(
        "--supervised",
        action="store_true",
        help="S_sup: cross-entropy on the gold labels of MASSIVE train instead of distillation",
    )
    train.add_argument("--filters", type=int, default=500, help="CNN filters per kernel size (paper: 500)")
    train.add_argument("--kernels", default="2,3,4,5,6", help="CNN kernel sizes")
    train.add_argument(
        "--embedding-dim", type=int, default=384, help="< 384 projects the teacher rows by PCA"
    )
    train.add_argument("--min-count", type=int, default=1, help="keep pieces seen at least this often")
    train.add_argument("--fraction", type=float, default=1.0, help="share of the training rows to use")
    train.add_argument("--epochs", type=int, default=None, help="default 50 (pruned: 1)")
    train.add_argument("--batch-size", type=int, default=None, help="default 128 (pruned: 32)")
    train.add_argument("--lr", type=float, default=None, help="default 1e-3 (pruned: 5e-5, encoder)")
    train.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    train.add_argument(
        "--patience", type=int, default=3, help="stop after this many epochs without improvement"
    )
    train.add_argument(
        "--min-delta",
        type=float,
        default=1e-6,
        help="an epoch improves when its validation loss beats the best by more than this",
    )
    train.add_argument(
        "--plateau-factor",
        type=float,
        default=1.0,
        help="multiply the learning rate by this after an epoch without improvement (1: constant)",
    )
    train.add_argument(
        "--sparse-embeddings",
        action="store_true",
        help="sparse gradients for the embedding table (SparseAdam): faster with a large vocabulary",
    )
    train.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    train.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default: cpu)")
    train.add_argument(
        "--max-rows-per-locale",
        type=int,
        default=None,
        metavar="N",
        help="train on about N rows of each locale at most (a share of the bigger ones, by row id)",
    )
    train.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after the epoch that would otherwise end past this many seconds of training "
        "(default: no limit); the best epoch so far is kept",
    )
    train.add_argument(
        "--disagreement-student",
        metavar="MODEL_DIR",
        default=None,
        help="weigh each training row's loss by this student's disagreement with the teacher "
        "(KL; usually the student serving now), so the next one learns most where it is wrong",
    )
    train.add_argument(
        "--disagreement-alpha",
        type=float,
        default=1.0,
        help="with --disagreement-student: weight = 1 + alpha * min(KL / mean KL, 10), mean 1 (default: 1)",
    )
    train.add_argument(
        "--embedding-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="cnn/bag: also pull a projection of the student's features to the teacher's sentence "
        "embedding (MSE + 1 - cosine), weighted W beside the logit MSE (default 0: logits only; "
        "embeds every training row with the teacher first, cached and resumable)",
    )
    train.add_argument(
        "--layers", default="0,11", help="pruned: teacher layers to keep, e.g. 0,11 or 0,5,11 or first4"
    )
    train.add_argument(
        "--mode",
        choices=["refit", "distil"],
        default="refit",
        help="pruned: refit the head only (L2_ends) or also distil the teacher's logits (me5s)",
    )
    train.add_argument(
        "--cosine", action="store_true", help="pruned distil: add MSE + cosine on the sentence embedding"
    )
    train.set_defaults(handler=model_commands.train)

    cascade = commands.add_parser(
        "cascade",
        help="join two students into one model directory: the first answers when sure, the rest go to the second",
    )
    cascade.add_argument("first", help="the fast student's model directory")
    cascade.add_argument("second", help="the model directory uncertain utterances escalate to")
    cascade.add_argument(
        "--escalate-below",
        type=float,
        required=True,
        metavar="MARGIN",
        help="escalate when the first student's top-2 probability margin is below this (0: never; "
        "benchmarks/cascade.py measures agreement and mean cost per threshold)",
    )
    cascade.add_argument("--out", required=True, help="model directory to write")
    cascade.set_defaults(handler=model_commands.cascade)

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
