"""The gate compares like with like: one label set, or a new one only when asked."""

from __future__ import annotations

import numpy as np

from worker.config import MODELS_DIR
from worker.loop.gate import RELATIVE_CHECKS, GoldenSet, ModelReport, Thresholds, decide, measure
from worker.models.student import Student, chunked_logits

OLD, NEW = "intents-3@aaaaaaaaaaaa", "intents-4@bbbbbbbbbbbb"


def _golden(label_set: str, labels: tuple[str, ...]) -> GoldenSet:
    n = 60
    logits = np.zeros((n, len(labels)), np.float32)
    return GoldenSet(["t"] * n, ["en"] * n, np.zeros(n, np.int64), logits, labels, "g", label_set)


def _report(label_set: str, labels: list[str], agreement: float, kl: float = 0.2) -> ModelReport:
    return ModelReport(
        "v", "d", labels, agreement, 0.7, kl, {"en": kl}, 0.999, "card", 0.3, label_set=label_set
    )


THREE = ["Action", "Other", "Recall"]
FOUR = ["Action", "Other", "Purchase", "Recall"]


def test_one_label_set_is_judged_as_before() -> None:
    golden = _golden(OLD, tuple(THREE))
    worse = decide(_report(OLD, THREE, 0.5), _report(OLD, THREE, 0.8), golden, Thresholds())
    assert not worse.promote and [c.name for c in worse.checks if not c.passed] == ["agreement"]
    assert decide(_report(OLD, THREE, 0.8), _report(OLD, THREE, 0.8), golden, Thresholds()).promote


def test_a_new_label_set_needs_to_be_asked_for() -> None:
    golden = _golden(NEW, tuple(FOUR))
    # The current model's outputs are over other labels: measure() reports nothing comparable.
    current = _report(OLD, THREE, 0.0, kl=float("inf"))
    candidate = _report(NEW, FOUR, 0.74)
    refused = decide(candidate, current, golden, Thresholds())
    assert not refused.promote
    assert "--new-label-set" in refused.reasons()[0] and refused.reasons()[0].startswith("label_set:")
    allowed = decide(candidate, current, golden, Thresholds(new_label_set=True))
    assert allowed.promote, allowed.reasons()
    names = {c.name for c in allowed.checks}
    assert not names & RELATIVE_CHECKS and {"label_set", "int8_parity", "latency"} <= names
    assert allowed.to_json()["candidate"]["agreement"] == 0.74  # still reported
    slow = _report(NEW, FOUR, 0.74)
    slow.latency_p50_ms = 5.0
    assert not decide(slow, current, golden, Thresholds(new_label_set=True)).promote


def test_the_teacher_judges_only_the_label_set_it_scores() -> None:
    golden = _golden(OLD, tuple(THREE))
    candidate = _report(NEW, FOUR, 0.0, kl=float("inf"))
    decision = decide(candidate, _report(OLD, THREE, 0.8), golden, Thresholds(new_label_set=True))
    assert not decision.promote
    assert "golden set's teacher scores intents-3@" in decision.reasons()[0]


def test_measure_compares_a_student_only_on_its_own_label_set() -> None:
    student = Student(MODELS_DIR / "student")
    texts = ["set an alarm for six", "what is on my list", "hello there"]
    logits = chunked_logits(texts, student, rows=8)
    for label_set, comparable in ((student.label_set, True), ("", True), (NEW, False)):
        golden = GoldenSet(texts, ["en"] * 3, np.full(3, -1), logits, student.labels, "g", label_set)
        report = measure(student, golden)
        assert report.label_set == student.label_set
        assert (report.agreement == 1.0) is comparable
        assert bool(np.isfinite(report.kl_mean)) is comparable
