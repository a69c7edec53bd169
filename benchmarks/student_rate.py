"""Inference alone: utterances per second of a student on one thread, outside any worker.

The worker's classify step (``classify_chunked``, micro-batches of 256, chunks of
``inference_rows``) over the same texts, so the gap between this rate and the worker's is
what streaming costs. Prints one JSON object.

    python benchmarks/student_rate.py models/student --texts 20000
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers loads, as `intent-worker run` does

import argparse
import json
import sys
import time
from pathlib import Path

from streams import median, shared_texts

from worker.config import Settings
from worker.models.student import Student, classify_chunked

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("student", type=Path)
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = Settings()
    rows = shared_texts(settings.shared_data_dir)
    texts = [text for text, _ in rows[: args.texts]]
    student = Student(args.student, threads=1)
    classify_chunked(texts[: args.batch], student, settings.inference_rows)  # warm-up
    rates = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for start in range(0, len(texts), args.batch):
            classify_chunked(texts[start : start + args.batch], student, settings.inference_rows)
        rates.append(len(texts) / (time.perf_counter() - started))
    print(
        json.dumps(
            {
                "student_version": student.version,
                "texts": len(texts),
                "batch": args.batch,
                "rows": settings.inference_rows,
                "utterances_per_s_median": round(median(rates)),
                "utterances_per_s": [round(r) for r in rates],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
