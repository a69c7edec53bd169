"""The evaluation harness every model (teacher and students) is judged with.

Models are compared on raw logits ``[n, C]`` over a label list; gold labels, when
present, are integer class indices. Pure numpy, no I/O, O(n*C) memory.

- PR-BEP (Joachims 2005): rank by score, cut at k = number of positives; there
  precision equals recall. Ties at the cut get fractional credit.
- PR-AUC: average precision, with equal scores grouped into one threshold, as in
  scikit-learn's ``average_precision_score``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar, cast

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float64]
IntArray: TypeAlias = npt.NDArray[np.int64]
BoolArray: TypeAlias = npt.NDArray[np.bool_]
RowIndex: TypeAlias = "npt.NDArray[np.intp] | None"

OVERALL = "overall"
"""Name of the report entry that covers every row."""

_ArrayT = TypeVar("_ArrayT", bound="npt.NDArray[Any]")


class Reference(StrEnum):
    """What a comparison's PR-BEP and PR-AUC are measured against."""

    GOLD = "gold"
    TEACHER = "teacher"


@dataclass(frozen=True)
class ModelMetrics:
    """One model's metrics on one group of rows, against gold labels."""

    n: int
    accuracy: float
    macro_f1: float
    pr_bep: dict[str, float]
    pr_auc: dict[str, float]
    pr_bep_mean: float
    pr_auc_mean: float
    confusion: list[list[int]]
    """Rows are gold classes, columns predicted classes, in label order."""


@dataclass(frozen=True)
class Comparison:
    """A student against its teacher on one group of rows.

    Gaps are teacher minus student; the means skip classes with no positives.
    Accuracy and macro-F1 are None when no gold labels were given.
    """

    n: int
    reference: Reference
    agreement: float
    kl_mean: float
    teacher_pr_bep: dict[str, float]
    student_pr_bep: dict[str, float]
    pr_bep_gap_by_class: dict[str, float]
    pr_bep_gap: float
    teacher_pr_auc: dict[str, float]
    student_pr_auc: dict[str, float]
    pr_auc_gap_by_class: dict[str, float]
    pr_auc_gap: float
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    teacher_macro_f1: float | None = None
    student_macro_f1: float | None = None


# --- validation -------------------------------------------------------------


def _as_logits(logits: npt.ArrayLike, name: str = "logits") -> FloatArray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, C], got shape {array.shape}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite (no nan or inf)")
    return array


def _as_labels(labels: Sequence[str], n_classes: int) -> list[str]:
    names = [str(label) for label in labels]
    if len(names) != n_classes:
        raise ValueError(f"got {len(names)} labels for {n_classes} logit columns")
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be unique, got {names}")
    return names


def _as_class_indices(values: npt.ArrayLike, n_classes: int | None, name: str) -> IntArray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        # np.asarray([]) is float64; an empty array holds no bad indices.
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    if n_classes is not None and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(
            f"{name} holds class indices outside [0, {n_classes}): min {array.min()}, max {array.max()}"
        )
    return array.astype(np.int64, copy=False)


def _check_length(name: str, length: int, n: int) -> None:
    if length != n:
        raise ValueError(f"{name} has {length} rows but the logits have {n}")


def _as_ranking(scores: npt.ArrayLike, positive: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    score_array = np.asarray(scores, dtype=np.float64)
    flags = np.asarray(positive)
    if score_array.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {score_array.shape}")
    if flags.ndim != 1:
        raise ValueError(f"positive must be 1-D, got shape {flags.shape}")
    if score_array.size != flags.size:
        raise ValueError(f"scores has {score_array.size} rows but positive has {flags.size}")
    if not np.isfinite(score_array).all():
        raise ValueError("scores must be finite (no nan or inf)")
    if flags.dtype != np.bool_:
        if flags.size and not np.isin(flags, (0, 1)).all():
            raise ValueError("positive must be boolean or 0/1")
        flags = flags.astype(np.bool_)
    return score_array, flags


# --- probabilities ----------------------------------------------------------


def _log_softmax(logits: FloatArray) -> FloatArray:
    row_max: FloatArray = logits.max(axis=1, keepdims=True)
    shifted = logits - row_max
    row_sum: FloatArray = np.exp(shifted).sum(axis=1, keepdims=True)
    shifted -= np.log(row_sum)
    return shifted


def _softmax(logits: FloatArray) -> FloatArray:
    row_max: FloatArray = logits.max(axis=1, keepdims=True)
    exp = logits - row_max
    np.exp(exp, out=exp)
    row_sum: FloatArray = exp.sum(axis=1, keepdims=True)
    exp /= row_sum
    return exp


def softmax(logits: npt.ArrayLike) -> FloatArray:
    """Row-wise softmax of ``[n, C]`` logits, in float64."""
    return _softmax(_as_logits(logits))


def log_softmax(logits: npt.ArrayLike) -> FloatArray:
    """Row-wise log-softmax of ``[n, C]`` logits, in float64."""
    return _log_softmax(_as_logits(logits))


def _kl_from_log(log_p: FloatArray, log_q: FloatArray) -> FloatArray:
    per_class = np.exp(log_p)
    per_class *= log_p - log_q
    # KL is never negative; rounding can leave a -1e-17 for near-identical rows.
    kl: FloatArray = per_class.sum(axis=1)
    return np.maximum(kl, 0.0)


def kl_divergence(teacher_logits: npt.ArrayLike, student_logits: npt.ArrayLike) -> FloatArray:
    """Per-row KL(softmax(teacher) || softmax(student)), in nats."""
    teacher = _as_logits(teacher_logits, "teacher_logits")
    student = _as_logits(student_logits, "student_logits")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits {teacher.shape} and student_logits {student.shape} differ in shape")
    return _kl_from_log(_log_softmax(teacher), _log_softmax(student))


# --- ranking metrics --------------------------------------------------------


def _pr_bep(scores: FloatArray, positive: BoolArray) -> float:
    k = int(np.count_nonzero(positive))
    if k == 0:
        return math.nan
    n = scores.size
    cut = np.partition(scores, n - k)[n - k]  # the k-th largest score
    above = scores > cut
    tied = scores == cut
    n_tied = int(np.count_nonzero(tied))
    open_slots = k - int(np.count_nonzero(above))
    # The open slots are filled from the tied block in random order, so each
    # tied positive lands in the top k with probability open_slots / n_tied.
    hits = np.count_nonzero(above & positive) + (open_slots * np.count_nonzero(tied & positive) / n_tied)
    return float(hits / k)


def pr_bep(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Precision/recall break-even point; nan when there are no positives."""
    return _pr_bep(*_as_ranking(scores, positive))


def _pr_auc(scores: FloatArray, positive: BoolArray) -> float:
    n_positive = int(np.count_nonzero(positive))
    if n_positive == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    # One threshold per distinct score: the last rank of each run of equal scores.
    ends = np.append(np.flatnonzero(np.diff(ranked)), ranked.size - 1)
    true_pos = np.cumsum(positive[order], dtype=np.int64)[ends]
    precision = true_pos / (ends + 1)
    recall_gain = np.diff(true_pos, prepend=0) / n_positive
    return float(np.dot(recall_gain, precision))


def pr_auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Average precision (area under the PR curve); nan when there are no positives."""
    return _pr_auc(*_as_ranking(scores, positive))


# --- label metrics ----------------------------------------------------------


def _confusion(gold: IntArray, pred: IntArray, n_classes: int) -> IntArray:
    counts = np.bincount(gold * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64, copy=False)


def _accuracy(gold: IntArray, pred: IntArray) -> float:
    if gold.size == 0:
        return math.nan
    return float(np.count_nonzero(gold == pred) / gold.size)


def _macro_f1(confusion: IntArray) -> float:
    true_pos = np.diag(confusion).astype(np.float64)
    gold_plus_pred = confusion.sum(axis=1) + confusion.sum(axis=0)
    # A class nobody has and nobody predicts has an undefined F1: skip it.
    seen = gold_plus_pred > 0
    if not seen.any():
        return math.nan
    return float(np.mean(2.0 * true_pos[seen] / gold_plus_pred[seen]))


def _gold_and_pred(
    gold: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int | None
) -> tuple[IntArray, IntArray]:
    gold_idx = _as_class_indices(gold, n_classes, "gold")
    pred_idx = _as_class_indices(pred, n_classes, "pred")
    if gold_idx.size != pred_idx.size:
        raise ValueError(f"gold has {gold_idx.size} rows but pred has {pred_idx.size}")
    return gold_idx, pred_idx


def _check_n_classes(n_classes: int) -> None:
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")


def accuracy(gold: npt.ArrayLike, pred: npt.ArrayLike) -> float:
    """Share of rows where pred equals gold; nan for no rows."""
    return _accuracy(*_gold_and_pred(gold, pred, None))


def confusion_matrix(gold: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int) -> IntArray:
    """Counts ``[C, C]``: rows are gold classes, columns predicted classes."""
    _check_n_classes(n_classes)
    return _confusion(*_gold_and_pred(gold, pred, n_classes), n_classes)


def macro_f1(gold: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int) -> float:
    """Mean F1 over classes that occur in gold or pred; nan when none do."""
    return _macro_f1(confusion_matrix(gold, pred, n_classes))


# --- reports ----------------------------------------------------------------


def mean_defined(values: Iterable[float]) -> float:
    """The mean of the values that are not nan; nan when none is."""
    defined = [value for value in values if not math.isnan(value)]
    return math.fsum(defined) / len(defined) if defined else math.nan


def _group_rows(groups: Sequence[str] | None, n: int) -> list[tuple[str, RowIndex]]:
    """Row indices per group, sorted by name, then ``overall`` (None: every row)."""
    if groups is None:
        return [(OVERALL, None)]
    names = np.asarray(groups, dtype=str)
    if names.ndim != 1:
        raise ValueError(f"groups must be a 1-D sequence of names, got shape {names.shape}")
    _check_length("groups", names.size, n)
    unique, inverse = np.unique(names, return_inverse=True)
    if np.any(unique == OVERALL):
        raise ValueError(f"{OVERALL!r} is reserved for the all-rows entry; rename that group")
    rows: list[tuple[str, RowIndex]] = []
    if unique.size:  # np.split of no rows would still yield one (empty) part
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=unique.size))[:-1]
        parts = np.split(order, bounds)
        rows = [(str(name), index) for name, index in zip(unique, parts, strict=True)]
    rows.append((OVERALL, None))
    return rows


def _take(array: _ArrayT, rows: RowIndex) -> _ArrayT:
    return array if rows is None else cast("_ArrayT", array[rows])


def _per_class(
    labels: list[str], probs: FloatArray, reference: IntArray
) -> tuple[dict[str, float], dict[str, float]]:
    bep: dict[str, float] = {}
    auc: dict[str, float] = {}
    for c, label in enumerate(labels):
        scores = np.ascontiguousarray(probs[:, c])
        positive = reference == c
        bep[label] = _pr_bep(scores, positive)
        auc[label] = _pr_auc(scores, positive)
    return bep, auc


def evaluate(
    labels: Sequence[str],
    logits: npt.ArrayLike,
    gold: npt.ArrayLike,
    groups: Sequence[str] | None = None,
) -> dict[str, ModelMetrics]:
    """Metrics per group (sorted by name) and ``overall`` (last) for one model."""
    scores = _as_logits(logits)
    names = _as_labels(labels, scores.shape[1])
    gold_idx = _as_class_indices(gold, len(names), "gold")
    _check_length("gold", gold_idx.size, scores.shape[0])
    rows = _group_rows(groups, scores.shape[0])
    probs = _softmax(scores)
    # argmax of the logits, not the probabilities: exp can round near-ties to equal.
    pred = scores.argmax(axis=1).astype(np.int64)
    report: dict[str, ModelMetrics] = {}
    for group, index in rows:
        group_gold = _take(gold_idx, index)
        group_pred = _take(pred, index)
        group_probs = _take(probs, index)
        confusion = _confusion(group_gold, group_pred, len(names))
        bep, auc = _per_class(names, group_probs, group_gold)
        report[group] = ModelMetrics(
            n=int(group_gold.size),
            accuracy=_accuracy(group_gold, group_pred),
            macro_f1=_macro_f1(confusion),
            pr_bep=bep,
            pr_auc=auc,
            pr_bep_mean=mean_defined(bep.values()),
            pr_auc_mean=mean_defined(auc.values()),
            confusion=confusion.tolist(),
        )
    return report


def compare(
    labels: Sequence[str],
    teacher_logits: npt.ArrayLike,
    student_logits: npt.ArrayLike,
    gold: npt.ArrayLike | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Comparison]:
    """Student against teacher per group (sorted by name) and ``overall`` (last).

    Without gold, PR-BEP and PR-AUC are measured against the teacher's argmax.
    The teacher then scores 1.0 for two classes; with three or more it can score
    less, since a row's top class need not outrank other rows' share of it.
    """
    teacher = _as_logits(teacher_logits, "teacher_logits")
    student = _as_logits(student_logits, "student_logits")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits {teacher.shape} and student_logits {student.shape} differ in shape")
    n = teacher.shape[0]
    names = _as_labels(labels, teacher.shape[1])
    rows = _group_rows(groups, n)
    teacher_pred = teacher.argmax(axis=1).astype(np.int64)
    student_pred = student.argmax(axis=1).astype(np.int64)
    if gold is None:
        reference, reference_idx = Reference.TEACHER, teacher_pred
    else:
        reference, reference_idx = Reference.GOLD, _as_class_indices(gold, len(names), "gold")
        _check_length("gold", reference_idx.size, n)
    teacher_log = _log_softmax(teacher)
    student_log = _log_softmax(student)
    kl = _kl_from_log(teacher_log, student_log)
    # Reuse the log buffers as probabilities: the logs are not needed past KL.
    teacher_probs = np.exp(teacher_log, out=teacher_log)
    student_probs = np.exp(student_log, out=student_log)

    report: dict[str, Comparison] = {}
    for group, index in rows:
        ref = _take(reference_idx, index)
        t_pred = _take(teacher_pred, index)
        s_pred = _take(student_pred, index)
        group_kl = _take(kl, index)
        t_bep, t_auc = _per_class(names, _take(teacher_probs, index), ref)
        s_bep, s_auc = _per_class(names, _take(student_probs, index), ref)
        bep_gap = {label: t_bep[label] - s_bep[label] for label in names}
        auc_gap = {label: t_auc[label] - s_auc[label] for label in names}
        with_gold = reference is Reference.GOLD
        report[group] = Comparison(
            n=int(ref.size),
            reference=reference,
            agreement=_accuracy(t_pred, s_pred),
            kl_mean=float(group_kl.mean()) if group_kl.size else math.nan,
            teacher_pr_bep=t_bep,
            student_pr_bep=s_bep,
            pr_bep_gap_by_class=bep_gap,
            pr_bep_gap=mean_defined(bep_gap.values()),
            teacher_pr_auc=t_auc,
            student_pr_auc=s_auc,
            pr_auc_gap_by_class=auc_gap,
            pr_auc_gap=mean_defined(auc_gap.values()),
            teacher_accuracy=_accuracy(ref, t_pred) if with_gold else None,
            student_accuracy=_accuracy(ref, s_pred) if with_gold else None,
            teacher_macro_f1=(_macro_f1(_confusion(ref, t_pred, len(names))) if with_gold else None),
            student_macro_f1=(_macro_f1(_confusion(ref, s_pred, len(names))) if with_gold else None),
        )
    return report
