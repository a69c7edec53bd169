"""The promotion gate: a candidate student replaces the current one only if it is not worse.

Both models are measured in one run on a golden set (labelled texts; by default the MASSIVE
and xSID validation splits) whose teacher logits are computed once and cached:

==============  ===========================================================================
agreement       top label equal to the teacher's; may drop at most ``max_agreement_drop``
macro_f1        against gold labels; may drop at most ``max_f1_drop``
kl_per_locale   mean KL(teacher || student) of each locale with ``min_locale_rows`` rows, of the
                languages served (``Settings.served_languages``; other locales still count in
                the overall agreement, F1 and KL); may
                grow at most ``max_kl_growth`` (relative) plus ``kl_slack`` (absolute, nats),
                unless the growth is within chance (a paired test on the locale's rows)
agreement per   agreement with the teacher of each served language (primary subtag: ``de-DE``,
language        ``de`` and ``de-ba`` are one language) with ``min_locale_rows`` rows; may drop at
                most ``max_language_agreement_drop``, unless the drop is within chance (McNemar's
                exact test on the rows where the two models disagree, one-sided 97.5%). So a
                candidate better on average but worse in one language is refused, naming it
int8_parity     INT8/FP32 top-label agreement of the candidate (measured when ``fp32.onnx`` is
                beside it, else its card); at least ``min_int8_parity``
latency         p50 of one utterance, measured interleaved with the current model; at most
                ``max_latency_ratio`` x the current one + ``latency_slack_ms`` (or, when set,
                anything within ``latency_budget_ms``)
labels          the same label names as the current model (downstream routing acts on them)
label_set       the candidate's label set (its card) is the one the golden set's teacher scores;
                and the current model's, unless ``new_label_set`` (``promote --new-label-set``):
                then the checks against the current model (labels, agreement, macro_f1, KL,
                per-language agreement) do not apply, as its outputs are over other labels;
                the candidate's own figures against its teacher are still reported
==============  ===========================================================================

The tolerances absorb run-to-run noise (retraining the same recipe moves agreement by a few
tenths of a point); they are flags of ``intent-worker promote``.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from worker.config import GateSettings
from worker.data.corpora import language_of
from worker.data.evaluation import kl_divergence, macro_f1
from worker.errors import DataError
from worker.models.student import Logits, Student, chunked_logits

log = structlog.get_logger(__name__)

LATENCY_TEXTS = 300
#: One-sided level of the paired tests: a growth in KL or a drop in agreement counts beyond this.
SIGNIFICANCE = 0.025


class Thresholds(GateSettings):
    """The gate's thresholds: :class:`worker.config.GateSettings` (``settings.gate``), and what
    one promotion judges."""

    #: Languages (primary subtags) the per-locale KL and per-language agreement checks judge; None: all.
    languages: frozenset[str] | None = None
    #: The candidate may serve another label set than the current model (a new contract downstream).
    new_label_set: bool = False


#: Checks that compare the candidate with the current model's outputs: only within one label set.
RELATIVE_CHECKS = frozenset({"labels", "agreement", "macro_f1", "kl_per_locale", "agreement_per_language"})


@dataclass(frozen=True)
class GoldenSet:
    """Texts with their locale, gold label index (-1: none) and the teacher's logits."""

    texts: list[str]
    locales: list[str]
    gold: npt.NDArray[np.int64]
    teacher_logits: Logits
    labels: tuple[str, ...]
    identity: str  # hash of texts, gold and teacher: what the cache is keyed by
    label_set: str = ""  # the teacher's label-set id ("": not known, compare by label names)

    @staticmethod
    def key(texts: Sequence[str], gold: Sequence[int], teacher_id: str) -> str:
        digest = hashlib.sha256(teacher_id.encode())
        for text, label in zip(texts, gold, strict=True):
            digest.update(f"{label}\0{text}\0".encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:20]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, teacher_logits=self.teacher_logits)
        tmp.replace(path)

    @staticmethod
    def cached_logits(path: Path, n: int) -> Logits | None:
        if not path.exists():
            return None
        with np.load(path) as data:
            logits = np.asarray(data["teacher_logits"], np.float32)
        return logits if logits.shape[0] == n else None


@dataclass
class ModelReport:
    version: str
    directory: str
    labels: list[str]
    agreement: float
    macro_f1: float
    kl_mean: float
    kl_per_locale: dict[str, float]
    int8_parity: float
    int8_parity_source: str
    latency_p50_ms: float = float("nan")
    label_set: str = ""
    agreement_per_locale: dict[str, float] = field(default_factory=dict)
    agreement_per_language: dict[str, float] = field(default_factory=dict)
    #: Per-row KL on the golden set, for the paired per-locale test (not reported).
    kl_rows: npt.NDArray[np.float64] | None = field(default=None, repr=False, compare=False)
    #: Per-row agreement with the teacher, for the paired per-language test (not reported).
    agree_rows: npt.NDArray[np.bool_] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("kl_rows", "agree_rows")}


def agreement_by(agree: npt.NDArray[np.bool_], groups: Sequence[str]) -> dict[str, float]:
    """Mean of ``agree`` per group (locale or language), groups sorted."""
    keys = np.asarray(groups)
    return {str(g): float(agree[keys == g].mean()) for g in sorted(set(groups))}


@dataclass
class Check:
    name: str
    passed: bool
    candidate: Any
    current: Any
    limit: Any
    why: str = ""


@dataclass
class Decision:
    promote: bool
    checks: list[Check]
    candidate: ModelReport
    current: ModelReport
    golden: dict[str, Any] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.why}" for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reasons": self.reasons(),
            "checks": [asdict(c) for c in self.checks],
            "candidate": self.candidate.to_json(),
            "current": self.current.to_json(),
            "golden": self.golden,
        }


def _parity(student: Student, golden: GoldenSet, int8_logits: Logits) -> tuple[float, str]:
    """(INT8/FP32 agreement, where it comes from); not a number for a model that serves FP32."""
    int8 = student.card.get("int8")
    if isinstance(int8, dict) and not int8.get("shipped", True):  # fp32.onnx beside it is model.onnx
        refused = (int8.get("parity") or {}).get("label_agreement")
        note = f" (its INT8 export agreed {refused:.2%}: not shipped)" if isinstance(refused, float) else ""
        return float("nan"), f"n/a: FP32 served{note}"
    fp32 = student.directory / "fp32.onnx"
    if fp32.is_file():
        reference = Student(student.directory, model_file="fp32.onnx")
        values = chunked_logits(golden.texts, reference, rows=64)
        return float(np.mean(values.argmax(1) == int8_logits.argmax(1))), "measured vs fp32.onnx"
    if isinstance(int8, dict):
        parity = int8.get("parity", {})
        if isinstance(parity, dict) and "label_agreement" in parity:
            return float(parity["label_agreement"]), "card"
    return float("nan"), "unknown: no fp32.onnx and no parity in the card"


def measure(student: Student, golden: GoldenSet) -> ModelReport:
    """Quality of ``student`` on the golden set (no timing: see :func:`interleaved_latency`)."""
    # Outputs name their labels: the same names in another order are aligned to the teacher's.
    same = set(student.labels) == set(golden.labels) and golden.label_set in ("", student.label_set)
    order = [student.labels.index(name) for name in golden.labels] if same else None
    values = chunked_logits(golden.texts, student, rows=64)
    aligned = values[:, order] if order is not None else None
    parity, source = _parity(student, golden, values)
    if aligned is None:  # another label set: nothing to compare with the teacher
        return ModelReport(
            student.version,
            str(student.directory),
            list(student.labels),
            0.0,
            0.0,
            float("inf"),
            {},
            parity,
            source,
            label_set=student.label_set,
        )
    predicted = aligned.argmax(1)
    agree = predicted == golden.teacher_logits.argmax(1)
    agreement = float(np.mean(agree))
    has_gold = golden.gold >= 0
    f1 = (
        macro_f1(golden.gold[has_gold], predicted[has_gold], len(golden.labels))
        if has_gold.any()
        else float("nan")
    )
    kl = kl_divergence(golden.teacher_logits, aligned)
    locales = np.asarray(golden.locales)
    per_locale = {str(locale): float(kl[locales == locale].mean()) for locale in sorted(set(golden.locales))}
    return ModelReport(
        student.version,
        str(student.directory),
        list(student.labels),
        agreement,
        float(f1),
        float(kl.mean()),
        per_locale,
        parity,
        source,
        label_set=student.label_set,
        agreement_per_locale=agreement_by(agree, golden.locales),
        agreement_per_language=agreement_by(agree, [language_of(x) for x in golden.locales]),
        kl_rows=kl.astype(np.float64),
        agree_rows=agree,
    )


def interleaved_latency(models: Sequence[Student], texts: Sequence[str], rounds: int = 1) -> list[float]:
    """p50 ms of one-utterance inference per model, alternating models text by text (fair on a noisy host)."""
    timings: list[list[float]] = [[] for _ in models]
    for model in models:
        model.logits(list(texts[:20]))  # warm up
    for _ in range(rounds):
        for text in texts:
            for i, model in enumerate(models):
                started = time.perf_counter()
                model.logits([text])
                timings[i].append((time.perf_counter() - started) * 1000)
    return [statistics.median(t) for t in timings]


def decide(candidate: ModelReport, current: ModelReport, golden: GoldenSet, t: Thresholds) -> Decision:
    checks: list[Check] = []
    same_labels = sorted(candidate.labels) == sorted(current.labels)  # outputs name their labels
    checks.append(
        Check(
            "labels",
            same_labels,
            candidate.labels,
            current.labels,
            "equal",
            "" if same_labels else f"candidate labels {candidate.labels} differ from {current.labels}",
        )
    )
    floor = current.agreement - t.max_agreement_drop
    checks.append(
        Check(
            "agreement",
            candidate.agreement >= floor,
            candidate.agreement,
            current.agreement,
            floor,
            f"agreement with the teacher {candidate.agreement:.2%} is below {floor:.2%} "
            f"(current {current.agreement:.2%} - {t.max_agreement_drop:.1%})",
        )
    )
    floor = current.macro_f1 - t.max_f1_drop
    ok = not np.isfinite(current.macro_f1) or candidate.macro_f1 >= floor
    checks.append(
        Check(
            "macro_f1",
            ok,
            candidate.macro_f1,
            current.macro_f1,
            floor,
            f"macro-F1 against gold {candidate.macro_f1:.2%} is below {floor:.2%}",
        )
    )
    counts = {loc: golden.locales.count(loc) for loc in set(golden.locales)}
    worse = {}
    locales = np.asarray(golden.locales)
    for locale, value in candidate.kl_per_locale.items():
        if counts.get(locale, 0) < t.min_locale_rows or locale not in current.kl_per_locale:
            continue
        if t.languages is not None and language_of(locale) not in t.languages:
            continue
        limit = current.kl_per_locale[locale] * (1 + t.max_kl_growth) + t.kl_slack
        if not np.isfinite(value):
            worse[locale] = (value, round(current.kl_per_locale[locale], 4))
        elif value > limit and _significant(candidate, current, locales == locale):
            worse[locale] = (round(value, 4), round(current.kl_per_locale[locale], 4))
    checks.append(
        Check(
            "kl_per_locale",
            not worse,
            candidate.kl_mean,
            current.kl_mean,
            f"current x {1 + t.max_kl_growth:.2f} + {t.kl_slack}",
            "KL to the teacher grew in "
            + ", ".join(f"{k} ({v[1]} -> {v[0]})" for k, v in sorted(worse.items())),
        )
    )
    checks.append(_language_agreement_check(candidate, current, golden, t))
    # An FP32 model has no quantisation to judge (its cost shows in the latency check).
    fp32 = candidate.int8_parity_source.startswith("n/a")
    ok = fp32 or bool(np.isfinite(candidate.int8_parity) and candidate.int8_parity >= t.min_int8_parity)
    checks.append(
        Check(
            "int8_parity",
            ok,
            candidate.int8_parity,
            current.int8_parity,
            t.min_int8_parity,
            f"INT8/FP32 agreement {candidate.int8_parity:.2%} ({candidate.int8_parity_source}) is below {t.min_int8_parity:.1%}",
        )
    )
    limit = current.latency_p50_ms * t.max_latency_ratio + t.latency_slack_ms
    if t.latency_budget_ms is not None:  # an explicit budget: anything within it is fast enough
        limit = max(limit, t.latency_budget_ms)
    checks.append(
        Check(
            "latency",
            candidate.latency_p50_ms <= limit,
            candidate.latency_p50_ms,
            current.latency_p50_ms,
            limit,
            f"p50 {candidate.latency_p50_ms:.2f} ms exceeds {limit:.2f} ms",
        )
    )
    checks.insert(0, _label_set_check(candidate, current, golden, t))
    if candidate.label_set != current.label_set and t.new_label_set:
        checks = [c for c in checks if c.name not in RELATIVE_CHECKS]
    for check in checks:
        if check.passed:
            check.why = ""
    return Decision(
        all(c.passed for c in checks),
        checks,
        candidate,
        current,
        {
            "n": len(golden.texts),
            "identity": golden.identity,
            "locales": counts,
            "languages": dict(sorted(Counter(language_of(x) for x in golden.locales).items())),
        },
    )


def _label_set_check(candidate: ModelReport, current: ModelReport, golden: GoldenSet, t: Thresholds) -> Check:
    """Like with like: the teacher judges the label set it scores; a new one only when asked."""
    why = ""
    if golden.label_set and candidate.label_set != golden.label_set:
        why = (
            f"the candidate was distilled on label set {candidate.label_set}, but the golden set's "
            f"teacher scores {golden.label_set}: judge it with that teacher (INTENT_TEACHER_LABELS)"
        )
    elif candidate.label_set != current.label_set and not t.new_label_set:
        why = (
            f"the candidate serves label set {candidate.label_set}, the current model {current.label_set}: "
            "consumers would get other labels (pass --new-label-set to change it)"
        )
    return Check("label_set", not why, candidate.label_set, current.label_set, golden.label_set or "any", why)


def _language_agreement_check(
    candidate: ModelReport, current: ModelReport, golden: GoldenSet, t: Thresholds
) -> Check:
    """Agreement with the teacher may not fall beyond ``max_language_agreement_drop`` and chance
    in any judged language with ``min_locale_rows`` rows."""
    languages = np.asarray([language_of(x) for x in golden.locales])
    fell: list[str] = []
    for language, after in sorted(candidate.agreement_per_language.items()):
        rows = languages == language
        before = current.agreement_per_language.get(language)
        if before is None or int(rows.sum()) < t.min_locale_rows:
            continue
        if t.languages is not None and language not in t.languages:
            continue
        if before - after <= t.max_language_agreement_drop + 1e-9:  # 1.0 - 0.98 > 0.02 in floats
            continue
        p = _mcnemar_p(candidate, current, rows)
        if p < SIGNIFICANCE:
            fell.append(f"{language} ({before:.1%} -> {after:.1%}, {int(rows.sum())} rows, p={p:.2g})")
    return Check(
        "agreement_per_language",
        not fell,
        candidate.agreement_per_language,
        current.agreement_per_language,
        f"drop <= {t.max_language_agreement_drop:.1%} or p >= {SIGNIFICANCE}",
        "agreement with the teacher fell in " + ", ".join(fell),
    )


def _mcnemar_p(candidate: ModelReport, current: ModelReport, rows: npt.NDArray[np.bool_]) -> float:
    """One-sided p-value that the candidate agrees with the teacher less often on ``rows``: the
    same texts score both, so only the rows where exactly one of them agrees inform (McNemar's
    exact test: of those, the ones the current model wins are Binomial(n, 1/2) under no change).
    Without per-row values (a report from elsewhere) every drop counts: p = 0."""
    if candidate.agree_rows is None or current.agree_rows is None:
        return 0.0
    lost = int(np.sum(current.agree_rows[rows] & ~candidate.agree_rows[rows]))
    won = int(np.sum(candidate.agree_rows[rows] & ~current.agree_rows[rows]))
    n = lost + won
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / (1 << n)


def _significant(candidate: ModelReport, current: ModelReport, rows: npt.NDArray[np.bool_]) -> bool:
    """Whether the candidate's KL is higher on ``rows`` beyond chance: the same texts score both
    models, so the test is paired (mean difference over its standard error, one-sided 97.5%).
    Without per-row values (a report from elsewhere) any growth beyond the tolerance counts."""
    if candidate.kl_rows is None or current.kl_rows is None:
        return True
    diff = candidate.kl_rows[rows] - current.kl_rows[rows]
    if diff.size < 2:
        return True
    se = float(diff.std(ddof=1)) / np.sqrt(diff.size)
    return bool(diff.mean() - 1.96 * se > 0)


def evaluate_candidate(candidate: Student, current: Student, golden: GoldenSet, t: Thresholds) -> Decision:
    """Measure both on ``golden`` (latency interleaved in one run) and decide."""
    if not golden.texts:
        raise DataError("the golden set is empty: check --golden and --golden-split")
    cand, cur = measure(candidate, golden), measure(current, golden)
    step = max(1, len(golden.texts) // LATENCY_TEXTS)
    cand.latency_p50_ms, cur.latency_p50_ms = interleaved_latency(
        [candidate, current], golden.texts[::step][:LATENCY_TEXTS]
    )
    decision = decide(cand, cur, golden, t)
    log.info(
        "gate_decided",
        promote=decision.promote,
        candidate=cand.version,
        current=cur.version,
        reasons=decision.reasons(),
    )
    return decision


def golden_from_labelled(
    texts: Sequence[str],
    locales: Sequence[str],
    gold: npt.NDArray[np.int64],
    teacher: Any,
    cache_dir: Path,
    on_progress: Callable[[int], None] | None = None,
) -> GoldenSet:
    """The golden set with the teacher's logits, computed once per (texts, gold, teacher) and cached;
    ``on_progress(n)`` hears of each chunk of ``n`` texts the teacher labels."""
    labels = tuple(teacher.labels)
    key = GoldenSet.key(texts, [int(g) for g in gold], teacher.identity)
    path = cache_dir / "golden" / f"{key}.npz"
    logits = GoldenSet.cached_logits(path, len(texts))
    fresh = logits is None
    if logits is None:
        log.info("golden_labelling", n=len(texts), teacher=teacher.identity)
        chunks = []
        for chunk in teacher.iter_logits(list(texts), chunk_size=256):
            chunks.append(chunk)
            if on_progress is not None:
                on_progress(len(chunk))
        logits = np.concatenate(chunks) if chunks else teacher.logits([])
    golden = GoldenSet(list(texts), list(locales), gold, logits, labels, key, teacher.label_set_id)
    if fresh:
        golden.save(path)
    return golden
