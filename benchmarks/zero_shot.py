"""Zero-shot teachers on the validation splits, beside the trained head.

Every validation text is embedded once per e5 prefix and cached (zero_shot_embed.py); every
arrangement below is numpy on those arrays. Writes benchmarks/results/zero_shot.json.
    .venv/bin/python benchmarks/zero_shot.py

- 3 labels (models/labels/intents-3.json: descriptions only; intents-3-examples.json: plus
  5 example utterances per label, written for this, not taken from the data): accuracy and
  macro-F1 on MASSIVE and xSID validation for each prefix arrangement and pooling, the
  trained head (models/teacher) beside them, the temperature's calibration, a content-free
  bias correction.
- 18 labels (models/labels/massive-scenarios.json): scenario accuracy on MASSIVE validation.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

_HERE = str(Path(__file__).resolve().parent)
while _HERE in sys.path:
    sys.path.remove(_HERE)
import worker  # noqa: F401

sys.path.append(_HERE)
from common import machine, write_result
from zero_shot_embed import CachedEncoder

from worker.config import MODELS_DIR, Settings
from worker.data.corpora import (
    LabelledSet,
    load_labelled,
    massive_files,
    read_jsonl,
    require_shared_data,
    shared_mapping,
    xsid_files,
)
from worker.data.evaluation import accuracy, macro_f1, softmax
from worker.teacher.head import forward, load_head
from worker.teacher.label_set import LabelSet
from worker.teacher.runtime import read_labels
from worker.teacher.zero_shot import PASSAGE, QUERY, Pooling, ZeroShotConfig, label_matrix, prototypes, score

Array = npt.NDArray[np.float32]
LABELS = MODELS_DIR / "labels"
PREFIX_NAMES = {QUERY: "query", PASSAGE: "passage"}
TEMPERATURES = (0.005, 0.01, 0.02, 0.03, 0.05)
# Texts with no intent in them, for the content-free bias correction (Zhao et al., 2021).
CONTENT_FREE = ("", "N/A", "[MASK]", "...")


class Evaluation:
    """The validation sets, their cached embeddings and the prototypes' embeddings."""

    def __init__(self, settings: Settings) -> None:
        shared = require_shared_data(settings.shared_data_dir)
        mapping = shared_mapping(shared)
        self.encoder = CachedEncoder(settings)
        self.sets: dict[str, LabelledSet] = {
            "massive": load_labelled(massive_files(shared), mapping, split="validation"),
            "xsid": load_labelled(xsid_files(shared), mapping, split="validation"),
        }
        self.embeddings = {
            (name, prefix): self.encoder.embed(name, data.texts, prefix)
            for name, data in self.sets.items()
            for prefix in PREFIX_NAMES
        }
        self.scenarios = [
            str(row["scenario"])
            for path in massive_files(shared)
            for row in read_jsonl(path)
            if row.get("split") == "validation"
        ]
        self._texts: dict[str, Array] = {}
        sample = traffic_sample(shared)
        self.traffic = {prefix: self.encoder.embed("traffic", sample, prefix) for prefix in PREFIX_NAMES}

    def embed_texts(self, texts: list[str]) -> Array:
        missing = [t for t in texts if t not in self._texts]
        if missing:
            for text, row in zip(missing, self.encoder.model.run(missing), strict=True):
                self._texts[text] = row
        return np.stack([self._texts[t] for t in texts])

    def scores(self, utterances: Array, label_set: LabelSet, config: ZeroShotConfig) -> Array:
        protos = prototypes(label_set, config)
        return score(utterances, label_matrix(protos, self.embed_texts(list(protos.texts))), config)

    def logits(
        self, name: str, label_set: LabelSet, config: ZeroShotConfig, bias: Array | None = None
    ) -> Array:
        values = self.scores(self.embeddings[(name, config.utterance_prefix)], label_set, config)
        return values if bias is None else values - bias

    def content_free_bias(self, label_set: LabelSet, config: ZeroShotConfig) -> Array:
        free = self.embed_texts([config.utterance_prefix + t for t in CONTENT_FREE])
        mean: Array = self.scores(free, label_set, config).mean(axis=0)
        return mean

    def traffic_bias(self, label_set: LabelSet, config: ZeroShotConfig) -> Array:
        mean: Array = self.scores(self.traffic[config.utterance_prefix], label_set, config).mean(axis=0)
        return mean


def traffic_sample(shared: Path, per_locale: int = 100) -> list[str]:
    """Unlabelled traffic, ``per_locale`` rows of each language (a seeded shuffle)."""
    texts: list[str] = []
    for path in sorted((shared / "traffic").glob("*.jsonl")):
        rows = [str(row["text"]) for row in read_jsonl(path)]
        random.Random(0).shuffle(rows)
        texts += rows[:per_locale]
    return texts


def three_class(ev: Evaluation, name: str, logits: Array, labels: tuple[str, ...]) -> dict[str, object]:
    data = ev.sets[name]
    gold = data.gold(labels)
    pred = logits.argmax(axis=1)
    clear = ~np.asarray(data.ambiguous)
    return {
        "accuracy": round(100 * accuracy(gold, pred), 2),
        "macro_f1": round(100 * macro_f1(gold, pred, len(labels)), 2),
        "accuracy_without_ambiguous": round(100 * accuracy(gold[clear], pred[clear]), 2),
        "macro_f1_without_ambiguous": round(100 * macro_f1(gold[clear], pred[clear], len(labels)), 2),
        "n": len(gold),
    }


def calibration(logits: Array, gold: npt.NDArray[np.int64], bins: int = 15) -> dict[str, float]:
    """NLL and expected calibration error (15 equal-width confidence bins)."""
    p = softmax(logits)
    nll = float(-np.log(np.maximum(p[np.arange(len(gold)), gold], 1e-12)).mean())
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == gold
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return {
        "nll": round(nll, 4),
        "ece": round(100 * float(ece), 2),
        "mean_confidence": round(100 * float(confidence.mean()), 2),
    }


def arrangements(*, with_examples: bool = True) -> list[ZeroShotConfig]:
    """Every prefix arrangement x pooling x (examples pooled or not) x (names or not)."""
    out = []
    example_options = (
        list(itertools.product(PREFIX_NAMES, (True, False))) if with_examples else [(QUERY, True)]
    )
    for utt, desc, (ex, centroid), pooling, names in itertools.product(
        PREFIX_NAMES, PREFIX_NAMES, example_options, Pooling, (False, True)
    ):
        out.append(
            ZeroShotConfig(
                utterance_prefix=utt,
                description_prefix=desc,
                example_prefix=ex,
                pooling=pooling,
                examples_as_centroid=centroid,
                use_names=names,
            )
        )
    return out


def describe(config: ZeroShotConfig, *, with_examples: bool = True) -> str:
    parts = [
        f"utterance={PREFIX_NAMES[config.utterance_prefix]}",
        f"description={PREFIX_NAMES[config.description_prefix]}",
    ]
    if with_examples:
        parts.append(f"example={PREFIX_NAMES[config.example_prefix]}")
        parts.append("examples=centroid" if config.examples_as_centroid else "examples=each")
    parts.append(f"pooling={config.pooling.value}")
    if config.use_names:
        parts.append("+names")
    return " ".join(parts)


def per_locale(ev: Evaluation, name: str, logits: Array, labels: tuple[str, ...]) -> dict[str, float]:
    data = ev.sets[name]
    gold, pred = data.gold(labels), logits.argmax(axis=1)
    locales = np.asarray(data.locales)
    return {
        str(loc): round(100 * accuracy(gold[locales == loc], pred[locales == loc]), 1)
        for loc in sorted(set(data.locales))
    }


def both_sets(
    ev: Evaluation, label_set: LabelSet, config: ZeroShotConfig, bias: str = ""
) -> dict[str, object]:
    out = {}
    for name in ev.sets:
        offset = None
        if bias == "content_free":
            offset = ev.content_free_bias(label_set, config)
        elif bias == "traffic":
            offset = ev.traffic_bias(label_set, config)
        out[name] = three_class(ev, name, ev.logits(name, label_set, config, offset), label_set.names)
    return out


def mean_f1(result: dict[str, object]) -> float:
    return float(np.mean([r["macro_f1"] for r in result.values()]))  # type: ignore[index]


def three_labels(ev: Evaluation, default: ZeroShotConfig) -> dict[str, object]:
    """Both 3-label sets: the default arrangement in detail, and the whole grid."""
    sets = [LabelSet.from_file(LABELS / f) for f in ("intents-3.json", "intents-3-examples.json")]
    report: dict[str, object] = {}
    for label_set in sets:
        report[label_set.name] = {
            "label_set": label_set.id,
            "file": f"models/labels/{label_set.name}.json",
            "default_arrangement": both_sets(ev, label_set, default),
            "per_locale_accuracy": {
                name: per_locale(ev, name, ev.logits(name, label_set, default), label_set.names)
                for name in ev.sets
            },
            "bias_correction": {
                "content_free": both_sets(ev, label_set, default, "content_free"),
                "unlabelled_traffic_mean": both_sets(ev, label_set, default, "traffic"),
            },
            "calibration_by_temperature": {
                str(t): {
                    name: calibration(
                        ev.logits(name, label_set, replace(default, temperature=t)),
                        ev.sets[name].gold(label_set.names),
                    )
                    for name in ev.sets
                }
                for t in TEMPERATURES
            },
        }
    rows = []
    for config in arrangements():
        results = {s.name: both_sets(ev, s, config) for s in sets}
        score_ = float(np.mean([mean_f1(r) for r in results.values()]))
        rows.append({"arrangement": describe(config), "mean_macro_f1": round(score_, 2), **results})
    rows.sort(key=lambda r: -float(r["mean_macro_f1"]))  # type: ignore[arg-type]
    report["arrangements"] = rows
    report["selected"] = rows[0]["arrangement"]
    report["default_is_selected"] = rows[0]["arrangement"] == describe(default)
    return report


def scenarios(ev: Evaluation, default: ZeroShotConfig) -> dict[str, object]:
    label_set = LabelSet.from_file(LABELS / "massive-scenarios.json")
    gold = np.array([label_set.names.index(s) for s in ev.scenarios], dtype=np.int64)

    def measure(config: ZeroShotConfig) -> dict[str, object]:
        pred = ev.logits("massive", label_set, config).argmax(axis=1)
        return {
            "accuracy": round(100 * accuracy(gold, pred), 2),
            "macro_f1": round(100 * macro_f1(gold, pred, len(label_set.names)), 2),
        }

    rows = [
        {"arrangement": describe(c, with_examples=False), **measure(c)}
        for c in arrangements(with_examples=False)
    ]
    rows.sort(key=lambda r: -float(r["accuracy"]))  # type: ignore[arg-type]
    return {
        "label_set": label_set.id,
        "file": "models/labels/massive-scenarios.json",
        "n": len(gold),
        "default_arrangement": measure(default),
        "default_arrangement_with_names": measure(replace(default, use_names=True)),
        "arrangements": rows,
    }


def main() -> None:
    started = time.perf_counter()
    ev = Evaluation(Settings())
    head_labels = read_labels(MODELS_DIR / "teacher" / "labels.json")
    head = load_head(MODELS_DIR / "teacher" / "head.npz")
    default = ZeroShotConfig()
    report: dict[str, object] = {
        "machine": machine(),
        "encoder_cache_key": ev.encoder.key,
        "validation_rows": {name: len(data) for name, data in ev.sets.items()},
        "default_arrangement": {**asdict(default), "described": describe(default)},
        "trained_head": {
            name: three_class(ev, name, forward(head, ev.embeddings[(name, QUERY)]), head_labels)
            for name in ev.sets
        },
        "three_labels": three_labels(ev, default),
        "massive_scenarios": scenarios(ev, default),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print("wrote", write_result("zero_shot", report))


if __name__ == "__main__":
    main()
