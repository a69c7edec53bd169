"""Per-language agreement with the teacher: the issue-12 must-shows, for any number of students.

One run scores every student on the same rows, beside the teacher's logits:
- xSID validation, per locale (ar, de, en, id, it, ja, nl, tr, zh, and the dialects);
- MASSIVE validation (en-US, de-DE, sw-KE);
- the held-back traffic slice: rows of the traffic dataset whose id hashes into the trainer's
  5% validation bucket, never trained on (teacher logits read from the dataset);
- the multilingual smoke fixture (tests/data/multilingual_smoke.jsonl, written by us).
Writes benchmarks/results/multilingual.json and multilingual.png.
    .venv/bin/python benchmarks/multilingual.py --traffic .cache/datasets/traffic models/student build/x
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, machine, write_result

from worker.config import Settings
from worker.data import evaluation
from worker.data.corpora import (
    language_of,
    load_labelled,
    massive_files,
    read_jsonl,
    require_shared_data,
    shared_mapping,
    xsid_files,
)
from worker.loop.dataset import iter_batches, split_bucket
from worker.loop.gate import golden_from_labelled
from worker.models.student import Student, chunked_logits
from worker.teacher import load_teacher

SMOKE = Path(__file__).resolve().parents[1] / "tests" / "data" / "multilingual_smoke.jsonl"
XSID_TARGETS = ("ar", "de", "en", "id", "it", "ja", "nl", "tr", "zh")


def held_back_traffic(dataset: Path, valid_fraction: float = 0.05) -> tuple[list[str], list[str], Any]:
    texts, locales, logits = [], [], []
    for batch in iter_batches(dataset):
        for i, row_id in enumerate(batch.ids):
            if split_bucket(row_id) < valid_fraction:
                texts.append(batch.texts[i])
                locales.append(language_of(batch.locales[i]))
                logits.append(batch.teacher_logits[i])
    return texts, locales, np.asarray(logits, np.float32)


def agreement_by(groups: list[str], labels: tuple[str, ...], teacher: Any, student: Any) -> dict[str, Any]:
    """Agreement (and KL) with the teacher per group and overall, from the evaluation harness."""
    report = evaluation.compare(labels, teacher, student, groups=groups)
    overall = report.pop("overall")
    return {
        "overall": round(overall.agreement, 4),
        "n": overall.n,
        "kl": round(overall.kl_mean, 4),
        "per_group": {g: {"agreement": round(c.agreement, 4), "n": c.n} for g, c in sorted(report.items())},
    }


Sets = dict[str, tuple[list[str], list[str], Any]]


def evaluation_sets(settings: Settings, traffic: Path) -> tuple[Any, Sets]:
    """The teacher and every scored set: (texts, language groups, the teacher's logits) by name."""
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    teacher = load_teacher(settings)
    # One golden set, as `promote` builds it (MASSIVE then xSID): the teacher's logits are cached.
    massive = load_labelled(massive_files(shared), mapping, split="validation")
    xsid = load_labelled(xsid_files(shared), mapping, split="validation")
    texts, locales = massive.texts + xsid.texts, massive.locales + xsid.locales
    gold = np.concatenate([massive.gold(teacher.labels), xsid.gold(teacher.labels)])
    golden = golden_from_labelled(texts, locales, gold, teacher, settings.cache_dir)
    n = len(massive)
    sets: Sets = {
        "massive": (massive.texts, massive.locales, golden.teacher_logits[:n]),
        "xsid": (xsid.texts, xsid.locales, golden.teacher_logits[n:]),
    }
    sets["traffic_held_back"] = held_back_traffic(traffic)
    smoke = list(read_jsonl(SMOKE))
    smoke_texts = [str(r["text"]) for r in smoke]
    sets["smoke"] = (smoke_texts, [str(r["locale"]) for r in smoke], teacher.logits(smoke_texts))
    return teacher, sets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("students", nargs="+", type=Path, help="model directories to score")
    parser.add_argument("--traffic", type=Path, default=Path(".cache/datasets/traffic"))
    parser.add_argument("--out", default="multilingual")
    args = parser.parse_args()
    teacher, sets = evaluation_sets(Settings(), args.traffic)
    result: dict[str, Any] = {"machine": machine(), "teacher": teacher.identity, "models": {}}
    for directory in args.students:
        student = Student(directory, threads=1)
        scores: dict[str, Any] = {"version": student.version}
        all_same = []
        for name, (texts, groups, teacher_logits) in sets.items():
            logits = chunked_logits(texts, student, 64)
            scores[name] = agreement_by(groups, teacher.labels, teacher_logits, logits)
            if name in ("xsid", "massive"):
                all_same.append(np.argmax(teacher_logits, 1) == np.argmax(logits, 1))
        scores["validation_overall"] = round(float(np.concatenate(all_same).mean()), 4)
        scores["xsid_targets_min"] = min(
            scores["xsid"]["per_group"][lang]["agreement"] for lang in XSID_TARGETS
        )
        result["models"][str(directory)] = scores
        print(
            json.dumps(
                {
                    str(directory): {
                        k: scores[k] for k in ("version", "validation_overall", "xsid_targets_min")
                    }
                }
            )
        )
    write_result(args.out, result)
    plot(result, RESULTS / f"{args.out}.png")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(13, 8))
    for ax, name, title in (
        (axes[0], "xsid", "xSID validation: agreement with the teacher per locale"),
        (axes[1], "traffic_held_back", "held-back traffic (5%): agreement with the teacher per language"),
    ):
        models = list(result["models"].items())
        groups = sorted({g for _, m in models for g in m[name]["per_group"]})
        width = 0.8 / max(len(models), 1)
        for k, (label, scores) in enumerate(models):
            values = [scores[name]["per_group"].get(g, {}).get("agreement", 0.0) for g in groups]
            ax.bar(
                np.arange(len(groups)) + k * width,
                values,
                width,
                label=f"{Path(label).name} ({scores['version']})",
            )
        ax.axhline(0.95 if name == "traffic_held_back" else 0.90, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        ax.set_ylim(0.3, 1.0)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
