"""Evaluation reports written out: JSON (nan as null, 6 decimals) and a Markdown table.

The reports are what :func:`worker.data.evaluation.evaluate` and
:func:`~worker.data.evaluation.compare` return: one entry per group, ``overall`` last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from enum import StrEnum
from typing import TypeAlias

import numpy as np

from worker.data.evaluation import OVERALL, Comparison, ModelMetrics, Reference, mean_defined

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"

_JSON_DECIMALS = 6


def _to_json_value(value: object) -> JSONValue:
    # StrEnum and bool come first: they are also str and int.
    if isinstance(value, StrEnum):
        return value.value
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        # JSON has no nan or inf; None reads as "undefined" to every consumer.
        return round(number, _JSON_DECIMALS) if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_to_json_value(item) for item in value]
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(report: Mapping[str, ModelMetrics | Comparison]) -> dict[str, JSONValue]:
    """A JSON-ready copy of a report: nan becomes None, floats keep 6 decimals."""
    return {
        group: {field.name: _to_json_value(getattr(entry, field.name)) for field in fields(entry)}
        for group, entry in report.items()
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100.0 * value:.1f}"


def _points(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    text = f"{100.0 * value:+.2f}"
    return "+0.00" if text == "-0.00" else text  # a gap that rounds to 0 has no sign


def _nats(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _metrics_row(entry: ModelMetrics, labels: list[str]) -> list[str]:
    return [
        str(entry.n),
        _percent(entry.accuracy),
        _percent(entry.macro_f1),
        _percent(entry.pr_bep_mean),
        _percent(entry.pr_auc_mean),
        *(_percent(entry.pr_bep[label]) for label in labels),
    ]


def _comparison_row(entry: Comparison, with_gold: bool) -> list[str]:
    cells = [
        str(entry.n),
        entry.reference.value,
        _percent(entry.agreement),
        _nats(entry.kl_mean),
        _percent(mean_defined(entry.teacher_pr_bep.values())),
        _percent(mean_defined(entry.student_pr_bep.values())),
        _points(entry.pr_bep_gap),
        _percent(mean_defined(entry.teacher_pr_auc.values())),
        _percent(mean_defined(entry.student_pr_auc.values())),
        _points(entry.pr_auc_gap),
    ]
    if with_gold:
        cells += [
            _percent(entry.teacher_accuracy),
            _percent(entry.student_accuracy),
            _percent(entry.teacher_macro_f1),
            _percent(entry.student_macro_f1),
        ]
    return cells


def to_markdown(report: Mapping[str, ModelMetrics | Comparison], title: str) -> str:
    """A GitHub Markdown table, one row per group, ``overall`` last."""
    if not report:
        raise ValueError("report is empty: nothing to tabulate")
    groups = sorted(report, key=lambda group: group == OVERALL)  # stable: overall last
    entries = [report[group] for group in groups]
    if all(isinstance(entry, ModelMetrics) for entry in entries):
        metrics = [entry for entry in entries if isinstance(entry, ModelMetrics)]
        labels = list(metrics[0].pr_bep)
        header = ["Group", "n", "Accuracy %", "Macro-F1 %", "PR-BEP %", "PR-AUC %"]
        header += [f"PR-BEP {label} %" for label in labels]
        body = [_metrics_row(entry, labels) for entry in metrics]
    elif all(isinstance(entry, Comparison) for entry in entries):
        comparisons = [entry for entry in entries if isinstance(entry, Comparison)]
        with_gold = any(entry.reference is Reference.GOLD for entry in comparisons)
        header = ["Group", "n", "Reference", "Agreement %", "KL (nats)"]
        header += ["Teacher PR-BEP %", "Student PR-BEP %", "PR-BEP gap (pp)"]
        header += ["Teacher PR-AUC %", "Student PR-AUC %", "PR-AUC gap (pp)"]
        if with_gold:
            header += ["Teacher acc. %", "Student acc. %", "Teacher macro-F1 %"]
            header += ["Student macro-F1 %"]
        body = [_comparison_row(entry, with_gold) for entry in comparisons]
    else:
        raise ValueError("report mixes ModelMetrics and Comparison entries")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [f"## {title}", "", line(header), line([":---"] + ["---:"] * (len(header) - 1))]
    for group, cells in zip(groups, body, strict=True):
        lines.append(line([group.replace("|", "\\|"), *cells]))
    return "\n".join(lines) + "\n"
