"""What the issue-12 lever runs recorded, and a pruned student's INT8 under each of the
trainer's weight-only tries: benchmarks/results/levers*.json.

From each model directory's card: version, training rows, epochs, seconds, best epoch, INT8
parity and sizes, and the disagreement weights' summary. With ``--pruned DIR`` (a pruned
student keeping ``fp32.onnx``), its guarded INT8 is built once per try of the trainer
(`weight_only_tries`: FFN output and head weights weight-only INT8, then fewer of them), and
each is scored for label agreement with FP32 on the MASSIVE + xSID validation texts (the
trainer's parity texts); ``--write OUT`` publishes the smallest one at the bar as a model
directory (students trained before the tries existed).
    .venv/bin/python benchmarks/levers.py build/levers/disagreement build/levers/embedding \
        build/levers/pruned-0-11 --pruned build/levers/pruned-0-11
    .venv/bin/python benchmarks/levers.py build/levers/cnn-4bit build/levers/pruned-0-11 \
        --pruned build/levers/pruned-0-11 --out levers_size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from common import machine, write_result
from embedding_bits import validation_texts
from tokenizers import Tokenizer

from worker.config import Settings
from worker.teacher.e5format import E5File, default_weights_path
from worker.training.export import verify_parity
from worker.training.pruned.encoder import published_word_scales, quantise_guarded, weight_only_tries
from worker.training.run import MIN_INT8_AGREEMENT


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


def ffn_output_parity(directory: Path, texts: list[str], write: Path | None = None) -> dict[str, Any]:
    """Guarded INT8 of ``directory``'s fp32.onnx (its table at the teacher's 4 bits), once per
    try of the trainer (`weight_only_tries`), each with its label agreement with FP32 and its
    bytes. With ``write``, the smallest try at the parity bar is published there as a model
    directory: what a training run with this trainer would have shipped."""
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    scales = published_word_scales(E5File(default_weights_path()), tokenizer)
    fp32 = directory / "fp32.onnx"
    layers = json.loads((directory / "card.json").read_text())["architecture"]["n_layers"]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for weight_only in weight_only_tries(layers):
            name = "+".join(weight_only) or "none"
            int8 = Path(scratch) / f"{len(out)}.onnx"
            quantise_guarded(fp32, int8, weight_only=weight_only, word_scales=scales)
            parity = verify_parity(fp32, int8, tokenizer, texts, 64, threads=2)
            out[name] = {**parity, "weight_only_int8": list(weight_only), "bytes": int8.stat().st_size}
            print(name, out[name], flush=True)
            if write is not None and parity["label_agreement"] >= MIN_INT8_AGREEMENT:
                publish_requantised(directory, int8, out[name], write)
                out["written"] = {"directory": str(write), "weight_only_int8": list(weight_only)}
                break
    return out


def publish_requantised(directory: Path, int8: Path, parity: dict[str, Any], out: Path) -> None:
    """``directory`` with ``int8`` as its model.onnx, and a card that says so."""
    card = json.loads((directory / "card.json").read_text())
    source_version = card["version"]
    digest = hashlib.sha256(int8.read_bytes()).hexdigest()
    card["version"] = card["version"].rsplit("-", 1)[0] + "-" + digest[:10]
    card["int8"]["parity"] = {k: v for k, v in parity.items() if k != "bytes"}
    card["int8"]["shipped"] = True
    card["int8"]["requantised_from"] = {"version": source_version, "by": "benchmarks/levers.py --write"}
    card["sizes_bytes"]["model.onnx"] = int8.stat().st_size
    card["sha256"] = {"model.onnx": digest}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "labels.json", "fp32.onnx"):
        shutil.copy(directory / name, out / name)
    shutil.copy(int8, out / "model.onnx")
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--pruned", type=Path, help="a pruned student keeping fp32.onnx")
    parser.add_argument("--out", default="levers", help="results name: benchmarks/results/OUT.json")
    parser.add_argument("--write", type=Path, help="with --pruned: publish its smallest INT8 at the bar here")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": machine(),
        "models": {str(d): card_summary(d) for d in args.models},
    }
    if args.pruned is not None:
        result["pruned_int8_ffn_output"] = {
            "model": str(args.pruned),
            **ffn_output_parity(args.pruned, validation_texts(Settings()), args.write),
        }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
