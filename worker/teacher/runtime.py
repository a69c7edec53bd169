"""Teachers at run time: the `Teacher` protocol and the ONNX implementation behind it.

Texts stream through in chunks; inside a chunk they are sorted by token length and cut into
batches under a token budget, so memory stays bounded whatever the input size and padding
waste stays small.

Input handling, the same for every teacher:
- a non-``str`` input raises `BadInput`;
- lone UTF-16 surrogates (invalid in UTF-8) are replaced by U+FFFD;
- text is cut to ``64 × max_length`` characters before tokenising (no token is that long),
  then to ``max_length`` tokens, specials included;
- empty or whitespace-only text is valid and gets the logits of an empty query.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from worker.errors import ModelError
from worker.models.onnx import clean_text, label_names_id, pad_batch, read_labels, session_options
from worker.teacher.label_set import LabelSet

Logits = npt.NDArray[np.float32]

CHARS_PER_TOKEN = 64


class Teacher(Protocol):
    """Anything that scores texts with raw logits over a fixed label list."""

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def identity(self) -> str:
        """A stable id, including a content hash, recorded in every dataset it labels."""
        ...

    @property
    def label_set_id(self) -> str:
        """The label set the logits are over: a label-set file's id (``name@<hash>``), else
        ``labels@<hash of the label names>``; datasets, students and intents carry it."""
        ...

    def logits(self, texts: Sequence[str]) -> Logits: ...

    def iter_logits(self, texts: Iterable[str], chunk_size: int = 1024) -> Iterator[Logits]: ...


def open_onnx(model_path: Path, tokenizer_path: Path, threads: int) -> tuple[ort.InferenceSession, Tokenizer]:
    """The model's CPU session and its tokenizer; a missing or unreadable file is a `ModelError`."""
    for path in (model_path, tokenizer_path):
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
    try:
        session = ort.InferenceSession(
            str(model_path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # onnxruntime and tokenizers raise bare RuntimeErrors
        raise ModelError(f"cannot load {model_path} / {tokenizer_path}: {exc}") from exc
    return session, tokenizer


def graph_inputs(session: ort.InferenceSession, model_path: Path, output: str) -> set[str]:
    """The graph's input names, once it is known to take ``input_ids``/``attention_mask`` and
    to have ``output``."""
    inputs = {i.name for i in session.get_inputs()}
    missing = {"input_ids", "attention_mask"} - inputs
    if missing:
        raise ModelError(f"{model_path}: graph lacks inputs {sorted(missing)}")
    outputs = [o.name for o in session.get_outputs()]
    if output not in outputs:
        raise ModelError(f"{model_path}: no output {output!r} (has {outputs})")
    return inputs


def run_in_batches(
    lengths: Sequence[int], batch_tokens: int, run_batch: Callable[[list[int]], Logits]
) -> Logits:
    """``run_batch(rows)`` over length-sorted batches of row indices, put back in row order.

    A batch grows while its padded size (rows × longest) stays within ``batch_tokens``; a row
    longer than the budget is a batch of its own. Needs at least one row.
    """
    n = len(lengths)
    order = sorted(range(n), key=lengths.__getitem__)
    out: Logits | None = None
    start = 0
    while start < n:
        end = start + 1
        while end < n and (end + 1 - start) * lengths[order[end]] <= batch_tokens:
            end += 1
        rows = order[start:end]
        values = run_batch(rows)
        if out is None:
            out = np.empty((n, values.shape[1]), dtype=np.float32)
        out[rows] = values
        start = end
    assert out is not None, "run_in_batches needs at least one row"
    return out


class LabelSetTeacher:
    """The `Teacher` properties of a teacher scoring a `LabelSet`: set ``label_set`` and ``_identity``."""

    label_set: LabelSet
    _identity: str

    @property
    def labels(self) -> tuple[str, ...]:
        return self.label_set.names

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def label_set_id(self) -> str:
        return self.label_set.id


class OnnxSequenceModel:
    """An ONNX graph over ``input_ids``/``attention_mask`` (and optional ``token_type_ids``)."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        output: str,
        threads: int = 1,
        max_length: int = 512,
        prefix: str = "",
        batch_tokens: int = 8192,
    ) -> None:
        self._session, self._tokenizer = open_onnx(model_path, tokenizer_path, threads)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self._inputs = graph_inputs(self._session, model_path, output)
        self.model_path = model_path
        self._output = output
        self._prefix = prefix
        self._max_chars = CHARS_PER_TOKEN * max_length
        self._batch_tokens = batch_tokens
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (prefix and specials included, truncated)."""
        cleaned = [self._prefix + clean_text(t, self._max_chars) for t in texts]
        return [e.ids for e in self._tokenizer.encode_batch(cleaned)]

    def run(self, texts: Sequence[str]) -> Logits:
        """The graph's output for every text, in input order."""
        ids = self.encode(texts)
        n = len(ids)
        if n == 0:
            width = self._session.get_outputs()
            shape = next(o.shape for o in width if o.name == self._output)
            return np.zeros((0, int(shape[-1]) if isinstance(shape[-1], int) else 0), np.float32)
        return run_in_batches(
            [len(row) for row in ids],
            self._batch_tokens,
            lambda rows: self._run_batch([ids[i] for i in rows]),
        )

    def _run_batch(self, batch: list[list[int]]) -> Logits:
        input_ids, mask = pad_batch(batch, self._pad_id)
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        (values,) = self._session.run([self._output], feed)
        return np.asarray(values, dtype=np.float32)

    @property
    def _pad_id(self) -> int:
        pad = self._tokenizer.token_to_id("<pad>")
        return 1 if pad is None else int(pad)


class FixedLabelsTeacher:
    """The `Teacher` properties of a teacher over a fixed label list, and `iter_logits` in chunks;
    subclasses set ``_labels`` and ``_identity`` and define `logits`."""

    _labels: tuple[str, ...]
    _identity: str

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def label_set_id(self) -> str:
        return label_names_id(self._labels)

    def logits(self, texts: Sequence[str]) -> Logits:
        raise NotImplementedError

    def iter_logits(self, texts: Iterable[str], chunk_size: int = 1024) -> Iterator[Logits]:
        iterator = iter(texts)
        while chunk := list(islice(iterator, chunk_size)):
            yield self.logits(chunk)


class OnnxTeacher(FixedLabelsTeacher):
    """A teacher from any ONNX sequence classifier plus its ``tokenizer.json`` and labels."""

    def __init__(self, model: OnnxSequenceModel, labels: Sequence[str], identity: str) -> None:
        self._model = model
        self._labels = tuple(labels)
        self._identity = identity

    @classmethod
    def from_directory(cls, directory: Path, *, threads: int = 1, batch_tokens: int = 8192) -> OnnxTeacher:
        """Load ``model.onnx``, ``tokenizer.json``, ``labels.json`` and optional ``teacher.json``.

        ``teacher.json`` may set ``prefix`` (prepended to every text), ``max_length``,
        ``output`` (default ``logits``) and ``id``.
        """
        from worker.teacher.e5format import sha256_file

        config: dict[str, object] = {}
        if (directory / "teacher.json").exists():
            config = json.loads((directory / "teacher.json").read_text())
        labels = read_labels(directory / "labels.json")
        model = OnnxSequenceModel(
            directory / "model.onnx",
            directory / "tokenizer.json",
            output=str(config.get("output", "logits")),
            threads=threads,
            max_length=int(str(config.get("max_length", 512))),
            prefix=str(config.get("prefix", "")),
            batch_tokens=batch_tokens,
        )
        digest = sha256_file(directory / "model.onnx")[:16]
        identity = f"{config.get('id', directory.name)}@{digest}"
        teacher = cls(model, labels, identity)
        width = teacher.logits(["probe"]).shape[1]
        if width != len(labels):
            raise ModelError(f"{directory}: model outputs {width} logits but labels.json has {len(labels)}")
        return teacher

    def logits(self, texts: Sequence[str]) -> Logits:
        return self._model.run(texts)
