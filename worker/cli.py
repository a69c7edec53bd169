"""The ``intent-worker`` command line. Nothing imports this module.

Settings come from ``INTENT_*`` variables (see `worker.config.Settings`); thread counts and
logging are fixed here, once, before any model loads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.config import Settings
from worker.errors import WorkerError
from worker.logging import configure_logging

if TYPE_CHECKING:
    from worker.client import Outgoing


def _teacher_build(settings: Settings, args: argparse.Namespace) -> int:
    from worker.teacher import load_embedded_teacher
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import default_weights_path

    files = ensure_encoder(settings.cache_dir, default_weights_path(), settings.teacher_max_length)
    print(f"encoder   {files.directory}")
    if (settings.teacher_dir / "head.npz").exists():
        teacher = load_embedded_teacher(settings)
        print(f"teacher   {teacher.identity}  labels={list(teacher.labels)}")
    return 0


def _teacher_fit(settings: Settings, args: argparse.Namespace) -> int:
    from worker.teacher.fit import fit_head

    card = fit_head(settings, Path(args.out), command=_command_line())
    print(json.dumps(card["head"], indent=2))
    return 0


def _teacher_eval(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker import evaluation
    from worker.corpus import IntentMapping, load_labelled, shared_mapping
    from worker.teacher import load_teacher

    mapping = (
        IntentMapping.from_files(Path(p) for p in args.mapping)
        if args.mapping
        else shared_mapping(settings.shared_data_dir)
    )
    data = load_labelled([Path(p) for p in args.data], mapping, split=args.split)
    if args.exclude_ambiguous:
        data = data.subset([not a for a in data.ambiguous])
    teacher = load_teacher(settings)
    chunks = []
    with tqdm(total=len(data), unit="utt", desc="teacher", disable=args.quiet) as bar:
        for values in teacher.iter_logits(data.texts, chunk_size=512):
            chunks.append(values)
            bar.update(len(values))
    logits = np.concatenate(chunks) if chunks else np.zeros((0, len(teacher.labels)), np.float32)
    report = evaluation.evaluate(teacher.labels, logits, data.gold(teacher.labels), data.locales)
    payload = {
        "teacher": teacher.identity,
        "labels": list(teacher.labels),
        "data": [str(p) for p in args.data],
        "split": args.split,
        "exclude_ambiguous": args.exclude_ambiguous,
        "metrics": evaluation.to_json(report),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(evaluation.to_markdown(report, f"{teacher.identity} on {len(data)} utterances"))
    return 0


def _corpus_build(settings: Settings, args: argparse.Namespace) -> int:
    """Label the development corpus (or --data files) with the teacher into a dataset."""
    from tqdm import tqdm

    from worker.corpus import massive_files, require_shared_data
    from worker.dataset import DatasetWriter
    from worker.labelling import label_rows, rows_from_files
    from worker.teacher import load_teacher

    if args.data:
        paths = [Path(p) for p in args.data]
    else:
        shared = require_shared_data(settings.shared_data_dir)
        paths = [*massive_files(shared), shared / "tatoeba" / "tatoeba.jsonl"]
    teacher = load_teacher(settings)
    writer = DatasetWriter(Path(args.out), teacher.identity, teacher.labels)
    rows = list(rows_from_files(paths, split=args.split, with_translations=not args.no_translations))
    if args.augment:
        from worker.augment import augment

        donors: dict[str, list[str]] = {}
        for row in rows:
            donors.setdefault(row.locale, []).append(row.text)
        rows = list(augment(rows, donors, per_row=args.augment, seed=0))
    with tqdm(total=len(rows), unit="utt", desc="labelling", disable=args.quiet) as bar:
        n = label_rows(teacher, rows, writer, progress=bar.update)
    print(f"{n} rows in {args.out} (dataset version {writer.manifest['dataset_version']})")
    return 0


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from worker.corpus import (
        load_labelled,
        massive_files,
        require_shared_data,
        shared_mapping,
        xsid_files,
    )
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import E5File, default_weights_path
    from worker.teacher.runtime import read_labels
    from worker.training.distil import TrainConfig
    from worker.training.pipeline import TrainRequest, train_model_dir

    e5_path = default_weights_path()
    files = ensure_encoder(settings.cache_dir, e5_path, settings.teacher_max_length)
    teacher_tokenizer = Tokenizer.from_file(str(files.tokenizer))
    parity: list[str] = []
    labelled = None
    labels: tuple[str, ...] = ()
    if settings.shared_data_dir.is_dir():
        shared = require_shared_data(settings.shared_data_dir)
        mapping = shared_mapping(shared)
        for group in (massive_files(shared), xsid_files(shared)):
            parity += load_labelled(group, mapping, split="validation").texts
        if args.supervised:
            labelled = load_labelled(massive_files(shared), mapping, split="train")
            labels = read_labels(settings.teacher_dir / "labels.json")
    elif args.supervised:
        raise WorkerError("--supervised trains on the shared labelled data, which is missing")
    pruned = args.arch == "pruned"
    config = TrainConfig(
        # A pruned transformer is fine-tuned, not trained from scratch: fewer epochs, a small rate.
        epochs=args.epochs if args.epochs is not None else (1 if pruned else 50),
        batch_size=args.batch_size if args.batch_size is not None else (32 if pruned else 128),
        learning_rate=args.lr if args.lr is not None else (5e-5 if pruned else 1e-3),
        seed=args.seed,
        fraction=args.fraction,
        threads=args.threads,
        patience=args.patience,
        plateau_factor=args.plateau_factor,
    )
    request = TrainRequest(
        arch=args.arch,
        out=Path(args.out),
        datasets=tuple(Path(d) for d in args.data or ()),
        labelled=labelled,
        labels=labels,
        filters=args.filters,
        kernel_sizes=tuple(int(k) for k in args.kernels.split(",")),
        embedding_dim=args.embedding_dim,
        min_count=args.min_count,
        parity_texts=tuple(parity),
        command=_command_line(),
        train=config,
        layers=_pruned_layers(args.layers) if pruned else (),
        mode=args.mode,
        cosine=args.cosine,
    )
    if not request.datasets and labelled is None:
        raise WorkerError("train needs --data DATASET_DIR (or --supervised)")
    if pruned:
        return _train_pruned(settings, args, request, teacher_tokenizer, E5File(e5_path), files.key)
    card = train_model_dir(
        request, teacher_tokenizer, E5File(e5_path), teacher_id=f"e5-small@{files.key[:8]}"
    )
    print(json.dumps({k: card[k] for k in ("version", "int8", "sizes_bytes")}, indent=2))
    return 0


def _pruned_layers(spec: str) -> tuple[int, ...]:
    from worker.training.pruned import parse_layers

    try:
        return parse_layers(spec, n_layers=12)
    except ValueError as exc:
        raise WorkerError(f"--layers {spec!r}: {exc}") from exc


def _train_pruned(
    settings: Settings, args: argparse.Namespace, request: Any, teacher_tokenizer: Any, e5: Any, key: str
) -> int:
    """The pruned-transformer student: its head is refit on the teacher head's own training rows."""
    from worker.corpus import load_labelled, massive_files, require_shared_data, shared_mapping
    from worker.teacher import E5_PREFIX, load_embedded_encoder
    from worker.training.pruned_pipeline import HeadRecipe, PrunedInputs, train_pruned_model_dir

    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    teacher_card = json.loads((settings.teacher_dir / "card.json").read_text())
    teacher_embeddings: Any = None
    if args.cosine:
        from worker.teacher.fit import embed_cached

        encoder = load_embedded_encoder(settings.model_copy(update={"teacher_threads": args.threads}))
        tag = f"{encoder.model_path}:{encoder.max_length}"

        def embed(texts: Sequence[str]) -> Any:
            return embed_cached(encoder, list(texts), settings.cache_dir, tag)

        teacher_embeddings = embed
    inputs = PrunedInputs(
        head_data=load_labelled(massive_files(shared), mapping, split="train"),
        intent_labels={intent: label for intent, (label, _) in mapping.entries.items()},
        recipe=HeadRecipe.from_card(teacher_card),
        prefix=E5_PREFIX,
        teacher_embeddings=teacher_embeddings,
        head_cache=settings.cache_dir / "pruned-heads",
    )
    card = train_pruned_model_dir(request, inputs, teacher_tokenizer, e5, teacher_id=f"e5-small@{key[:8]}")
    print(json.dumps({k: card[k] for k in ("version", "int8", "sizes_bytes")}, indent=2))
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded services when not configured, the topics, then the Faust worker until SIGTERM."""
    # Before the student loads: the tokenizer's thread pool reads this once.
    os.environ.setdefault("RAYON_NUM_THREADS", str(settings.inference_threads))
    from worker.app import build_worker, initial_student, resolve_web_port, run_worker
    from worker.services import RunState, create_topics, ensure_services, redact_url
    from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

    student = initial_student(settings)  # fail before starting anything
    partitions = args.partitions or settings.topic_partitions
    loop = asyncio.new_event_loop()  # faust's worker runs on this loop too
    asyncio.set_event_loop(loop)
    try:
        with ensure_services(settings) as services:
            loop.run_until_complete(
                create_topics(
                    services.kafka_bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), partitions)
                )
            )
            worker = build_worker(
                settings,
                kafka_bootstrap=services.kafka_bootstrap,
                redis_url=services.redis_url,
                student=student,
                web_port=resolve_web_port(settings),
            )
            state = RunState(
                services.kafka_bootstrap, redact_url(services.redis_url), worker.web_url, os.getpid()
            )
            state_path = state.write(settings.run_dir)
            for service in services.embedded:
                _say(f"{service.name:<7} {service.address}  (embedded; log {service.log_path})")
            if not services.embedded:
                _say(
                    f"kafka   {services.kafka_bootstrap}, redis {redact_url(services.redis_url)} (configured)"
                )
            _say(
                f"worker  group {settings.consumer_group!r}, student {student.version} ({student.directory})"
            )
            _say(f"web     {worker.web_url}/metrics  {worker.web_url}/health")
            _say(f"logs    worker: this terminal (stderr); addresses for send/tail/replay: {state_path}")
            _say('try     intent-worker send "set an alarm for 7am" --locale en   and   intent-worker tail')
            try:
                return run_worker(worker, json_logs=args.log_json, log_level=args.log_level, loop=loop)
            finally:
                state.clear(settings.run_dir)
    finally:
        if not loop.is_closed():
            loop.close()


def _say(line: str) -> None:
    print(f"intent-worker: {line}", file=sys.stderr, flush=True)


def _input_lines(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return list(args.texts)
    if args.file and args.file != "-":
        return Path(args.file).read_text(encoding="utf-8").splitlines()
    return sys.stdin.read().splitlines()


def _send(settings: Settings, args: argparse.Namespace) -> int:
    from worker.client import outgoing_from_lines, send_all
    from worker.services import find_kafka

    bootstrap = find_kafka(settings)
    messages = list(outgoing_from_lines(_input_lines(args), locale=args.locale))
    if not messages:
        raise WorkerError("nothing to send: give texts, --file FILE, or lines on stdin")
    sent = asyncio.run(send_all(bootstrap, messages))
    for message in messages:
        print(message.key.decode("utf-8"))
    _say(f"sent {sent} utterance(s) to {bootstrap}")
    return 0


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from worker.client import outgoing_from_lines, send_all
    from worker.services import find_kafka

    bootstrap = find_kafka(settings)
    lines = Path(args.file).read_text(encoding="utf-8").splitlines()

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
    sent = asyncio.run(send_all(bootstrap, messages(), rate=args.rate))
    elapsed = time.perf_counter() - started
    _say(
        f"replayed {sent} utterance(s) in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):,.0f}/s) to {bootstrap}"
    )
    return 0


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from worker.client import describe, follow_intents
    from worker.schemas import Intent
    from worker.services import find_kafka

    bootstrap = find_kafka(settings)

    def show(intent: Intent, text: str | None, raw: bytes) -> None:
        print(raw.decode("utf-8") if args.json else describe(intent, text), flush=True)

    if not args.quiet:
        _say(f"labels from {bootstrap} (id, label, top score, locale, model, text); Ctrl-C stops")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a person stops tail
        asyncio.run(
            follow_intents(
                bootstrap, show, from_beginning=args.from_beginning, count=args.count, timeout_s=args.timeout
            )
        )
    return 0


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

    import redis
    from prometheus_client import start_http_server

    from worker.dataset import DatasetWriter, Store
    from worker.labelling import BufferLabeller, LabellerMetrics, LabellerOptions
    from worker.services import find_redis
    from worker.teacher import load_teacher

    url = find_redis(settings)
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    # Unlike the worker's fail-fast client, the job may wait on Redis (blocking reads, the lock).
    client = redis.Redis.from_url(url, password=password, socket_timeout=30, socket_connect_timeout=5)
    location = args.data or settings.dataset_dir
    teacher = load_teacher(settings)
    lock = BufferLabeller.redis_lock(client, settings.redis_key_prefix, Store(location).canonical)
    writer = DatasetWriter(location, teacher.identity, teacher.labels, lock=lock)
    options = LabellerOptions(
        prefix=settings.redis_key_prefix,
        group=settings.labeller_group,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
        shard_rows=args.shard_rows or settings.labeller_shard_rows,
        claim_idle_s=settings.labeller_claim_idle_s,
    )
    metrics = LabellerMetrics()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, addr=settings.web_host, registry=metrics.registry)
    labeller = BufferLabeller(client, teacher, writer, options, metrics)
    _say(f"labelling {url} stream of {settings.redis_key_prefix!r} into {location} as {options.consumer}")
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


def _dataset_stats(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dataset import stats

    report = stats(args.dataset)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"dataset   {report['location']} (version {report['dataset_version']})")
    print(f"teacher   {report['teacher']['id']}")
    print(f"rows      {report['rows']} in {report['shards']} shard(s); orphans {len(report['orphans'])}")
    if report["time_range"]:
        lo, hi = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) for t in report["time_range"])
        print(f"sampled   {lo} .. {hi} UTC")
    labels = list(report["teacher"]["labels"])
    print("\n| locale | " + " | ".join(labels) + " | all |\n|---|" + "---|" * (len(labels) + 1))
    for locale, counts in report["per_locale"].items():
        cells = [str(counts.get(label, 0)) for label in labels]
        print(f"| {locale} | " + " | ".join(cells) + f" | {sum(counts.values())} |")
    for run in report["runs"]:
        overall = run.get("disagreement", {}).get("*", {})
        print(
            f"run {run['run']}: {run['rows']} rows, student/teacher disagreement {overall.get('rate', 0):.1%}"
        )
    return 0


def _dataset_compact(settings: Settings, args: argparse.Namespace) -> int:
    import redis

    from worker.dataset import Store, compact
    from worker.errors import ServiceError
    from worker.labelling import BufferLabeller
    from worker.services import find_redis

    lock = None
    try:  # the labellers' lock too, where they run: it is what guards a dataset on an object store
        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        client = redis.Redis.from_url(find_redis(settings), password=password, socket_timeout=30)
        client.ping()
        lock = BufferLabeller.redis_lock(client, settings.redis_key_prefix, Store(args.dataset).canonical)
    except (ServiceError, redis.RedisError) as exc:
        _say(f"no Redis ({exc}): compacting under the local lock only")
    print(json.dumps(compact(args.dataset, target_rows=args.target_rows, lock=lock), indent=2))
    return 0


def _promote(settings: Settings, args: argparse.Namespace) -> int:
    """The gate, then (if it passes) publication in the registry; exit 3 when refused."""
    from worker.app import initial_student
    from worker.corpus import load_labelled, massive_files, require_shared_data, shared_mapping, xsid_files
    from worker.gate import Thresholds, evaluate_candidate, golden_from_labelled
    from worker.inference import Student
    from worker.registry import Registry
    from worker.teacher import load_teacher

    candidate = Student(Path(args.model_dir))
    current = initial_student(settings)
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    paths = [Path(p) for p in args.golden] if args.golden else [*massive_files(shared), *xsid_files(shared)]
    data = load_labelled(paths, mapping, split=args.golden_split)
    teacher = load_teacher(settings)
    golden = golden_from_labelled(
        data.texts, data.locales, data.gold(teacher.labels), teacher, settings.cache_dir
    )
    thresholds = Thresholds(
        max_agreement_drop=args.max_agreement_drop,
        max_f1_drop=args.max_f1_drop,
        max_kl_growth=args.max_kl_growth,
        min_int8_parity=args.min_int8_parity,
        max_latency_ratio=args.max_latency_ratio,
        latency_budget_ms=args.latency_budget_ms,
        languages=None
        if args.all_locales
        else frozenset(x.strip().lower() for x in settings.served_languages.split(",") if x.strip()),
    )
    decision = evaluate_candidate(candidate, current, golden, thresholds)
    report = decision.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for check in decision.checks:
        mark = "ok  " if check.passed else "FAIL"
        print(
            f"{mark} {check.name:<14} candidate {_fmt(check.candidate)}  current {_fmt(check.current)}  limit {_fmt(check.limit)}"
        )
    if not decision.promote:
        _say(f"refused {candidate.version}: " + "; ".join(decision.reasons()))
        return 3
    if args.dry_run:
        _say(f"{candidate.version} passes the gate (dry run: not published)")
        return 0
    registry = Registry(settings.registry_dir)
    if registry.current() is None:  # the first promotion: record what was served, for rollback
        registry.publish(registry.add(current.directory))
    release = registry.publish(registry.add(candidate.directory, report))
    _say(
        f"promoted {release.version} (was {current.version}); workers reload it within {settings.model_poll_interval_s:g}s"
    )
    return 0


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _rollback(settings: Settings, args: argparse.Namespace) -> int:
    from worker.registry import Registry

    old, new = Registry(settings.registry_dir).rollback()
    _say(
        f"rolled back from {old.version} to {new.version}; workers reload it within {settings.model_poll_interval_s:g}s"
    )
    return 0


def _models(settings: Settings, args: argparse.Namespace) -> int:
    from worker.registry import Registry

    registry = Registry(settings.registry_dir)
    current = registry.current()
    if current is None:
        print(f"no promoted model in {settings.registry_dir}: workers serve {settings.student_dir}")
        return 0
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(current.promoted_at))
    print(f"current   {current.version}  ({current.action} {stamp} UTC)")
    for release in reversed(registry.history()):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(release.promoted_at))
        print(f"previous  {release.version}  ({release.action} {stamp} UTC)")
    return 0


def _command_line() -> str:
    return "intent-worker " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intent-worker", description=__doc__)
    parser.add_argument("--log-json", action="store_true", help="JSON log lines (production)")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    teacher = commands.add_parser("teacher", help="the embedded teacher").add_subparsers(
        dest="teacher_command", required=True
    )
    build = teacher.add_parser("build", help="build (or verify) the cached teacher files")
    build.set_defaults(handler=_teacher_build)
    fit = teacher.add_parser("fit", help="train the teacher head on the shared labelled data")
    fit.add_argument("--out", default="models/teacher", help="directory for head, labels and card")
    fit.set_defaults(handler=_teacher_fit)
    ev = teacher.add_parser("eval", help="accuracy and macro-F1 of the teacher on labelled JSONL")
    ev.add_argument("--data", nargs="+", required=True, help="JSONL files with text, locale, intent|label")
    ev.add_argument("--split", default=None, help="only rows with this split (e.g. validation)")
    ev.add_argument("--mapping", nargs="*", help="intent→label mapping files (default: the shared ones)")
    ev.add_argument("--exclude-ambiguous", action="store_true", help="drop intents marked ambiguous")
    ev.add_argument("--out", help="write the JSON report here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(handler=_teacher_eval)
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
        "--augment",
        type=int,
        default=0,
        metavar="K",
        help="write K augmented variants per row (case/punctuation, code-switching) instead of the rows",
    )
    cb.add_argument("--quiet", action="store_true")
    cb.set_defaults(handler=_corpus_build)

    train = commands.add_parser(
        "train", help="distil a student (cnn, bag or pruned transformer) into a model directory"
    )
    train.add_argument("--arch", choices=["cnn", "bag", "pruned"], required=True)
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
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--patience", type=int, default=3, help="stop after this many epochs without improvement"
    )
    train.add_argument(
        "--plateau-factor",
        type=float,
        default=1.0,
        help="multiply the learning rate by this after an epoch without improvement (1: constant)",
    )
    train.add_argument("--threads", type=int, default=2)
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
    train.set_defaults(handler=_train)

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
    tail = commands.add_parser("tail", help="print labels as they arrive on the intents topic")
    tail.add_argument(
        "--from-beginning", action="store_true", help="start at the oldest label, not the newest"
    )
    tail.add_argument("--count", type=int, default=None, help="stop after this many labels")
    tail.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    tail.add_argument("--json", action="store_true", help="print each intent.v1 record as JSON")
    tail.add_argument("--quiet", action="store_true", help="no header line")
    tail.set_defaults(handler=_tail, timing=False)

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
    ds_stats.set_defaults(handler=_dataset_stats, timing=False)
    ds_compact = dataset.add_parser("compact", help="merge small shards; remove old orphan files")
    ds_compact.add_argument("dataset", help="dataset directory or fsspec URL")
    ds_compact.add_argument("--target-rows", type=int, default=100_000, help="rows per merged shard")
    ds_compact.set_defaults(handler=_dataset_compact)

    promote = commands.add_parser(
        "promote", help="gate a candidate against the served model; publish it to the workers if not worse"
    )
    promote.add_argument("model_dir", help="the candidate model directory (from `intent-worker train`)")
    promote.add_argument("--golden", nargs="*", help="labelled JSONL (default: MASSIVE + xSID validation)")
    promote.add_argument("--golden-split", default="validation", help="rows of this split")
    promote.add_argument("--dry-run", action="store_true", help="decide, but do not publish")
    promote.add_argument(
        "--all-locales", action="store_true", help="judge KL in every locale, not only the served languages"
    )
    promote.add_argument("--out", help="write the gate's JSON report here")
    promote.add_argument("--max-agreement-drop", type=float, default=0.005)
    promote.add_argument("--max-f1-drop", type=float, default=0.005)
    promote.add_argument("--max-kl-growth", type=float, default=0.10, help="relative, per locale")
    promote.add_argument("--min-int8-parity", type=float, default=0.995)
    promote.add_argument("--max-latency-ratio", type=float, default=1.25)
    promote.add_argument(
        "--latency-budget-ms", type=float, default=None, help="accept any p50 within this budget"
    )
    promote.set_defaults(handler=_promote)
    rollback = commands.add_parser("rollback", help="serve the previously promoted model again")
    rollback.set_defaults(handler=_rollback, timing=False)
    models = commands.add_parser("models", help="the promoted model the workers serve, and the ones before")
    models.set_defaults(handler=_models, timing=False)
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


if __name__ == "__main__":
    sys.exit(main())
