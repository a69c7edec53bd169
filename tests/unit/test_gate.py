"""The promotion gate's decision: each check, its limit, and the reason it gives when it refuses."""

from __future__ import annotations

import re

import numpy as np
import pytest

from worker.data.corpora import language_of
from worker.loop.gate import GoldenSet, ModelReport, Thresholds, agreement_by, decide

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


def _agreeing(agree: list[bool], locales: list[str]) -> ModelReport:
    """A report whose per-row agreement with the teacher is ``agree`` (KL equal everywhere)."""
    rows = np.asarray(agree)
    report = _report(float(rows.mean()), 0.7, {loc: 0.2 for loc in set(locales)})
    report.agreement_per_language = agreement_by(rows, [language_of(x) for x in locales])
    report.agree_rows = rows
    return report


def test_a_candidate_better_on_average_but_worse_in_one_language_is_refused_naming_it() -> None:
    locales = ["en-US"] * 300 + ["en"] * 100 + ["ja"] * 200 + ["de-DE"] * 100 + ["de"] * 100
    golden = _golden(locales)
    current = _agreeing([i % 5 != 0 for i in range(len(locales))], locales)  # 80% everywhere
    better = [True] * 400  # English: 80% -> 100%
    worse_ja = [i % 5 != 0 and i % 20 not in (1, 2, 3) for i in range(200)]  # 80% -> 65%
    same_de = [i % 5 != 0 for i in range(200)]
    candidate = _agreeing(better + worse_ja + same_de, locales)
    assert candidate.agreement > current.agreement + 0.05
    decision = decide(candidate, current, golden, Thresholds())
    assert not decision.promote
    assert [c.name for c in decision.checks if not c.passed] == ["agreement_per_language"]
    (reason,) = decision.reasons()
    assert "ja (80.0% -> 65.0%, 200 rows" in reason
    assert re.findall(r"(\w+) \(\d", reason) == ["ja"]  # the only language named
    assert decision.golden["languages"] == {"de": 200, "en": 400, "ja": 200}
    assert decision.to_json()["candidate"]["agreement_per_language"]["ja"] == 0.65


def test_a_language_drop_within_chance_passes_and_a_clear_one_does_not() -> None:
    locales = ["en"] * 400 + ["ja"] * 200
    english_now, english_then = [i % 5 != 0 for i in range(400)], [i % 20 != 0 for i in range(400)]
    japanese = [i % 4 != 0 for i in range(200)]  # 75%
    # 12 rows lost, 6 won: 3 points lower, beyond the 1-point tolerance, but p = 0.12.
    noisy = list(japanese)
    for i in [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]:
        noisy[i] = False
    for i in [0, 4, 8, 12, 16, 20]:
        noisy[i] = True
    current = _agreeing(english_now + japanese, locales)
    candidate = _agreeing(english_then + noisy, locales)
    drop = current.agreement_per_language["ja"] - candidate.agreement_per_language["ja"]
    assert drop == pytest.approx(0.03)
    decision = decide(candidate, current, _golden(locales), Thresholds())
    assert decision.promote, decision.reasons()
    # The same 3 points as 6 rows lost and none won (p = 1/64) are not noise.
    clear = [ok and i not in (1, 2, 3, 5, 6, 7) for i, ok in enumerate(japanese)]
    decision = decide(_agreeing(english_then + clear, locales), current, _golden(locales), Thresholds())
    assert decision.reasons() == [
        "agreement_per_language: agreement with the teacher fell in ja (75.0% -> 72.0%, 200 rows, p=0.016)"
    ]


def test_the_language_rule_judges_served_languages_with_enough_rows_only() -> None:
    locales = ["ja"] * 40 + ["sw-KE"] * 200
    current = _agreeing([True] * 240, locales)
    candidate = _agreeing([False] * 240, locales)  # worse everywhere
    served = Thresholds(languages=frozenset({"ja", "en"}))
    checks = {c.name: c for c in decide(candidate, current, _golden(locales), served).checks}
    assert checks["agreement_per_language"].passed  # ja: 40 rows < 50; sw: not served
    everywhere = {c.name: c for c in decide(candidate, current, _golden(locales), Thresholds()).checks}
    assert "sw (100.0% -> 0.0%, 200 rows" in everywhere["agreement_per_language"].why


def test_without_per_row_values_any_language_drop_beyond_the_tolerance_counts() -> None:
    locales = ["ja"] * 100
    current, candidate = _agreeing([True] * 100, locales), _agreeing([True] * 98 + [False] * 2, locales)
    current.agree_rows = candidate.agree_rows = None
    for tolerance, passed in ((0.01, False), (0.02, True)):
        t = Thresholds(max_language_agreement_drop=tolerance)
        checks = {c.name: c.passed for c in decide(candidate, current, _golden(locales), t).checks}
        assert checks["agreement_per_language"] is passed
