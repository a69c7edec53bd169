"""A cascade of two students: agreement with the teacher against mean cost, per language.

The first student (the CNN) answers when its top-2 margin is at least a threshold; the others
escalate to the second (a pruned transformer). For each threshold, on the sets of
`multilingual.py` (xSID and MASSIVE validation, held-back traffic, the smoke fixture):
agreement with the teacher overall and per language, and the share of utterances escalated.

Cost per utterance at 1 thread is measured interleaved in one run (the teacher, the first and
the second student on the same texts, one at a time, medians over rounds), and the mean cost of
a threshold is ``first + escalated × second``. Writes benchmarks/results/cascade.json and .png.

    .venv/bin/python benchmarks/cascade.py --traffic .cache/datasets/traffic models/student build/gpu/pruned-0-11
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, machine, write_result
from multilingual import XSID_TARGETS, evaluation_sets

from worker.config import Settings
from worker.data.corpora import language_of
from worker.models.student import Student, chunked_logits

THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)


def margins(logits: Any) -> Any:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def per_utterance_ms(models: dict[str, Any], texts: list[str], rounds: int) -> dict[str, float]:
    """Median over rounds of the median single-utterance latency, models interleaved per round."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, score in models.items():
            times = []
            for text in texts:
                started = time.perf_counter()
                score([text])
                times.append(time.perf_counter() - started)
            samples[name].append(float(np.median(times)) * 1000)
    return {name: round(float(np.median(values)), 4) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("first", type=Path, help="the fast student")
    parser.add_argument("second", type=Path, help="the student uncertain utterances escalate to")
    parser.add_argument("--traffic", type=Path, default=Path(".cache/datasets/traffic"))
    parser.add_argument("--speed-texts", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="cascade", help="results name: benchmarks/results/OUT.{json,png}")
    args = parser.parse_args()
    settings = Settings()
    teacher, sets = evaluation_sets(settings, args.traffic)
    first, second = Student(args.first, threads=1), Student(args.second, threads=1)
    if first.labels != second.labels or first.labels != teacher.labels:
        raise SystemExit(f"label lists differ: {first.labels} {second.labels} {teacher.labels}")
    pool = [t for texts, _, _ in sets.values() for t in texts]
    speed_texts = random.Random(0).sample(pool, min(args.speed_texts, len(pool)))
    cost = per_utterance_ms(
        {"teacher": teacher.logits, "first": first.logits, "second": second.logits}, speed_texts, args.rounds
    )
    result: dict[str, Any] = {
        "machine": machine(),
        "teacher": teacher.identity,
        "first": {"path": str(args.first), "version": first.version},
        "second": {"path": str(args.second), "version": second.version},
        "cost_ms_per_utterance_p50": cost,
        "speed_texts": len(speed_texts),
        "rounds": args.rounds,
        "thresholds": {},
    }
    scored = {}
    for name, (texts, groups, teacher_logits) in sets.items():
        a, b = chunked_logits(texts, first, 64), chunked_logits(texts, second, 64)
        want = np.argmax(teacher_logits, 1)
        languages = np.array([language_of(g) for g in groups])
        scored[name] = (margins(a), a.argmax(1) == want, b.argmax(1) == want, languages)
    for t in THRESHOLDS:
        entry: dict[str, Any] = {}
        for name, (margin, first_ok, second_ok, languages) in scored.items():
            up = margin < t
            ok = np.where(up, second_ok, first_ok)
            per = {
                lang: {
                    "agreement": round(float(ok[languages == lang].mean()), 4),
                    "escalated": round(float(up[languages == lang].mean()), 4),
                    "n": int((languages == lang).sum()),
                }
                for lang in sorted(set(languages.tolist()))
            }
            escalated = float(up.mean())
            entry[name] = {
                "agreement": round(float(ok.mean()), 4),
                "escalated": round(escalated, 4),
                "mean_cost_ms": round(cost["first"] + escalated * cost["second"], 4),
                "per_language": per,
            }
        xsid = entry["xsid"]["per_language"]
        entry["validation_overall"] = round(
            float(
                np.concatenate(
                    [np.where(scored[n][0] < t, scored[n][2], scored[n][1]) for n in ("massive", "xsid")]
                ).mean()
            ),
            4,
        )
        entry["xsid_targets_min"] = min(xsid[lang]["agreement"] for lang in XSID_TARGETS)
        entry["speedup_vs_teacher_traffic"] = round(
            cost["teacher"] / entry["traffic_held_back"]["mean_cost_ms"], 1
        )
        result["thresholds"][str(t)] = entry
        print(
            f"t={t:<5} overall {entry['validation_overall']:.3f}  xsid-min {entry['xsid_targets_min']:.3f}  "
            f"traffic {entry['traffic_held_back']['agreement']:.3f} "
            f"(escalated {entry['traffic_held_back']['escalated']:.2f}, "
            f"{entry['speedup_vs_teacher_traffic']}x teacher)  "
            f"smoke {entry['smoke']['agreement']:.3f}",
            flush=True,
        )
    write_result(args.out, result)
    plot(result, RESULTS / f"{args.out}.png")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher_ms = result["cost_ms_per_utterance_p50"]["teacher"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in ("xsid", "massive", "traffic_held_back", "smoke"):
        points = [(e[name]["mean_cost_ms"], e[name]["agreement"]) for e in result["thresholds"].values()]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.axvline(
        teacher_ms / 20, color="grey", linestyle="--", linewidth=0.8, label="20x faster than the teacher"
    )
    ax.set_xlabel("mean cost per utterance, ms at 1 thread (first + escalated x second)")
    ax.set_ylabel("agreement with the teacher")
    ax.set_title("cascade: margin thresholds 0 (first only) to 1.01 (second only)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
