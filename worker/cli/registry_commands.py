"""The registry commands of ``intent-worker``: promote (the gate), rollback, models."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.cli.model_commands import say
from worker.config import GateSettings, Settings, default_of

#: The gate's thresholds ``promote`` takes as options; their defaults are GateSettings'.
GATE_OPTIONS = {
    "--max-agreement-drop": "most agreement with the teacher may fall",
    "--max-f1-drop": "most macro-F1 (gold) may fall",
    "--max-kl-growth": "most KL to the teacher may grow, relative, per locale",
    "--max-language-agreement-drop": "most agreement may fall per served language, when beyond chance",
    "--min-int8-parity": "least INT8/FP32 agreement (n/a for FP32 models)",
    "--max-latency-ratio": "most p50 latency may grow (+ INTENT_GATE_LATENCY_SLACK_MS)",
    "--latency-budget-ms": "accept any p50 within this budget",
}


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    promote_parser = commands.add_parser(
        "promote",
        help="gate a candidate against the served model; publish it to the workers if not worse",
    )
    promote_parser.add_argument(
        "model_dir", help="the candidate model directory (from `intent-worker train`)"
    )
    promote_parser.add_argument(
        "--golden", nargs="*", help="labelled JSONL (default: MASSIVE + xSID validation)"
    )
    promote_parser.add_argument("--golden-split", default="validation", help="rows of this split")
    promote_parser.add_argument("--dry-run", action="store_true", help="decide, but do not publish")
    promote_parser.add_argument(
        "--all-locales",
        action="store_true",
        help="judge KL per locale and agreement per language in all of them, not only the served languages",
    )
    promote_parser.add_argument("--out", help="write the gate's JSON report here")
    promote_parser.add_argument(
        "--new-label-set",
        action="store_true",
        help="the candidate may serve another label set than the current model (consumers get new labels)",
    )
    for option, text in GATE_OPTIONS.items():
        field = option.removeprefix("--").replace("-", "_")
        promote_parser.add_argument(
            option,
            type=float,
            default=None,
            help=f"{text} (default: INTENT_GATE_{field.upper()}, else {default_of(GateSettings, field)})",
        )
    promote_parser.set_defaults(handler=promote)
    rollback_parser = commands.add_parser(
        "rollback", help="serve the previously promoted model again (after a promote; see `models`)"
    )
    rollback_parser.set_defaults(handler=rollback, timing=False)
    models_parser = commands.add_parser(
        "models", help="the promoted model the workers serve, and the ones before"
    )
    models_parser.set_defaults(handler=models, timing=False)


def promote(settings: Settings, args: argparse.Namespace) -> int:
    """The gate, then (if it passes) publication in the registry; exit 3 when refused."""
    from worker.data.corpora import (
        load_labelled,
        massive_files,
        require_shared_data,
        shared_mapping,
        xsid_files,
    )
    from worker.loop.gate import Thresholds, evaluate_candidate, golden_from_labelled
    from worker.models.registry import Registry, initial_student
    from worker.models.student import Student
    from worker.teacher import load_teacher

    candidate = Student(Path(args.model_dir))
    current = initial_student(settings)
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    paths = [Path(p) for p in args.golden] if args.golden else [*massive_files(shared), *xsid_files(shared)]
    data = load_labelled(paths, mapping, split=args.golden_split)
    teacher = load_teacher(settings)
    if set(data.labels) <= set(teacher.labels):
        gold = data.gold(teacher.labels)
    else:  # a taxonomy the gold labels do not name: judge against the teacher alone
        say(f"the golden set's labels are not in {teacher.label_set_id}: macro-F1 is not judged")
        gold = np.full(len(data), -1, dtype=np.int64)
    with _LazyBar(len(data.texts), "the teacher labels the golden set") as bar:
        golden = golden_from_labelled(
            data.texts, data.locales, gold, teacher, settings.cache_dir, on_progress=bar.update
        )
    gate = settings.gate.model_copy(
        update={
            name: value
            for name in GateSettings.model_fields
            if (value := getattr(args, name, None)) is not None
        }
    )
    thresholds = Thresholds(
        **gate.model_dump(),
        new_label_set=args.new_label_set,
        languages=None if args.all_locales else frozenset(settings.served_languages),
    )
    decision = evaluate_candidate(candidate, current, golden, thresholds)
    report = decision.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for check in decision.checks:
        mark = "ok  " if check.passed else "FAIL"
        if isinstance(check.candidate, dict):  # per language: one line each, below
            print(f"{mark} {check.name:<14} limit {_fmt(check.limit)}")
            rows = decision.golden.get("languages", {})
            for name in sorted(check.candidate):
                judged = thresholds.languages is None or name in thresholds.languages
                note = "" if judged else "  (not served: not judged)"
                print(
                    f"       {name:<8} candidate {check.candidate[name]:.4f}  current {_fmt(check.current.get(name))}  rows {rows.get(name, '?')}{note}"
                )
            continue
        print(
            f"{mark} {check.name:<14} candidate {_fmt(check.candidate)}  current {_fmt(check.current)}  limit {_fmt(check.limit)}"
        )
    if not decision.promote:
        say(f"refused {candidate.version}: " + "; ".join(decision.reasons()))
        return 3
    if args.dry_run:
        say(f"{candidate.version} passes the gate (dry run: not published)")
        return 0
    registry = Registry(settings.registry_dir)
    if registry.current() is None:  # the first promotion: record what was served, for rollback
        registry.publish(registry.add(current.directory))
    release = registry.publish(registry.add(candidate.directory, report))
    say(
        f"promoted {release.version} (was {current.version}); workers reload it within {settings.model_poll_interval_s:g}s"
    )
    return 0


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return (
            "n/a" if math.isnan(value) else f"{value:.4f}"
        )  # nan: not measured (an FP32 model's INT8 parity)
    return str(value)


class _LazyBar:
    """A tqdm bar on stderr that appears only once there is progress (a cached result shows none)."""

    def __init__(self, total: int, description: str) -> None:
        self.total = total
        self.description = description
        self.bar: Any = None

    def update(self, n: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.description, unit="row", file=sys.stderr)
        self.bar.update(n)

    def __enter__(self) -> _LazyBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def rollback(settings: Settings, args: argparse.Namespace) -> int:
    from worker.models.registry import Registry

    old, new = Registry(settings.registry_dir).rollback()
    say(
        f"rolled back from {old.version} to {new.version}; workers reload it within {settings.model_poll_interval_s:g}s"
    )
    return 0


def models(settings: Settings, args: argparse.Namespace) -> int:
    from worker.models.registry import Registry

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
