"""4-bit embedding tables against INT8: size, label parity and speed, per student and group size.

For each model directory, its served INT8 model gets a 4-bit embedding table
(`worker.training.nibbles`) at each group size, and every variant is scored on the MASSIVE +
xSID validation texts: label agreement with the float export (``fp32.onnx``, when the directory
keeps it; the parity the trainer gates INT8 on) and with the INT8 model, and the per-utterance
p50 at 1 thread, measured interleaved with the INT8 model in the same rounds.
Writes benchmarks/results/embedding_4bit.json.
    .venv/bin/python benchmarks/embedding_bits.py models/student build/levers/disagreement
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from common import machine, write_result

from worker.config import Settings
from worker.data.corpora import load_labelled, massive_files, require_shared_data, shared_mapping, xsid_files
from worker.models.student import Student, chunked_logits
from worker.training.nibbles import embedding_to_4bit, gathered_table

GROUPS = (16, 32, 64)


def validation_texts(settings: Settings) -> list[str]:
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    texts: list[str] = []
    for files in (massive_files(shared), xsid_files(shared)):
        texts += load_labelled(files, mapping, split="validation").texts
    return texts


def p50_ms(students: dict[str, Student], texts: list[str], rounds: int) -> dict[str, float]:
    """Median per-utterance latency of each student, one utterance at a time, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in students}
    for _ in range(rounds):
        for text in texts:
            for name, student in students.items():
                started = time.perf_counter()
                student.logits([text])
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: round(statistics.median(values), 4) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("students", nargs="+", type=Path)
    parser.add_argument("--speed-texts", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = validation_texts(Settings())
    result: dict[str, Any] = {
        "machine": machine(),
        "n_texts": len(texts),
        "groups": list(GROUPS),
        "models": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="embedding-bits-"))
    try:
        for directory in args.students:
            int8 = Student(directory, threads=1)
            reference = chunked_logits(texts, int8, 256)
            fp32 = None
            if (directory / "fp32.onnx").exists():
                fp32 = chunked_logits(texts, Student(directory, threads=1, model_file="fp32.onnx"), 256)
            entry: dict[str, Any] = {
                "version": int8.version,
                "int8": {
                    "bytes": (directory / "model.onnx").stat().st_size,
                    "agreement_with_fp32": None
                    if fp32 is None
                    else round(float((fp32.argmax(1) == reference.argmax(1)).mean()), 5),
                },
                "four_bit": {},
            }
            variants: dict[str, Student] = {"int8": int8}
            for group in GROUPS:
                target = scratch / f"{directory.name}-g{group}"
                shutil.copytree(directory, target, ignore=shutil.ignore_patterns("fp32.onnx", "*.pt"))
                model = onnx.load(str(target / "model.onnx"))
                sizes = embedding_to_4bit(model, gathered_table(model), group)
                onnx.save(model, str(target / "model.onnx"))
                student = Student(target, threads=1)
                logits = chunked_logits(texts, student, 256)
                entry["four_bit"][str(group)] = {
                    "bytes": (target / "model.onnx").stat().st_size,
                    **sizes,
                    "agreement_with_int8": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 5),
                    "agreement_with_fp32": None
                    if fp32 is None
                    else round(float((fp32.argmax(1) == logits.argmax(1)).mean()), 5),
                    "mean_abs_logit_error_vs_int8": round(float(np.abs(logits - reference).mean()), 5),
                }
                variants[f"g{group}"] = student
            p50 = p50_ms(variants, texts[: args.speed_texts], args.rounds)
            entry["p50_ms_1_thread"] = p50
            entry["p50_ratio_to_int8"] = {name: round(ms / p50["int8"], 3) for name, ms in p50.items()}
            result["models"][str(directory)] = entry
            print(entry)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_result("embedding_4bit", result)


if __name__ == "__main__":
    main()
