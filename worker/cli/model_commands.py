"""The model-side commands of ``intent-worker``: teacher, corpus, train, dataset.

:mod:`worker.cli` parses the command line and dispatches here; heavy imports stay inside each
command, so ``intent-worker send`` never loads torch or the teacher.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.cli import train_inputs
from worker.config import Settings
from worker.errors import WorkerError


def say(line: str) -> None:
    print(f"intent-worker: {line}", file=sys.stderr, flush=True)


def teacher_build(settings: Settings, args: argparse.Namespace) -> int:
    from worker.teacher import load_embedded_teacher
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import default_weights_path

    files = ensure_encoder(
        settings.cache_dir, default_weights_path(settings.teacher_weights), settings.teacher_max_length
    )
    print(f"encoder   {files.directory}")
    if (settings.teacher_dir / "head.npz").exists():
        teacher = load_embedded_teacher(settings)
        print(f"teacher   {teacher.identity}  labels={list(teacher.labels)}")
    return 0


def teacher_fit(settings: Settings, args: argparse.Namespace) -> int:
    from worker.teacher.fit import fit_head

    card = fit_head(settings, Path(args.out), command=command_line())
    print(json.dumps(card["head"], indent=2))
    return 0


def teacher_eval(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.data import evaluation
    from worker.data.corpora import IntentMapping, load_labelled, require_shared_data, shared_mapping
    from worker.data.report import to_json, to_markdown
    from worker.teacher import load_teacher

    mapping = (
        IntentMapping.from_files(Path(p) for p in args.mapping)
        if args.mapping
        else shared_mapping(require_shared_data(settings.shared_data_dir))
    )
    data = load_labelled([Path(p) for p in args.data], mapping, split=args.split)
    if args.exclude_ambiguous:
        data = data.subset([not a for a in data.ambiguous])
    if args.labels:
        settings = settings.model_copy(update={"teacher_labels": Path(args.labels)})
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
        "label_set": teacher.label_set_id,
        "labels": list(teacher.labels),
        "data": [str(p) for p in args.data],
        "split": args.split,
        "exclude_ambiguous": args.exclude_ambiguous,
        "metrics": to_json(report),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(to_markdown(report, f"{teacher.identity} on {len(data)} utterances"))
    return 0


def teacher_zero_shot(settings: Settings, args: argparse.Namespace) -> int:
    """Score texts against a label set: the loop for writing and revising descriptions."""
    from worker.data.evaluation import softmax
    from worker.teacher import load_teacher
    from worker.teacher.nli import NliTeacher

    texts = list(args.texts)
    if not texts:
        source = Path(args.file).read_text(encoding="utf-8") if args.file else sys.stdin.read()
        texts = [line for line in source.splitlines() if line.strip()]
    teacher = load_teacher(settings.model_copy(update={"teacher_labels": Path(args.labels)}))
    cost = teacher.pairs_per_utterance if isinstance(teacher, NliTeacher) else 1
    say(f"teacher {teacher.identity}, label set {teacher.label_set_id}, {cost} model row(s) per text")
    probabilities = softmax(teacher.logits(texts)) if texts else np.zeros((0, len(teacher.labels)))
    for text, row in zip(texts, probabilities, strict=True):
        order = np.argsort(-row)
        if args.json:
            scores = {teacher.labels[i]: round(float(row[i]), 4) for i in order}
            print(
                json.dumps(
                    {"text": text, "label": teacher.labels[order[0]], "scores": scores}, ensure_ascii=False
                )
            )
        else:
            ranked = "  ".join(f"{teacher.labels[i]} {row[i]:.3f}" for i in order)
            print(f"{teacher.labels[order[0]]}\t{ranked}\t{text}")
    return 0


def corpus_build(settings: Settings, args: argparse.Namespace) -> int:
    """Label the development corpus (or --data files) with the teacher into a dataset."""
    from tqdm import tqdm

    from worker.data.corpora import massive_files, require_shared_data
    from worker.loop.dataset import DatasetWriter
    from worker.loop.seeding import label_rows, rows_from_files

    if args.template_domains and not args.templates:
        raise WorkerError("--template-domains chooses among the templates: give --templates N too")
    if args.templates:
        if args.data or args.augment or args.lexicon or args.held_back is not None:
            raise WorkerError(
                "--templates labels the templates alone: no --data, --augment, --lexicon or --held-back"
            )
        from worker.loop.templates import template_rows

        try:
            rows = list(template_rows(args.templates, domains=args.template_domains))
        except ValueError as error:
            raise WorkerError(str(error)) from error
    else:
        if args.data:
            paths = [Path(p) for p in args.data]
        else:
            shared = require_shared_data(settings.shared_data_dir)
            paths = [*massive_files(shared), shared / "tatoeba" / "tatoeba.jsonl"]
        rows = list(
            rows_from_files(
                paths,
                split=args.split,
                with_translations=not args.no_translations,
                per_file=args.per_file,
                skip_per_file=args.skip_per_file,
            )
        )
    teacher = _labelling_teacher(settings, args.device)
    writer = DatasetWriter(Path(args.out), teacher.identity, teacher.labels, label_set=teacher.label_set_id)
    if args.held_back is not None:
        from worker.loop.dataset import split_bucket

        if not 0 < args.held_back <= 1:
            raise WorkerError("--held-back is the validation fraction: more than 0, at most 1")

        rows = [row for row in rows if split_bucket(row.id) < args.held_back]
    if args.augment:
        from worker.loop.augment import augment

        donors: dict[str, list[str]] = {}
        for row in rows:
            donors.setdefault(row.locale, []).append(row.text)
        rows = list(augment(rows, donors, per_row=args.augment, seed=0))
    elif args.lexicon:
        rows = _translated_rows(settings, rows, per_row=args.lexicon, out=Path(args.out))
    with tqdm(total=len(rows), unit="utt", desc="labelling", disable=args.quiet) as bar:
        n = label_rows(teacher, rows, writer, progress=bar.update)
    print(f"{n} rows in {args.out} (dataset version {writer.manifest['dataset_version']})")
    return 0


def _labelling_teacher(settings: Settings, device: str) -> Any:
    """The configured teacher, or on a torch device the embedded teacher's torch twin."""
    from worker.teacher import load_label_set, load_teacher

    if device == "cpu":
        return load_teacher(settings)
    if load_label_set(settings) is not None or (settings.teacher_dir / "model.onnx").exists():
        raise WorkerError("--device labels with the embedded teacher only; this teacher runs on the CPU")
    from worker.training.torch_teacher import load_embedded_torch_teacher

    return load_embedded_torch_teacher(settings, device)


def _translated_rows(settings: Settings, rows: list[Any], *, per_row: int, out: Path) -> list[Any]:
    """Word-by-word translations of the English rows (:mod:`worker.loop.lexicon`); the lexicon is kept
    as ``lexicon.json`` beside the dataset."""
    from worker.data.corpora import language_of
    from worker.loop.lexicon import UNSPACED, candidates, induce, lexical_variants
    from worker.teacher import load_embedded_encoder

    english_rows = [row for row in rows if language_of(row.locale) == "en" and not row.id.endswith(":en")]
    texts_by_language: dict[str, list[str]] = {}
    for row in rows:
        if language_of(row.locale) != "en":
            texts_by_language.setdefault(language_of(row.locale), []).append(row.text)
    english = candidates((row.text for row in english_rows), "en", min_count=2, limit=5000)
    targets = {
        lang: candidates(texts, lang, min_count=2 if lang in UNSPACED else 1, limit=3000)
        for lang, texts in texts_by_language.items()
    }
    encoder = load_embedded_encoder(settings)
    lexicon = induce(english, targets, lambda words: encoder.run(list(words)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "lexicon.json").write_text(
        json.dumps(lexicon.entries, ensure_ascii=False, indent=1, sort_keys=True)
    )
    say(f"lexicon: {len(english)} English words; pairs per language {lexicon.size()}")
    return list(lexical_variants(english_rows, lexicon, per_row=per_row, min_replaced=1, seed=0))


def train(settings: Settings, args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from worker.data.corpora import (
        load_labelled,
        massive_files,
        require_shared_data,
        shared_mapping,
        xsid_files,
    )
    from worker.models.onnx import read_labels
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import E5File, default_weights_path
    from worker.training.distil import TrainConfig
    from worker.training.run import TrainRequest, train_model_dir

    train_inputs.check_levers(args)
    e5_path = default_weights_path(settings.teacher_weights)
    files = ensure_encoder(settings.cache_dir, e5_path, settings.teacher_max_length)
    teacher_tokenizer = Tokenizer.from_file(str(files.tokenizer))
    parity: list[str] = []
    labelled = None
    labels: tuple[str, ...] = ()
    if settings.shared_data_dir is not None and settings.shared_data_dir.is_dir():
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
        min_delta=args.min_delta,
        plateau_factor=args.plateau_factor,
        sparse_embeddings=args.sparse_embeddings,
        device=args.device,
        time_budget_s=args.time_budget,
        max_rows_per_locale=args.max_rows_per_locale,
        disagreement_student=args.disagreement_student,
        disagreement_alpha=args.disagreement_alpha,
        embedding_weight=args.embedding_weight,
        table_bits=args.table_bits,
        table_epochs=args.table_epochs,
    )
    embedder = None
    if args.embedding_weight > 0:
        train_inputs.check_embedding_teacher(
            [Path(d) for d in args.data or ()], f"e5-small-intent@{files.key[:8]}."
        )
        embedder = train_inputs.teacher_embedder(settings, args.threads)
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
        keep_characters=args.keep_characters,
        parity_texts=tuple(parity),
        init_from=Path(args.init_from) if args.init_from else None,
        command=command_line(),
        train=config,
        layers=_pruned_layers(args.layers) if pruned else (),
        mode=args.mode,
        cosine=args.cosine,
        teacher_embeddings=embedder,
        teacher_embeddings_id=f"e5-small@{files.key[:8]}" if embedder is not None else "",
    )
    if not request.datasets and labelled is None:
        raise WorkerError("train needs --data DATASET_DIR (or --supervised)")
    if pruned:
        return _train_pruned(settings, args, request, teacher_tokenizer, E5File(e5_path), files.key)
    card = train_model_dir(
        request, teacher_tokenizer, E5File(e5_path), teacher_id=f"e5-small@{files.key[:8]}"
    )
    print(json.dumps({k: card[k] for k in ("version", "int8", "sizes_bytes")}, indent=2))
    say_quantisation(card)
    return 0


def cascade(settings: Settings, args: argparse.Namespace) -> int:
    """Write a cascade model directory: FIRST's files, SECOND's under ``second/``, one card."""
    import hashlib
    import shutil
    import tempfile

    from worker.models.registry import copy_model_files
    from worker.models.student import Student

    first, second, out = Path(args.first), Path(args.second), Path(args.out)
    if not 0.0 <= args.escalate_below <= 1.01:
        raise WorkerError("--escalate-below is a probability margin: 0 to 1 (1.01: escalate everything)")
    students = [Student(first), Student(second)]
    if students[0].labels != students[1].labels:
        raise WorkerError(f"the students' labels differ: {students[0].labels} and {students[1].labels}")
    if any(s.card.get("cascade") for s in students):
        raise WorkerError("a cascade's students must be plain students, not cascades")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    copy_model_files(first, staging)
    (staging / "second").mkdir()
    copy_model_files(second, staging / "second")
    digest = hashlib.sha256()
    for path in (staging / "model.onnx", staging / "second" / "model.onnx"):
        digest.update(path.read_bytes())
    digest.update(repr(args.escalate_below).encode())
    card = dict(students[0].card)
    sizes = {
        name: sum(p.stat().st_size for p in (staging / sub).glob("*") if p.is_file())
        for name, sub in (("first", "."), ("second", "second"))
    }
    card.update(
        version=f"cascade-{digest.hexdigest()[:10]}",
        cascade={
            "second": "second",
            "escalate_below_margin": args.escalate_below,
            "first_version": students[0].version,
            "second_version": students[1].version,
            "bytes": sizes,
            "command": command_line(),
        },
    )
    (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    joined = Student(staging)  # refuses what the worker would refuse
    if out.exists():
        shutil.rmtree(out)
    staging.chmod(0o755)
    staging.replace(out)
    say(
        f"{joined.version}: {students[0].version} answers at margin >= {args.escalate_below}, else {students[1].version}"
    )
    return 0


def say_quantisation(card: dict[str, Any]) -> None:
    """One console line on what ``model.onnx`` is: the INT8 export, or the FP32 fallback and why."""
    int8 = card.get("int8") or {}
    agreement = (int8.get("parity") or {}).get("label_agreement")
    bar = int8.get("min_agreement")
    measured = f"{agreement:.2%}" if isinstance(agreement, float) else "unmeasured"
    if int8.get("shipped", True):
        say(f"{card['version']}: model.onnx is INT8 (agrees with FP32 on {measured} of the parity texts)")
        return
    size = (card.get("sizes_bytes") or {}).get("model.onnx", 0) / 1e6
    say(
        f"{card['version']}: FP32 FALLBACK: the INT8 export agrees with FP32 on only {measured} of the "
        f"parity texts (needs {bar:.1%}), so model.onnx is the float model ({size:.1f} MB); "
        "promote reports its INT8 parity as n/a and judges its latency"
    )


def _pruned_layers(spec: str) -> tuple[int, ...]:
    from worker.training.pruned.encoder import parse_layers

    try:
        return parse_layers(spec, n_layers=12)
    except ValueError as exc:
        raise WorkerError(f"--layers {spec!r}: {exc}") from exc


def _train_pruned(
    settings: Settings, args: argparse.Namespace, request: Any, teacher_tokenizer: Any, e5: Any, key: str
) -> int:
    """The pruned-transformer student: its head is refit on the teacher head's own training rows."""
    from worker.data.corpora import load_labelled, massive_files, require_shared_data, shared_mapping
    from worker.teacher import E5_PREFIX
    from worker.training.pruned.run import HeadRecipe, PrunedInputs, train_pruned_model_dir

    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    teacher_card = json.loads((settings.teacher_dir / "card.json").read_text())
    teacher_embeddings = train_inputs.teacher_embedder(settings, args.threads) if args.cosine else None
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
    say_quantisation(card)
    return 0


def dataset_stats(settings: Settings, args: argparse.Namespace) -> int:
    from worker.loop.dataset import stats

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


def dataset_compact(settings: Settings, args: argparse.Namespace) -> int:
    import redis

    from worker.connections import redis_client
    from worker.dev.services import find_redis
    from worker.errors import ServiceError
    from worker.loop.dataset import compact
    from worker.loop.labelling import BufferLabeller
    from worker.loop.store import Store

    lock = None
    try:  # the labellers' lock too, where they run: it is what guards a dataset on an object store
        client = redis_client(find_redis(settings), timeout_s=30)
        client.ping()
        lock = BufferLabeller.redis_lock(client, settings.redis_key_prefix, Store(args.dataset).canonical)
    except (ServiceError, redis.RedisError) as exc:
        say(f"no Redis ({exc}): compacting under the local lock only")
    print(json.dumps(compact(args.dataset, target_rows=args.target_rows, lock=lock), indent=2))
    return 0


def command_line() -> str:
    return "intent-worker " + " ".join(shlex.quote(a) for a in sys.argv[1:])
