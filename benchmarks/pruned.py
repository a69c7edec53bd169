"""Pruned-transformer students against the teacher, the CNN and the bag: the paper's Figure 2 on our teacher.

Trains any missing pruned student (1, 2, 3, 4 and 6 kept layers; `refit` and `distil` modes)
through `intent-worker train`, then measures every model side by side in one run at 1 thread:
size (FP32 and INT8), p50 single-utterance latency, batch-256 throughput, agreement with the
teacher, PR-BEP gap, KL and 3-class accuracy on MASSIVE and xSID validation. Also shows what
vocabulary pruning keeps and that byte fallback leaves no unknown token on unseen scripts.
Writes benchmarks/results/pruned.json, pruned.md and pruned.png.
    .venv/bin/python benchmarks/pruned.py [--data .cache/datasets/dev] [--models build/pruned]
"""

from __future__ import annotations

import os

# One thread everywhere (numpy's BLAS reads this at import), as in the latency measurements.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS, machine, write_result
from students import speed_of

from worker.config import Settings
from worker.data import evaluation
from worker.data.corpora import load_labelled, massive_files, require_shared_data, shared_mapping, xsid_files
from worker.models.student import Student
from worker.teacher import E5_PREFIX, OnnxSequenceModel, OnnxTeacher
from worker.teacher.build import ensure_encoder
from worker.teacher.e5format import default_weights_path
from worker.training.pruned.encoder import LAYER_SETS, quantise_guarded

BIN = Path(sys.executable).parent
# Distillation recipe (CPU budget): 10% of the corpus's training rows, one epoch, max length 64.
DISTIL_ARGS = ["--mode", "distil", "--fraction", "0.1", "--epochs", "1"]
# Written by us, in scripts the distillation corpus (MASSIVE de/en/sw, Tatoeba) does not cover.
UNSEEN = {
    "Georgian": "ხვალ დილის შვიდზე მაღვიძარა დამიყენე",  # set an alarm for seven tomorrow morning
    "Amharic": "ነገ ጠዋት በሰባት ሰዓት አስነሳኝ",  # wake me at seven tomorrow morning
}


def variants() -> list[tuple[str, tuple[int, ...], list[str]]]:
    out = []
    for n, layers in LAYER_SETS.items():
        spec = ",".join(str(i) for i in layers)
        out.append((f"refit-L{n}", layers, ["--layers", spec, "--mode", "refit"]))
        out.append((f"distil-L{n}", layers, ["--layers", spec, *DISTIL_ARGS]))
    # The me5s recipe in full: 4 layers, distilled with MSE + cosine on the sentence embedding too.
    out.append(("distil-cos-L4", LAYER_SETS[4], ["--layers", "first4", *DISTIL_ARGS, "--cosine"]))
    return out


def train_missing(models: Path, data: Path) -> None:
    models.mkdir(parents=True, exist_ok=True)
    for name, _, extra in variants():
        if (models / name / "card.json").exists():
            continue
        command = [
            str(BIN / "intent-worker"), "train", "--arch", "pruned", "--threads", "1",
            "--data", str(data), "--out", str(models / name), *extra,
        ]  # fmt: skip
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def cached_logits(model: OnnxTeacher, texts: list[str], cache: Path) -> np.ndarray:
    """Teacher logits on the validation texts, cached by texts and teacher identity."""
    key = hashlib.sha256(json.dumps([model.identity, texts]).encode()).hexdigest()[:20]
    path = cache / "bench" / f"teacher-logits-{key}.npy"
    if path.exists():
        return np.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = model.logits(texts)
    np.save(path, values)
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(".cache/datasets/dev"))
    parser.add_argument("--models", type=Path, default=Path("build/pruned"))
    parser.add_argument("--cnn", type=Path, default=Path("models/student"))
    parser.add_argument("--bag", type=Path, default=Path("build/students/bag"))
    parser.add_argument("--render-only", action="store_true", help="redraw md/png from pruned.json")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "pruned.json").read_text()))
        return
    for path, what in (
        (args.cnn, "the cnn student (make student)"),
        (args.bag, "the bag student (make students)"),
    ):
        if not (path / "card.json").exists():
            sys.exit(f"{path} is missing: build {what} first")
    train_missing(args.models, args.data)

    settings = Settings(teacher_threads=1)
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    sets = {
        name: load_labelled(files, mapping, split="validation")
        for name, files in (("massive", massive_files(shared)), ("xsid", xsid_files(shared)))
    }
    files = ensure_encoder(settings.cache_dir, default_weights_path(), settings.teacher_max_length)
    graph = next(files.directory.glob("head-*.onnx"))
    labels = tuple(json.loads((settings.teacher_dir / "labels.json").read_text()))
    teacher = OnnxTeacher(
        OnnxSequenceModel(graph, files.tokenizer, output="logits", threads=1, prefix=E5_PREFIX),
        labels,
        f"teacher@{files.key[:8]}:{graph.name}",
    )
    texts = sets["massive"].texts + sets["xsid"].texts
    gold = np.concatenate([sets["massive"].gold(labels), sets["xsid"].gold(labels)])
    groups = ["massive"] * len(sets["massive"]) + ["xsid"] * len(sets["xsid"])
    print(f"teacher logits on {len(texts)} validation utterances ...", flush=True)
    teacher_logits = cached_logits(teacher, texts, settings.cache_dir)
    speed_texts = texts[::7][:600]
    teacher_eval = evaluation.evaluate(labels, teacher_logits, gold, groups)
    teacher_fp32 = sum((files.directory / n).stat().st_size for n in ("encoder.weights", graph.name))
    rows: list[dict[str, object]] = [
        {
            "model": "teacher",
            "family": "teacher",
            "layers": list(range(12)),
            "n_layers": 12,
            "size_fp32_mb": round(teacher_fp32 / 1e6, 1),
            # Not built here: 250,037 x 384 INT8 embeddings + 12 layers of INT8 weights.
            "size_int8_mb": None,
            "served": "fp32",
            **speed_of(teacher.logits, speed_texts),
            "agreement": 1.0,
            "pr_bep_gap": 0.0,
            "kl": 0.0,
            "massive_accuracy": teacher_eval["massive"].accuracy,
            "xsid_accuracy": teacher_eval["xsid"].accuracy,
            "accuracy": teacher_eval["overall"].accuracy,
        }
    ]
    model_dirs = [(name, args.models / name) for name, _, _ in variants()]
    model_dirs += [("cnn", args.cnn), ("bag", args.bag)]
    vocabulary: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp(prefix="pruned-int8-"))
    for name, directory in model_dirs:
        card = json.loads((directory / "card.json").read_text())
        arch = card["architecture"]
        shipped = bool(card["int8"]["shipped"])
        sizes = card["sizes_bytes"]
        student = Student(directory, threads=1)
        print(f"{name} ...", flush=True)
        report = evaluation.compare(labels, teacher_logits, chunked_logits(student, texts), gold, groups)
        row: dict[str, object] = {
            "model": name,
            "family": "pruned-" + card["mode"] if arch["arch"] == "pruned" else arch["arch"],
            "layers": arch.get("layers"),
            "n_layers": arch.get("n_layers"),
            "size_fp32_mb": round(sizes["fp32.onnx"] / 1e6, 2),
            "size_int8_mb": round(sizes.get("int8.onnx", sizes["model.onnx"]) / 1e6, 2),
            "served": "int8" if shipped else "fp32",
            **speed_of(student.logits, speed_texts),
            "agreement": report["overall"].agreement,
            "pr_bep_gap": report["overall"].pr_bep_gap,
            "kl": report["overall"].kl_mean,
            "massive_accuracy": report["massive"].student_accuracy,
            "xsid_accuracy": report["xsid"].student_accuracy,
            "accuracy": report["overall"].student_accuracy,
            "int8_parity": card["int8"]["parity"],
            "naive_int8_parity": card["int8"].get("naive_dynamic_parity"),
            "vocabulary": card["vocabulary"],
            "training": card.get("objective"),
        }
        if (directory / "fp32.onnx").exists() and shipped:
            fp32 = Student(directory, threads=1, model_file="fp32.onnx")
            row["fp32_speed"] = speed_of(fp32.logits, speed_texts)
        elif arch["arch"] == "pruned":
            # INT8 was refused at the parity gate; rebuild it (seconds) to show what it would gain.
            row["int8_speed"] = speed_of(refused_int8(directory, tmp).logits, speed_texts)
        if arch["arch"] == "pruned" and card["training"].get("distillation"):
            distillation = card["training"]["distillation"]
            row["distillation"] = {k: distillation[k] for k in ("train_rows", "epochs", "seconds", "history")}
        rows.append(row)
        if arch["arch"] == "pruned" and not vocabulary:
            vocabulary = byte_fallback_demo(student, card)
    result = {
        "machine": machine(),
        "teacher": teacher.identity,
        "validation_n": {k: len(v) for k, v in sets.items()},
        "speed_texts": len(speed_texts),
        "distil_recipe": " ".join(DISTIL_ARGS)
        + " (batch 32, encoder lr 5e-5, head lr 5e-4, max length 64, 1 thread)",
        "vocabulary": vocabulary,
        "rows": rows,
        "note": "speed: onnxruntime at 1 thread, tokenisation included, measured side by side in this run; "
        "quality: the served model (INT8 when it passed the parity gate)",
    }
    path = write_result("pruned", result)
    render(result)
    print(f"wrote {path}")


def chunked_logits(student: Student, texts: list[str], rows: int = 64) -> np.ndarray:
    """Logits in chunks of similar length: one 8k-text batch pads every text to the longest,
    which costs a transformer quadratically (the CNN students barely notice)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [student.logits([texts[i] for i in order[s : s + rows]]) for s in range(0, len(order), rows)]
    merged = np.concatenate(parts)
    out = np.empty_like(merged)
    out[np.asarray(order)] = merged
    return out


def refused_int8(directory: Path, tmp: Path) -> Student:
    """The guarded INT8 of a pruned student that shipped FP32, as a model directory of its own."""
    out = tmp / directory.name
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "labels.json", "card.json"):
        shutil.copy(directory / name, out / name)
    quantise_guarded(directory / "fp32.onnx", out / "model.onnx")
    return Student(out, threads=1)


def byte_fallback_demo(student: Student, card: dict[str, object]) -> dict[str, object]:
    """Tokens of sentences in scripts the corpus lacks: no <unk>, characters become bytes."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(student.directory / "tokenizer.json"))
    unk = tokenizer.token_to_id("<unk>")
    examples = {}
    for script, text in UNSEEN.items():
        encoding = tokenizer.encode(text)
        examples[script] = {
            "text": text,
            "tokens": len(encoding.ids),
            "unknown": sum(i == unk for i in encoding.ids),
            "byte_tokens": sum(t.startswith("<0x") for t in encoding.tokens),
            "first_tokens": encoding.tokens[:8],
        }
    return {**card["vocabulary"], "unseen_scripts": examples}  # type: ignore[dict-item]


def _fmt(value: object, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "-"
    number = float(value) * scale  # type: ignore[arg-type]
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def render(result: dict[str, object]) -> None:
    rows: list[dict[str, object]] = result["rows"]  # type: ignore[assignment]
    lines = [
        "| model | layers | FP32 MB | INT8 MB | served | p50 ms | batch-256 utt/s | other precision: p50 ms | utt/s | agree % | PR-BEP gap | KL | MASSIVE acc % | xSID acc % | INT8/FP32 agree % (naive INT8) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp32: dict[str, float] = r.get("fp32_speed") or r.get("int8_speed") or {}  # type: ignore[assignment]
        parity: dict[str, float] = r.get("int8_parity") or {}  # type: ignore[assignment]
        naive: dict[str, float] = r.get("naive_int8_parity") or {}  # type: ignore[assignment]
        parity_text = "-"
        if parity:
            parity_text = _fmt(parity["label_agreement"], 100)
            if naive:
                parity_text += f" ({_fmt(naive['label_agreement'], 100)})"
        layers = r.get("layers")
        lines.append(
            f"| {r['model']} | {layers if layers is not None else '-'} | {_fmt(r['size_fp32_mb'])} | {_fmt(r['size_int8_mb'])} "
            f"| {r['served']} | {_fmt(r['p50_ms'], digits=2)} | {_fmt(r['batch256_utt_per_s'], digits=0)} "
            f"| {_fmt(fp32.get('p50_ms'), digits=2)} | {_fmt(fp32.get('batch256_utt_per_s'), digits=0)} "
            f"| {_fmt(r['agreement'], 100)} | {_fmt(r['pr_bep_gap'], 100, 2, signed=True)} | {_fmt(r['kl'], digits=4)} "
            f"| {_fmt(r['massive_accuracy'], 100)} | {_fmt(r['xsid_accuracy'], 100)} | {parity_text} |"
        )
    vocab: dict[str, object] = result.get("vocabulary") or {}  # type: ignore[assignment]
    if vocab:
        lines += [
            "",
            f"Vocabulary: {vocab['kept_teacher_pieces']} of {vocab['teacher_pieces']} teacher pieces kept "
            f"(+256 bytes, pad, unk, <s>, </s> = {vocab['student_ids']} ids) from {vocab['corpus']}; "
            f"embedding table {vocab['embedding_mb_fp32']} MB instead of {vocab['teacher_embedding_mb_fp32']} MB "
            f"FP32 (saves {vocab['saved_mb_fp32']} MB).",
        ]
        for script, ex in vocab["unseen_scripts"].items():  # type: ignore[attr-defined]
            lines.append(
                f"- {script} `{ex['text']}`: {ex['tokens']} tokens, {ex['unknown']} unknown, {ex['byte_tokens']} byte tokens"
            )
    (RESULTS / "pruned.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "pruned.png")
    print("\n".join(lines))


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Figure 2 of the paper: latency against kept layers (top), quality gap (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    teacher = next(r for r in rows if r["family"] == "teacher")
    for family, marker in (("pruned-refit", "o-"), ("pruned-distil", "s-")):
        members = sorted(
            (r for r in rows if r["family"] == family and not str(r["model"]).startswith("distil-cos")),
            key=lambda r: int(r["n_layers"]),  # type: ignore[call-overload]
        )
        if not members:
            continue
        xs = [int(r["n_layers"]) for r in members]  # type: ignore[call-overload]
        top.plot(xs, [float(r["p50_ms"]) for r in members], marker, label=f"{family} (served)")  # type: ignore[arg-type]
        bottom.plot(
            xs, [100 * float(r["pr_bep_gap"]) for r in members], marker, label=f"{family}: PR-BEP gap"
        )  # type: ignore[arg-type]
        bottom.plot(
            xs, [100 * (1 - float(r["agreement"])) for r in members], marker, alpha=0.4,  # type: ignore[arg-type]
            label=f"{family}: disagreement",
        )  # fmt: skip
        for key, tag in (("fp32_speed", "FP32"), ("int8_speed", "INT8, refused at the parity gate")):
            other = [r for r in members if r.get(key)]
            if other:
                top.plot(
                    [int(r["n_layers"]) for r in other],  # type: ignore[call-overload]
                    [float(r[key]["p50_ms"]) for r in other],  # type: ignore[index]
                    marker.replace("-", ":"), alpha=0.5, label=f"{family} ({tag})",
                )  # fmt: skip
    for r in rows:
        if str(r["model"]).startswith("distil-cos"):
            top.plot([int(r["n_layers"])], [float(r["p50_ms"])], "D", label=f"{r['model']} (me5s: + cosine)")  # type: ignore[call-overload,arg-type]
            bottom.plot(
                [int(r["n_layers"])], [100 * float(r["pr_bep_gap"])], "D", label=f"{r['model']}: PR-BEP gap"
            )  # type: ignore[call-overload,arg-type]
    top.plot([12], [float(teacher["p50_ms"])], "k*", markersize=12, label="teacher (12 layers, FP32)")  # type: ignore[arg-type]
    bottom.plot([12], [0.0], "k*", markersize=12, label="teacher")
    colours = {"cnn": "tab:red", "bag": "tab:green"}
    for r in rows:
        if r["family"] in colours:
            colour = colours[str(r["family"])]
            top.axhline(
                float(r["p50_ms"]), color=colour, linestyle="--", label=f"{r['model']} ({r['served']})"
            )  # type: ignore[arg-type]
            bottom.axhline(
                100 * float(r["pr_bep_gap"]), color=colour, linestyle="--", label=f"{r['model']}: PR-BEP gap"
            )  # type: ignore[arg-type]
    top.set_yscale("log")
    top.set_ylabel("p50 latency per utterance, ms (1 thread, log)")
    top.set_title("Pruned teacher T_l vs students: latency")
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=7)
    bottom.set_xlabel("encoder layers kept (l)")
    bottom.set_ylabel("gap to the teacher, points")
    bottom.set_title("Quality gap to the full teacher (MASSIVE + xSID validation)")
    bottom.set_xticks([1, 2, 3, 4, 6, 12])
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
