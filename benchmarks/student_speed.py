"""Student speed against the teacher, interleaved, at one thread: benchmarks/results/student_speed.json.

``students.py`` measures every model once, in sequence, inside a long run; on a shared
2-core machine one noisy minute can move a single row. This re-measures only speed, in
rounds: each round times the teacher and every student one after the other on the same
texts, and each speed-up is the median over rounds of that round's own ratio.

    .venv/bin/python benchmarks/student_speed.py models/student build/students/bag [--rounds 7]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread, as the worker runs

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import machine, median_ms, write_result

from worker.config import Settings
from worker.data.corpora import load_labelled, massive_files, require_shared_data, shared_mapping, xsid_files
from worker.models.student import Student
from worker.teacher import E5_PREFIX, OnnxSequenceModel, OnnxTeacher
from worker.teacher.build import ensure_encoder
from worker.teacher.e5format import default_weights_path

LogitsFn = Callable[[list[str]], object]


def batch_rate(logits: LogitsFn, batch: list[str], repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        logits(batch)
        runs.append(time.perf_counter() - started)
    return len(batch) / float(np.median(runs))


def single_p50_ms(logits: LogitsFn, texts: list[str], calls: int) -> float:
    feed = iter(texts * (1 + calls // len(texts)))
    return median_ms(lambda: logits([next(feed)]), repeats=calls)["p50_ms"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("students", type=Path, nargs="+", help="model directories")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--singles", type=int, default=300, help="single-utterance calls per round")
    args = parser.parse_args()
    settings = Settings()
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    texts = [
        text
        for files in (massive_files(shared), xsid_files(shared))
        for text in load_labelled(files, mapping, split="validation").texts
    ][::7][:600]  # the texts students.py times
    files = ensure_encoder(settings.cache_dir, default_weights_path(), settings.teacher_max_length)
    graph = next(files.directory.glob("head-*.onnx"))
    teacher = OnnxTeacher(
        OnnxSequenceModel(graph, files.tokenizer, output="logits", threads=1, prefix=E5_PREFIX),
        ("Action", "Other", "Recall"),  # timing only: the names do not matter
        "teacher-1-thread",
    )
    models: dict[str, LogitsFn] = {"teacher": teacher.logits}
    for directory in args.students:
        student = Student(directory, threads=1)
        models[f"{directory.name} ({student.version})"] = student.logits
    single: dict[str, list[float]] = {name: [] for name in models}
    batch: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name, logits in models.items():
            single[name].append(single_p50_ms(logits, texts, args.singles))
            batch[name].append(batch_rate(logits, texts[:256]))
        print(
            f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {single[n][-1]:.3f} ms" for n in models)
        )
    rows = []
    for name in models:
        rows.append(
            {
                "model": name,
                "p50_ms_median_of_rounds": round(statistics.median(single[name]), 4),
                "p50_ms_per_round": single[name],
                "batch256_utt_per_s_median": round(statistics.median(batch[name]), 1),
                "speedup_p50_median_of_round_ratios": round(
                    statistics.median(t / s for t, s in zip(single["teacher"], single[name], strict=True)), 1
                ),
                "speedup_batch_median_of_round_ratios": round(
                    statistics.median(s / t for t, s in zip(batch["teacher"], batch[name], strict=True)), 1
                ),
            }
        )
    result = {
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "texts": len(texts),
        "rounds": args.rounds,
        "how": "1 thread, tokenisation included; each round times every model on the same texts; "
        "speed-ups are medians of the per-round ratios",
        "command": "python benchmarks/student_speed.py " + " ".join(str(p) for p in args.students),
        "rows": rows,
    }
    print(json.dumps(rows, indent=1))
    print(f"wrote {write_result('student_speed', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
