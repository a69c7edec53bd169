"""The promotion gate's decision: each check, its limit, and the reason it gives when it refuses."""

from __future__ import annotations

import numpy as np

from worker.loop.gate import GoldenSet, ModelReport, Thresholds, decide

LABELS = ["Action", "Other", "Recall"]


def _golden(locales: list[str]) -> GoldenSet:
    n = len(locales)
    return GoldenSet(
        ["t"] * n, locales, np.zeros(n, np.int64), np.zeros((n, 3), np.float32), tuple(LABELS), "g"
    )


def _report(
    agreement: float, f1: float, kl: dict[str, float], parity: float = 0.999, p50: float = 0.3
) -> ModelReport:
    return ModelReport(
        "v", "d", LABELS, agreement, f1, float(np.mean(list(kl.values()))), kl, parity, "card", p50
    )


def test_a_candidate_as_good_as_the_current_model_passes() -> None:
    golden = _golden(["en"] * 60 + ["de"] * 60)
    current = _report(0.80, 0.75, {"en": 0.20, "de": 0.30})
    candidate = _report(0.798, 0.749, {"en": 0.21, "de": 0.30}, p50=0.4)
    decision = decide(candidate, current, golden, Thresholds())
    assert decision.promote and decision.reasons() == []


def test_a_worse_candidate_is_refused_with_every_reason() -> None:
    golden = _golden(["en"] * 60 + ["de"] * 60 + ["sw"] * 10)
    current = _report(0.80, 0.75, {"en": 0.20, "de": 0.30, "sw": 0.3})
    candidate = _report(0.70, 0.60, {"en": 0.40, "de": 0.30, "sw": 9.0}, parity=0.90, p50=9.0)
    decision = decide(candidate, current, golden, Thresholds())
    assert not decision.promote
    failed = {c.name for c in decision.checks if not c.passed}
    assert failed == {"agreement", "macro_f1", "kl_per_locale", "int8_parity", "latency"}
    reasons = " ".join(decision.reasons())
    assert "en (0.2 -> 0.4)" in reasons and "sw" not in reasons  # too few sw rows to judge
    assert "70.00% is below 79.50%" in reasons


def test_latency_counts_only_beyond_the_budget_and_labels_must_match() -> None:
    golden = _golden(["en"] * 60)
    current = _report(0.8, 0.7, {"en": 0.2}, p50=0.2)
    slower_but_in_budget = _report(0.8, 0.7, {"en": 0.2}, p50=3.0)
    assert decide(slower_but_in_budget, current, golden, Thresholds(latency_budget_ms=5.0)).promote
    relabelled = _report(0.8, 0.7, {"en": 0.2})
    relabelled.labels = ["Yes", "No", "Maybe"]
    assert decide(relabelled, current, golden, Thresholds()).reasons()[0].startswith("labels:")


def test_kl_growth_in_a_locale_counts_only_when_it_is_beyond_chance() -> None:
    golden = _golden(["kk"] * 100)
    base = np.ones(100)
    current = _report(0.8, 0.7, {"kk": float(base.mean())})
    current.kl_rows = base
    noisy = base + np.tile([1.3, -0.9], 50)  # +0.2 on average (over the tolerance), swamped by noise
    consistent = base * 1.5 + 0.05  # every row worse
    for rows, refused in ((noisy, False), (consistent, True)):
        candidate = _report(0.8, 0.7, {"kk": float(rows.mean())})
        candidate.kl_rows = rows
        decision = decide(candidate, current, golden, Thresholds())
        assert rows.mean() > base.mean() * 1.1 + 0.005
        assert (not decision.promote) is refused, decision.reasons()
