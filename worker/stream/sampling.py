"""The sampler: which classified utterances go to the buffer for the teacher. Pure; no I/O.

Three rules, applied to each classified utterance:

1. **Stratified rate.** Strata are (locale, predicted label). Each stratum's inclusion
   probability is ``min(base_rate, level / rate)``, where ``rate`` is the stratum's observed
   arrival rate and ``level`` is the max-min fair share of a global samples/second budget
   (water-filling): rare strata keep the base rate, frequent ones are capped so they cannot
   starve the rest.
2. **Uncertainty quota.** A prediction whose top-2 margin is below a threshold gets a second,
   independent chance from its own stratified budget, at a higher rate. The two chances combine
   into one inclusion probability ``p``; every sample records ``p`` and ``weight = 1 / p`` so a
   data set built from the buffer can be de-biased.
3. **Duplicate suppression.** A text whose normalised form (NFKC, casefold, collapsed
   whitespace) was sampled within the window is dropped (and counted).

The I/O edge (the Redis stream, the circuit breaker) is in :mod:`worker.stream.buffer`.
"""

from __future__ import annotations

import hashlib
import math
import random
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from worker.config import SamplingSettings
from worker.schemas import UNKNOWN_LOCALE, BufferSample, SampleReason, Utterance

LOGIT_DECIMALS = 4  # the buffer stores logits rounded: enough for distillation, half the bytes


class DropReason(StrEnum):
    """Why a sample the sampler selected did not reach the buffer."""

    DUPLICATE = "duplicate"  # the same normalised text was sampled within the window
    CIRCUIT_OPEN = "circuit_open"  # Redis failed recently; not tried until the cool-down ends
    REDIS_TIMEOUT = "redis_timeout"  # Redis did not answer within the write timeout
    REDIS_ERROR = "redis_error"  # Redis refused the connection or the command
    BACKLOG = "backlog"  # too many buffer writes were already in flight (Redis slow): not tried


@dataclass
class BufferCounters:
    """Running totals, shared by the sampler and its sink; Prometheus reads them."""

    seen: int = 0  # predictions offered to the sampler
    selected: int = 0  # predictions that won the sampling draw
    kept: int = 0  # samples stored in the buffer
    dropped_by_reason: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: DropReason, n: int = 1) -> None:
        if n > 0:
            self.dropped_by_reason[reason.value] = self.dropped_by_reason.get(reason.value, 0) + n

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())


class ScoredPrediction(Protocol):
    """What the sampler needs of a prediction (:class:`worker.models.student.Prediction` has it)."""

    @property
    def label(self) -> str: ...
    @property
    def scores(self) -> Mapping[str, float]: ...
    @property
    def margin(self) -> float: ...
    @property
    def logits(self) -> Sequence[float]: ...


class SamplingPolicy(SamplingSettings):
    """The sampler's knobs: :class:`worker.config.SamplingSettings`, and a bound of its own."""

    max_strata: int = 10_000  # locales come from producers: bound what we track


def normalise_text(text: str) -> str:
    """The form two texts must share to count as duplicates: NFKC, casefolded, spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_digest(text: str) -> str:
    """A short, stable digest of :func:`normalise_text` (the in-process and the Redis dedup key)."""
    return hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=16).hexdigest()


def stratum_of(locale: str | None, label: str) -> str:
    """``locale|label``, with ``en_US`` and ``en-us`` in the same stratum."""
    return f"{(locale or UNKNOWN_LOCALE).casefold().replace('_', '-')}|{label}"


class DuplicateFilter:
    """Remembers digests for ``window_s`` seconds, at most ``max_entries`` of them (oldest go first)."""

    def __init__(self, window_s: float, max_entries: int) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # digest -> when, oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, digest: str, now: float) -> bool:
        """True (and remembered) unless ``digest`` was admitted within the window."""
        if self.window_s <= 0:
            return True
        horizon = now - self.window_s
        while self._seen:
            oldest, when = next(iter(self._seen.items()))
            if when > horizon:
                break
            del self._seen[oldest]
        if digest in self._seen:
            return False
        self._seen[digest] = now
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return True


@dataclass
class _Arrivals:
    count: float  # exponentially decayed number of arrivals
    last: float  # when count was last decayed
    first: float  # first arrival: young strata need a different normaliser


class StratifiedRate:
    """Per-stratum inclusion probabilities that keep a global budget, fairly shared.

    Each stratum's arrival rate comes from an exponentially decayed count (time constant
    ``window_s``). Once per ``refresh_s`` the water level is recomputed: the largest per-stratum
    sample rate ``level`` with ``sum(min(max_rate * rate_s, level)) <= budget_per_s``.
    """

    def __init__(
        self, max_rate: float, budget_per_s: float, window_s: float, max_strata: int, refresh_s: float = 1.0
    ) -> None:
        self.max_rate = max_rate
        self.budget_per_s = budget_per_s
        self.window_s = window_s
        self.max_strata = max_strata
        self.refresh_s = refresh_s
        self.level = math.inf
        self._arrivals: dict[str, _Arrivals] = {}
        self._refreshed = -math.inf

    def __len__(self) -> int:
        return len(self._arrivals)

    def _decayed(self, arrivals: _Arrivals, now: float) -> float:
        return arrivals.count * math.exp(-max(0.0, now - arrivals.last) / self.window_s)

    def _rate(self, arrivals: _Arrivals, count: float, now: float) -> float:
        # A constant rate r gives count = r * window * (1 - exp(-age / window)); at least 1 s of age,
        # so that a new stratum's first arrival reads as about 1/s, not as a burst.
        age = max(1.0, now - arrivals.first)
        return count / (self.window_s * -math.expm1(-age / self.window_s))

    def rate(self, stratum: str, now: float) -> float:
        """The stratum's estimated arrivals per second (0 if never seen)."""
        arrivals = self._arrivals.get(stratum)
        return 0.0 if arrivals is None else self._rate(arrivals, self._decayed(arrivals, now), now)

    def probability(self, stratum: str, now: float) -> float:
        """Record one arrival in ``stratum`` and return its inclusion probability."""
        if self.max_rate <= 0 or self.budget_per_s <= 0:
            return 0.0
        arrivals = self._arrivals.get(stratum)
        if arrivals is None:
            arrivals = self._arrivals[stratum] = _Arrivals(0.0, now, now)
        arrivals.count = self._decayed(arrivals, now) + 1.0
        arrivals.last = now
        if now - self._refreshed >= self.refresh_s or len(self._arrivals) > self.max_strata:
            self._refresh(now)
        return min(self.max_rate, self.level / self._rate(arrivals, arrivals.count, now))

    def _refresh(self, now: float) -> None:
        self._refreshed = now
        counts = {key: self._decayed(arrivals, now) for key, arrivals in self._arrivals.items()}
        if len(counts) > self.max_strata:  # forget the quietest strata, with room before the next prune
            keep = sorted(counts, key=counts.__getitem__, reverse=True)[: self.max_strata * 9 // 10]
            self._arrivals = {key: self._arrivals[key] for key in keep}
            counts = {key: counts[key] for key in keep}
        demands = sorted(self.max_rate * self._rate(self._arrivals[k], c, now) for k, c in counts.items())
        self.level = water_level(demands, self.budget_per_s)


def water_level(demands: Sequence[float], budget: float) -> float:
    """The cap ``c`` with ``sum(min(d, c) for d in demands) == budget`` (inf if all fit).

    ``demands`` must be sorted ascending.
    """
    remaining = budget
    for index, demand in enumerate(demands):
        left = len(demands) - index
        if demand * left > remaining:
            return remaining / left
        remaining -= demand
    return math.inf


class Sampler:
    """Chooses buffer samples from classified micro-batches; counts what it chose and dropped."""

    def __init__(
        self,
        policy: SamplingPolicy,
        *,
        rng: random.Random | None = None,
        counters: BufferCounters | None = None,
    ) -> None:
        self.policy = policy
        self.rng = rng if rng is not None else random.Random()
        self.counters = counters if counters is not None else BufferCounters()
        self.strata = StratifiedRate(
            policy.rate, policy.budget_per_s, policy.rate_window_s, policy.max_strata
        )
        self.uncertain = StratifiedRate(
            policy.uncertain_rate, policy.uncertain_budget_per_s, policy.rate_window_s, policy.max_strata
        )
        self.duplicates = DuplicateFilter(policy.dedup_window_s, policy.dedup_max_entries)

    def inclusion(self, stratum: str, margin: float, now: float) -> tuple[float, float]:
        """Record one arrival; return (stratum probability, combined probability)."""
        p_stratum = self.strata.probability(stratum, now)
        if margin >= self.policy.uncertain_margin:
            return p_stratum, p_stratum
        p_uncertain = self.uncertain.probability(stratum, now)
        return p_stratum, 1.0 - (1.0 - p_stratum) * (1.0 - p_uncertain)

    def select(
        self,
        utterances: Sequence[Utterance],
        predictions: Sequence[ScoredPrediction],
        *,
        model_version: str,
        now: float,
    ) -> list[BufferSample]:
        """The samples to store from one classified micro-batch (``now``: Unix seconds)."""
        if len(utterances) != len(predictions):
            raise ValueError(f"{len(utterances)} utterances but {len(predictions)} predictions")
        chosen: list[BufferSample] = []
        for utterance, prediction in zip(utterances, predictions, strict=True):
            self.counters.seen += 1
            stratum = stratum_of(utterance.locale, prediction.label)
            p_stratum, p = self.inclusion(stratum, prediction.margin, now)
            draw = self.rng.random()
            if draw >= p:
                continue
            self.counters.selected += 1
            if not self.duplicates.admit(text_digest(utterance.text), now):
                self.counters.drop(DropReason.DUPLICATE)
                continue
            chosen.append(
                BufferSample(
                    id=utterance.id,
                    text=utterance.text,
                    locale=utterance.locale,
                    label=prediction.label,
                    logits=tuple(round(float(v), LOGIT_DECIMALS) for v in prediction.logits),
                    scores=dict(prediction.scores),
                    margin=min(1.0, max(0.0, float(prediction.margin))),
                    model_version=model_version,
                    stratum=stratum,
                    # The draw tells which chance kept it; p is what de-biasing needs.
                    reason=SampleReason.STRATUM if draw < p_stratum else SampleReason.UNCERTAIN,
                    sampling_probability=p,
                    weight=1.0 / p,
                    timestamp=now,
                )
            )
        return chosen
