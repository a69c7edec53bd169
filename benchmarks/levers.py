"""What the issue-12 lever runs recorded, and the pruned student's INT8 with and without its FFN
output weights stored INT8: benchmarks/results/levers.json.

From each model directory's card: version, training rows, epochs, seconds, best epoch, INT8
parity and sizes, and the disagreement weights' summary. With ``--pruned DIR`` (a pruned
student keeping ``fp32.onnx``), its guarded INT8 is built twice, with the FFN output weights
weight-only INT8 and with them float, and each is scored for label agreement with FP32 on the
MASSIVE + xSID validation texts (the trainer's parity texts).
    .venv/bin/python benchmarks/levers.py build/levers/disagreement build/levers/embedding \
        build/levers/pruned-0-11 --pruned build/levers/pruned-0-11
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import machine, write_result
from embedding_bits import validation_texts
from tokenizers import Tokenizer

from worker.config import Settings
from worker.training.export import verify_parity
from worker.training.pruned.encoder import WEIGHT_ONLY, quantise_guarded


def card_summary(directory: Path) -> dict[str, Any]:
    card = json.loads((directory / "card.json").read_text())
    training = card.get("training", {})
    history = training.get("history") or training.get("distillation", {}).get("history", [])
    return {
        "version": card["version"],
        "command": card.get("command"),
        "train_rows": card.get("data", {}).get("train_rows")
        or training.get("distillation", {}).get("train_rows"),
        "seconds": training.get("seconds") or training.get("distillation", {}).get("seconds"),
        "best_epoch": training.get("best_epoch"),
        "history": history,
        "disagreement_weighting": training.get("disagreement_weighting"),
        "int8": card.get("int8"),
        "sizes_bytes": card.get("sizes_bytes"),
        "vocabulary_size": card.get("vocabulary", {}).get("size")
        or card.get("vocabulary", {}).get("student_ids"),
    }


def ffn_output_parity(directory: Path, texts: list[str]) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    fp32 = directory / "fp32.onnx"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, weight_only in (("ffn_output_weight_only_int8", WEIGHT_ONLY), ("ffn_output_float", ())):
            int8 = quantise_guarded(fp32, Path(scratch) / f"{name}.onnx", weight_only=weight_only)
            parity = verify_parity(fp32, int8, tokenizer, texts, 64, threads=2)
            out[name] = {**parity, "bytes": int8.stat().st_size}
            print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--pruned", type=Path, help="a pruned student keeping fp32.onnx")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": machine(),
        "models": {str(d): card_summary(d) for d in args.models},
    }
    if args.pruned is not None:
        result["pruned_int8_ffn_output"] = {
            "model": str(args.pruned),
            **ffn_output_parity(args.pruned, validation_texts(Settings())),
        }
    write_result("levers", result)


if __name__ == "__main__":
    main()
