"""The zero-shot teacher: the embedded e5 encoder scoring texts against a label set.

No training data. Each label's descriptions and examples are *prototypes*: embedded once,
at load, with e5's prefixes. A text's score for a label pools its cosine similarities to
that label's prototypes; the logits are those scores over a fixed temperature, centred per
row (as the trained head's are).

- **Prefixes.** e5 was trained with ``query: `` on questions and ``passage: `` on the texts
  that answer them, and asks for ``query: `` on both sides of symmetric tasks. Of the eight
  arrangements (utterance, description, example × query/passage) the one that measured best
  over both default 3-label sets, on MASSIVE and xSID validation, is the default: utterance
  and description ``passage: `` (two statements of one topic), examples ``query: ``
  (``benchmarks/results/zero_shot.json``; chosen on validation and reported as such).
- **Pooling.** A label's examples become one prototype, their normalised mean (few
  examples, one cluster); then ``lse`` (default) pools the label's prototypes as
  ``T·log mean_j exp(cos_j / T)``, a soft maximum that does not favour a label for having
  more prototypes. ``max``, ``mean`` and ``centroid`` are there to compare.
- **Temperature.** Fixed at 0.01, e5's own contrastive training temperature, the scale at
  which its cosines were trained to be softmax logits. No labels choose it; the benchmark
  reports its calibration beside other values.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from itertools import islice
from typing import Protocol

import numpy as np
import numpy.typing as npt

from worker.models.onnx import clean_text
from worker.teacher.label_set import LabelSet
from worker.teacher.runtime import LabelSetTeacher, Logits

QUERY = "query: "
PASSAGE = "passage: "

Array = npt.NDArray[np.float32]


class TextEncoder(Protocol):
    """Texts -> L2-normalised sentence embeddings [n, dim]; adds no prefix of its own."""

    def run(self, texts: Sequence[str]) -> Array: ...


class Pooling(StrEnum):
    """How a label's prototype similarities become one score."""

    LSE = "lse"
    MAX = "max"
    MEAN = "mean"
    CENTROID = "centroid"


@dataclass(frozen=True)
class ZeroShotConfig:
    """The arrangement: prefixes per text kind, pooling, temperature, whether names count."""

    utterance_prefix: str = PASSAGE
    description_prefix: str = PASSAGE
    example_prefix: str = QUERY
    pooling: Pooling = Pooling.LSE
    examples_as_centroid: bool = True
    temperature: float = 0.01
    use_names: bool = False

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Prototypes:
    """The texts that stand for the labels, and the label each belongs to."""

    texts: tuple[str, ...]
    owners: npt.NDArray[np.int64]
    n_labels: int
    #: Prototypes with the same group id >= 0 are pooled into one (their centroid).
    groups: npt.NDArray[np.int64]


def prototypes(label_set: LabelSet, config: ZeroShotConfig) -> Prototypes:
    """Prefixed prototype texts of every label: its descriptions, examples (and name).

    With ``examples_as_centroid`` a label's examples are one prototype, their mean
    embedding (``groups`` marks them), rather than one prototype each.
    """
    texts: list[str] = []
    owners: list[int] = []
    groups: list[int] = []
    for index, label in enumerate(label_set.labels):
        items = [config.description_prefix + d for d in label.descriptions]
        if config.use_names:
            items.append(config.description_prefix + label.name)
        examples = [config.example_prefix + e for e in label.examples]
        texts += items + examples
        owners += [index] * (len(items) + len(examples))
        group = index if config.examples_as_centroid else -1
        groups += [-1] * len(items) + [group] * len(examples)
    return Prototypes(
        tuple(texts),
        np.asarray(owners, dtype=np.int64),
        len(label_set.labels),
        np.asarray(groups, dtype=np.int64),
    )


@dataclass(frozen=True)
class LabelMatrix:
    """Embedded prototypes, centroid groups merged: one row per prototype, and its label."""

    rows: Array
    owners: npt.NDArray[np.int64]
    n_labels: int


def label_matrix(protos: Prototypes, embeddings: Array) -> LabelMatrix:
    """Merge each group of prototype embeddings into its L2-normalised mean."""
    rows: list[Array] = []
    owners: list[int] = []
    seen: set[int] = set()
    for i, group in enumerate(protos.groups.tolist()):
        if group < 0:
            rows.append(embeddings[i])
        elif group not in seen:
            seen.add(group)
            rows.append(_normalised(embeddings[protos.groups == group].mean(axis=0)))
        else:
            continue
        owners.append(int(protos.owners[i]))
    return LabelMatrix(np.stack(rows).astype(np.float32), np.asarray(owners, dtype=np.int64), protos.n_labels)


def _normalised(vector: Array) -> Array:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def score(utterances: Array, matrix: LabelMatrix, config: ZeroShotConfig) -> Logits:
    """Label logits [n, labels] from L2-normalised utterance embeddings, centred per row."""
    out = np.empty((utterances.shape[0], matrix.n_labels), dtype=np.float32)
    similarity = utterances @ matrix.rows.T  # [n, prototypes]
    for label in range(matrix.n_labels):
        mine = matrix.owners == label
        cos = similarity[:, mine]
        if config.pooling is Pooling.MAX:
            pooled = cos.max(axis=1)
        elif config.pooling is Pooling.MEAN:
            pooled = cos.mean(axis=1)
        elif config.pooling is Pooling.CENTROID:
            pooled = utterances @ _normalised(matrix.rows[mine].mean(axis=0))
        else:
            z = cos / config.temperature
            top = z.max(axis=1, keepdims=True)
            pooled = (top[:, 0] + np.log(np.exp(z - top).mean(axis=1))) * config.temperature
        out[:, label] = pooled / config.temperature
    centred: Logits = (out - out.mean(axis=1, keepdims=True)).astype(np.float32)
    return centred


class ZeroShotTeacher(LabelSetTeacher):
    """A `Teacher` from the e5 encoder and a label set; no training data involved.

    ``encoder`` must add no prefix of its own (the prefixes are part of the arrangement).
    """

    def __init__(
        self,
        encoder: TextEncoder,
        label_set: LabelSet,
        *,
        encoder_key: str,
        config: ZeroShotConfig | None = None,
    ) -> None:
        self._encoder = encoder
        self._config = config or ZeroShotConfig()
        self.label_set = label_set
        protos = prototypes(label_set, self._config)
        self._matrix = label_matrix(protos, encoder.run(list(protos.texts)))
        digest = hashlib.sha256(f"{label_set.sha256}:{self._config.digest()}".encode()).hexdigest()
        self._identity = f"e5-zero-shot@{encoder_key[:8]}.{digest[:12]}"

    @property
    def config(self) -> ZeroShotConfig:
        return self._config

    def embed(self, texts: Sequence[str]) -> Array:
        # Check first: a non-string input is a BadInput, not a TypeError from "+"; the encoder
        # then cleans and cuts the prefixed text.
        prefix = self._config.utterance_prefix
        return self._encoder.run([prefix + clean_text(t, sys.maxsize) for t in texts])

    def logits(self, texts: Sequence[str]) -> Logits:
        return score(self.embed(texts), self._matrix, self._config)

    def iter_logits(self, texts: Iterable[str], chunk_size: int = 1024) -> Iterator[Logits]:
        iterator = iter(texts)
        while chunk := list(islice(iterator, chunk_size)):
            yield self.logits(chunk)
