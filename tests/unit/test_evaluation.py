"""The evaluation harness on hand-computed cases."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from worker.data.evaluation import (
    Comparison,
    ModelMetrics,
    Reference,
    accuracy,
    compare,
    confusion_matrix,
    evaluate,
    kl_divergence,
    log_softmax,
    macro_f1,
    pr_auc,
    pr_bep,
    softmax,
)
from worker.data.report import to_json, to_markdown

LABELS = ["Action", "Other", "Recall"]


def one_hot_logits(pred: list[int], n_classes: int = 3, margin: float = 3.0) -> np.ndarray:
    """Logits whose argmax is ``pred``: ``margin`` on the predicted class, 0 elsewhere."""
    return margin * np.eye(n_classes)[pred]


# --- softmax ------------------------------------------------------------------


def test_softmax_hand_values() -> None:
    # exp(0) = 1, exp(ln 3) = 3 -> [1/4, 3/4]
    probs = softmax([[0.0, math.log(3.0)]])
    assert probs == pytest.approx(np.array([[0.25, 0.75]]))
    assert probs.dtype == np.float64


def test_softmax_and_log_softmax_are_stable_for_huge_logits() -> None:
    # Equal huge logits must give [1/2, 1/2], not inf/inf = nan (and no overflow warning).
    assert softmax([[1000.0, 1000.0]]) == pytest.approx(np.array([[0.5, 0.5]]))
    assert log_softmax([[1000.0, 1000.0]]) == pytest.approx(np.full((1, 2), -math.log(2.0)))
    # [1000, -1000]: log p = [0, -2000] exactly representable, no log(0).
    assert log_softmax([[1000.0, -1000.0]]) == pytest.approx(np.array([[0.0, -2000.0]]))


# --- PR-BEP -------------------------------------------------------------------


def test_pr_bep_hand_case() -> None:
    # Two positives -> k = 2; the top 2 (0.9, 0.8) hold one positive -> 1/2.
    assert pr_bep([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]) == pytest.approx(0.5)


def test_pr_bep_perfect_and_worst_ranking() -> None:
    # Positives on top: top 2 = both positives -> 2/2.
    assert pr_bep([0.9, 0.8, 0.1, 0.0], [True, True, False, False]) == 1.0
    # Positives at the bottom: top 2 hold none -> 0/2.
    assert pr_bep([0.9, 0.8, 0.1, 0.0], [False, False, True, True]) == 0.0


def test_pr_bep_tie_at_the_cut_gets_fractional_credit() -> None:
    # k = 2. 0.9 (positive) is above the cut; the one remaining slot is drawn from
    # the three items tied at 0.7, one of which is positive: expected 1/3.
    # BEP = (1 + 1/3) / 2 = 2/3.
    assert pr_bep([0.9, 0.7, 0.7, 0.7, 0.1], [1, 1, 0, 0, 0]) == pytest.approx(2.0 / 3.0)
    # Everything tied: k = 1, one slot among 4 items with 1 positive -> 1/4.
    assert pr_bep([0.5, 0.5, 0.5, 0.5], [0, 0, 1, 0]) == pytest.approx(0.25)


def test_pr_bep_tie_credit_is_the_mean_over_tie_orderings() -> None:
    scores = [0.9, 0.6, 0.6, 0.6, 0.6, 0.2]
    positive = [False, True, True, False, False, True]
    k = sum(positive)
    tied = [i for i, s in enumerate(scores) if s == 0.6]
    # Enumerate every order of the tied block and take the plain top k.
    outcomes = []
    for block in itertools.permutations(tied):
        ranking = [0, *block, 5]
        outcomes.append(sum(positive[i] for i in ranking[:k]) / k)
    assert pr_bep(scores, positive) == pytest.approx(sum(outcomes) / len(outcomes))


def test_pr_bep_does_not_depend_on_row_order_within_ties() -> None:
    assert pr_bep([0.7, 0.7, 0.9], [0, 1, 1]) == pr_bep([0.9, 0.7, 0.7], [1, 1, 0])


def test_pr_bep_without_positives_is_nan() -> None:
    assert math.isnan(pr_bep([0.3, 0.2], [0, 0]))
    assert math.isnan(pr_bep([], []))


# --- PR-AUC -------------------------------------------------------------------


def test_pr_auc_hand_case() -> None:
    # Ranked: 0.9(+) 0.8(-) 0.7(+) 0.6(-) 0.5(-), two positives.
    # At 0.9: P = 1/1, R = 1/2 -> gain 1/2 * 1
    # At 0.8: P = 1/2, R = 1/2 -> gain 0
    # At 0.7: P = 2/3, R = 1   -> gain 1/2 * 2/3
    # AP = 1/2 + 1/3 = 5/6
    assert pr_auc([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]) == pytest.approx(5.0 / 6.0)


def test_pr_auc_scikit_learn_docs_example() -> None:
    # average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8333...
    # Ranked: 0.8(+) P=1 R=1/2; 0.4(-) P=1/2 R=1/2; 0.35(+) P=2/3 R=1 -> 1/2 + 1/3.
    assert pr_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5.0 / 6.0)


def test_pr_auc_groups_tied_scores_into_one_threshold() -> None:
    # Ranked: 0.9(-) then {0.5(+), 0.5(-)} tied, then 0.1(+); two positives.
    # At 0.9: P = 0,   R = 0   -> gain 0
    # At 0.5: P = 1/3, R = 1/2 -> gain 1/2 * 1/3 (one threshold for both tied rows)
    # At 0.1: P = 2/4, R = 1   -> gain 1/2 * 1/2
    # AP = 1/6 + 1/4 = 5/12, whichever tied row comes first.
    assert pr_auc([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1]) == pytest.approx(5.0 / 12.0)
    assert pr_auc([0.9, 0.5, 0.5, 0.1], [0, 0, 1, 1]) == pytest.approx(5.0 / 12.0)


def test_pr_auc_perfect_ranking_and_no_positives() -> None:
    assert pr_auc([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0)
    assert math.isnan(pr_auc([0.9, 0.8], [0, 0]))


# --- KL -----------------------------------------------------------------------


def test_kl_hand_case() -> None:
    # teacher [0, 0] -> p = [1/2, 1/2]; student [0, ln 3] -> q = [1/4, 3/4]
    # KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) ~= 0.143841
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    kl = kl_divergence([[0.0, 0.0]], [[0.0, math.log(3.0)]])
    assert kl.shape == (1,)
    assert kl[0] == pytest.approx(expected)


def test_kl_of_identical_logits_is_zero() -> None:
    logits = np.array([[1.0, -2.0, 0.5], [10.0, 10.0, -10.0]])
    assert np.array_equal(kl_divergence(logits, logits), np.zeros(2))


def test_kl_is_invariant_to_a_constant_added_to_a_row() -> None:
    teacher = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    student = np.array([[0.0, 1.0, 2.0], [2.0, 2.0, 0.0]])
    shifted = student + np.array([[100.0], [-7.5]])
    assert kl_divergence(teacher, shifted) == pytest.approx(kl_divergence(teacher, student))
    assert kl_divergence(teacher + 42.0, student) == pytest.approx(kl_divergence(teacher, student))


def test_kl_with_saturated_probabilities_takes_no_log_of_zero() -> None:
    # p = [1, e^-2000 (0.0 in float64)], log p = [0, -2000]; log q = [-2000, 0].
    # KL = 1 * (0 - (-2000)) + 0 = 2000; computing via log(0) would give nan/inf.
    kl = kl_divergence([[1000.0, -1000.0]], [[-1000.0, 1000.0]])
    assert kl[0] == pytest.approx(2000.0)


# --- label metrics --------------------------------------------------------------


GOLD = [0, 0, 1, 1, 2]
PRED = [0, 1, 1, 1, 0]


def test_confusion_matrix_hand_case() -> None:
    # Rows gold, columns predicted:
    # gold 0 -> pred 0, pred 1; gold 1 -> pred 1, pred 1; gold 2 -> pred 0.
    expected = [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    matrix = confusion_matrix(GOLD, PRED, 3)
    assert matrix.dtype == np.int64
    assert matrix.tolist() == expected


def test_accuracy_and_macro_f1_hand_case() -> None:
    # Correct rows: 0, 2, 3 -> 3/5.
    assert accuracy(GOLD, PRED) == pytest.approx(0.6)
    # F1 = 2 tp / (gold + pred):
    # class 0: tp 1, gold 2, pred 2 -> 2/4 = 0.5
    # class 1: tp 2, gold 2, pred 3 -> 4/5 = 0.8
    # class 2: tp 0, gold 1, pred 0 -> 0   (gold but never predicted counts as 0)
    # macro = (0.5 + 0.8 + 0) / 3 = 1.3 / 3
    assert macro_f1(GOLD, PRED, 3) == pytest.approx(1.3 / 3.0)


def test_macro_f1_skips_a_class_with_no_gold_and_no_predictions() -> None:
    # Class 3 never occurs: it is left out, so the mean stays 1.3 / 3 (not 1.3 / 4).
    assert macro_f1(GOLD, PRED, 4) == pytest.approx(1.3 / 3.0)


def test_label_metrics_on_no_rows() -> None:
    assert math.isnan(accuracy([], []))
    assert math.isnan(macro_f1([], [], 3))
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


# --- evaluate -----------------------------------------------------------------


def test_evaluate_per_group_and_overall() -> None:
    gold = np.array([0, 1, 2, 0])
    # argmax [0, 1, 1, 2]; the side logits of rows 1 and 3 order P(Action) and P(Recall).
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 3.0]])
    report = evaluate(LABELS, logits, gold, groups=["en", "en", "de", "de"])

    # Groups sorted by name, overall last.
    assert list(report) == ["de", "en", "overall"]
    assert all(isinstance(entry, ModelMetrics) for entry in report.values())

    # en: gold [0, 1], pred [0, 1] -> all right; de: gold [2, 0], pred [1, 2] -> none.
    assert (report["en"].n, report["en"].accuracy) == (2, 1.0)
    assert (report["de"].n, report["de"].accuracy) == (2, 0.0)

    overall = report["overall"]
    assert overall.n == 4
    assert overall.accuracy == pytest.approx(0.5)
    # Rows gold, columns pred: gold 0 -> pred 0, pred 2; gold 1 -> 1; gold 2 -> 1.
    assert overall.confusion == [[1, 0, 1], [0, 1, 0], [0, 1, 0]]
    # F1: class 0 2*1/(2+1) = 2/3; class 1 2*1/(1+2) = 2/3; class 2 0 -> 4/9.
    assert overall.macro_f1 == pytest.approx(4.0 / 9.0)
    assert list(overall.pr_bep) == LABELS
    # P(Action) = e^a / sum(e^logits): row 0 e^3/(e^3+2) = .91, row 1 1/(1+e^3+e) = .04,
    # row 2 1/(2+e^3) = .05, row 3 e/(e+1+e^3) = .11. Gold Action rows 0 and 3 (k = 2)
    # are the top 2 -> 2/2.
    assert overall.pr_bep["Action"] == 1.0
    # P(Recall): row 0 .05, row 1 e/(1+e^3+e) = .11, row 2 .05, row 3 e^3/(e+1+e^3) = .84.
    # Gold Recall: row 2 only (k = 1); the top 1 is row 3 -> 0/1.
    assert overall.pr_bep["Recall"] == 0.0
    # de has no "Other" gold rows: undefined there, left out of the mean.
    assert math.isnan(report["de"].pr_bep["Other"])
    assert not math.isnan(report["de"].pr_bep_mean)


def test_evaluate_without_groups_has_only_overall() -> None:
    # Rows predicted Action and Other, both right; no Recall gold -> nan there.
    report = evaluate(LABELS, one_hot_logits([0, 1]), [0, 1])
    assert list(report) == ["overall"]
    assert report["overall"].pr_bep["Action"] == 1.0
    assert math.isnan(report["overall"].pr_bep["Recall"])
    # Mean over the two defined classes only.
    assert report["overall"].pr_bep_mean == 1.0


# --- compare ------------------------------------------------------------------


def test_compare_agreement_and_group_split() -> None:
    teacher = one_hot_logits([0, 1, 2, 0])
    student = one_hot_logits([0, 2, 2, 1])
    report = compare(LABELS, teacher, student, groups=["de", "en", "de", "en"])

    assert list(report) == ["de", "en", "overall"]
    assert all(isinstance(entry, Comparison) for entry in report.values())
    # de: rows 0, 2 -> both agree; en: rows 1, 3 -> neither; overall 2/4.
    assert report["de"].agreement == 1.0
    assert report["en"].agreement == 0.0
    assert report["overall"].agreement == pytest.approx(0.5)
    assert (report["de"].n, report["en"].n, report["overall"].n) == (2, 2, 4)
    # Identical rows contribute KL 0, so de's mean is 0.
    assert report["de"].kl_mean == 0.0
    assert report["en"].kl_mean > 0.0


def test_compare_against_teacher_when_no_gold() -> None:
    # Two classes: argmax is class c exactly when P(c) > 1/2, so the teacher
    # ranks its own labels perfectly and scores 1.0.
    teacher = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    # The student swaps rows 1 and 2: it calls row 1 A and row 2 B.
    student = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    report = compare(["A", "B"], teacher, student)
    overall = report["overall"]

    assert overall.reference is Reference.TEACHER
    assert overall.teacher_pr_bep == {"A": 1.0, "B": 1.0}
    assert overall.teacher_pr_auc == {"A": 1.0, "B": 1.0}
    # Reference A = rows 0, 2 (k = 2). Student P(A): row 0 .88, row 1 .73, row 2 .27,
    # row 3 .05 -> top 2 = rows 0, 1 -> 1/2. B (rows 1, 3) by symmetry -> 1/2.
    assert overall.student_pr_bep == pytest.approx({"A": 0.5, "B": 0.5})
    assert overall.pr_bep_gap_by_class == pytest.approx({"A": 0.5, "B": 0.5})
    assert overall.pr_bep_gap == pytest.approx(0.5)
    # A by student P(A): row 0 (+) P=1 R=1/2; row 1 (-) P=1/2; row 2 (+) P=2/3 R=1
    # -> AP = 1/2 + 1/3 = 5/6; gap 1 - 5/6 = 1/6 (B the same by symmetry).
    assert overall.pr_auc_gap == pytest.approx(1.0 / 6.0)
    assert overall.teacher_accuracy is None
    assert overall.student_macro_f1 is None


def test_teacher_reference_is_not_always_perfect_with_three_classes() -> None:
    # Row 0: P = [.40, .35, .25] -> argmax Action. Row 1: P = [.44, .54, .02] -> Other.
    # Action by P(Action): row 1 (.44) outranks row 0 (.40), yet only row 0 is an
    # Action row -> k = 1, top 1 holds no positive -> teacher PR-BEP 0, not 1.
    teacher = np.log(np.array([[0.40, 0.35, 0.25], [0.44, 0.54, 0.02]]))
    report = compare(LABELS, teacher, teacher)
    assert report["overall"].teacher_pr_bep["Action"] == pytest.approx(0.0)
    assert report["overall"].pr_bep_gap == 0.0


def test_compare_with_gold_reports_accuracy_and_macro_f1() -> None:
    gold = [0, 1, 2, 2]
    teacher = one_hot_logits([0, 1, 2, 2])
    student = one_hot_logits([0, 1, 2, 0])
    overall = compare(LABELS, teacher, student, gold=gold)["overall"]

    assert overall.reference is Reference.GOLD
    assert overall.teacher_accuracy == 1.0
    # Student right on rows 0, 1, 2 -> 3/4.
    assert overall.student_accuracy == pytest.approx(0.75)
    assert overall.teacher_macro_f1 == 1.0
    # Student F1: class 0 tp 1, gold 1, pred 2 -> 2/3; class 1 -> 1;
    # class 2 tp 1, gold 2, pred 1 -> 2/3 -> mean (2/3 + 1 + 2/3) / 3 = 7/9.
    assert overall.student_macro_f1 == pytest.approx(7.0 / 9.0)


# --- output -------------------------------------------------------------------


def test_to_json_has_no_nan_and_round_trips() -> None:
    # Predictions [0, 1, 0] against gold [0, 1, 1].
    gold = [0, 1, 1]
    logits = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.1, 0.2]])
    groups = ["en", "en", "de"]
    for report in (
        evaluate(LABELS, logits, gold, groups),
        compare(LABELS, logits, logits[:, ::-1], groups=groups),
    ):
        written = to_json(report)
        text = json.dumps(written, allow_nan=False)
        assert json.loads(text) == written
        assert list(written) == ["de", "en", "overall"]

    metrics = to_json(evaluate(LABELS, logits, gold, groups))["overall"]
    assert isinstance(metrics, dict)
    pr_bep_by_class = metrics["pr_bep"]
    assert isinstance(pr_bep_by_class, dict)
    # Recall has no gold rows: nan becomes None.
    assert pr_bep_by_class["Recall"] is None
    # 2 of 3 right: 2/3 is written with 6 decimals.
    assert metrics["accuracy"] == 0.666667
    assert metrics["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]

    comparison = to_json(compare(LABELS, logits, logits))["overall"]
    assert isinstance(comparison, dict)
    assert comparison["reference"] == "teacher"
    assert type(comparison["reference"]) is str
    assert comparison["teacher_accuracy"] is None


def test_to_markdown_puts_overall_last() -> None:
    gold = [0, 1, 1, 0]
    logits = one_hot_logits([0, 1, 0, 0])
    report = evaluate(LABELS, logits, gold, ["fr", "de", "fr", "de"])
    table = to_markdown(report, "Student v3")
    lines = table.strip().splitlines()

    assert lines[0] == "## Student v3"
    assert lines[2].startswith("| Group | n | Accuracy %")
    rows = lines[4:]
    assert [row.split(" | ")[0] for row in rows] == ["| de", "| fr", "| overall"]
    # overall: 3 of 4 right -> 75.0; de: rows 1, 3 both right -> 100.0.
    assert rows[-1].startswith("| overall | 4 | 75.0 |")
    assert rows[0].startswith("| de | 2 | 100.0 |")


def test_to_markdown_comparison_shows_gaps_in_points() -> None:
    teacher = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    student = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    table = to_markdown(compare(["A", "B"], teacher, student), "Student vs teacher")
    overall = table.strip().splitlines()[-1]
    # agreement 2/4; PR-BEP teacher 100, student 50, gap +50 points (see above).
    assert overall.startswith("| overall | 4 | teacher | 50.0 |")
    assert "| 100.0 | 50.0 | +50.00 |" in overall
    assert "Student acc." not in table  # no gold, no accuracy columns


# --- empty input ----------------------------------------------------------------


def test_empty_input_gives_nan_metrics() -> None:
    empty_logits = np.empty((0, 3))
    metrics = evaluate(LABELS, empty_logits, np.array([], dtype=np.int64))
    overall = metrics["overall"]
    assert overall.n == 0
    assert math.isnan(overall.accuracy) and math.isnan(overall.macro_f1)
    assert all(math.isnan(value) for value in overall.pr_bep.values())
    assert overall.confusion == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]

    comparison = compare(LABELS, empty_logits, empty_logits, gold=[], groups=[])
    assert list(comparison) == ["overall"]
    assert comparison["overall"].n == 0
    assert math.isnan(comparison["overall"].agreement)
    assert math.isnan(comparison["overall"].kl_mean)
    assert math.isnan(comparison["overall"].pr_bep_gap)

    json.dumps(to_json(metrics), allow_nan=False)
    json.dumps(to_json(comparison), allow_nan=False)
    assert "| overall | 0 | n/a |" in to_markdown(metrics, "empty")
    assert softmax(empty_logits).shape == (0, 3)
    assert kl_divergence(empty_logits, empty_logits).shape == (0,)


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: softmax([1.0, 2.0]), "2-D"),
        (lambda: softmax([[1.0, math.nan]]), "finite"),
        (lambda: evaluate(LABELS, np.zeros((2, 3)), [0, 1, 2]), "gold has 3 rows"),
        (lambda: evaluate(LABELS[:2], np.zeros((2, 3)), [0, 1]), "2 labels for 3"),
        (lambda: evaluate(LABELS, np.zeros((2, 3)), [0, 3]), r"outside \[0, 3\)"),
        (lambda: evaluate(LABELS, np.zeros((2, 3)), [0.0, 1.0]), "integer class indices"),
        (lambda: evaluate(LABELS, np.zeros((2, 3)), [0, 1], ["en"]), "groups has 1 rows"),
        (lambda: evaluate(LABELS, np.zeros((1, 3)), [0], ["overall"]), "reserved"),
        (lambda: compare(LABELS, np.zeros((2, 3)), np.zeros((3, 3))), "differ in shape"),
        (lambda: kl_divergence(np.zeros((2, 3)), np.zeros((2, 2))), "differ in shape"),
        (lambda: pr_bep([0.1, 0.2], [1]), "scores has 2 rows but positive has 1"),
        (lambda: pr_auc([[0.1]], [1]), "1-D"),
        (lambda: accuracy([0, 1], [0]), "gold has 2 rows but pred has 1"),
        (lambda: to_markdown({}, "empty"), "empty"),
    ],
)
def test_bad_input_raises_value_error(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()
