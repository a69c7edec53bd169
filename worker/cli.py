"""The ``intent-worker`` command line. Nothing imports this module.

Settings come from ``INTENT_*`` variables (see `worker.config.Settings`); thread counts and
logging are fixed here, once, before any model loads.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worker.config import Settings
from worker.errors import WorkerError
from worker.logging import configure_logging


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
    if not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
