"""Any ONNX NLI model as a zero-shot teacher: premise = the text, hypothesis = each label's.

As in the zero-shot pipelines built on MNLI models (distilbart-mnli, XLM-R XNLI): every text
is paired with every hypothesis of the label set (``LabelSet.hypotheses``: the label's own
templates, else the set's, else "This example is {label}."), the pairs run through the
sequence-pair classifier in length-sorted batches under a token budget, and a label's logit
is the mean entailment logit of its hypotheses, centred per row. The cost grows with the
label set: `pairs_per_utterance` model rows per text, against one for a classifier.

A teacher directory holds:
- ``model.onnx``: inputs ``input_ids``, ``attention_mask`` (``token_type_ids`` if it has
  one), int64 ``[batch, sequence]``; output ``logits`` ``[batch, classes]``;
- ``tokenizer.json``: a `tokenizers` file whose post-processor joins a pair
  (``<s> A </s></s> B </s>`` for BART/XLM-R, ``[CLS] A [SEP] B [SEP]`` for BERT);
- ``config.json`` (the Hugging Face config, ``id2label``) or ``labels.json`` (the class
  names in logit order): the entailment class is the one named ``entailment``, any case;
- ``teacher.json`` (optional): ``id``, ``max_length`` (default 512), ``output``, and
  ``entailment`` (a class name or index) for models whose classes are named otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import structlog
from tokenizers import Encoding, Tokenizer

from worker.errors import ModelError
from worker.models.onnx import clean_text, read_labels
from worker.teacher.label_set import LabelSet
from worker.teacher.runtime import (
    CHARS_PER_TOKEN,
    LabelSetTeacher,
    Logits,
    graph_inputs,
    open_onnx,
    run_in_batches,
)

log = structlog.get_logger(__name__)


def nli_classes(directory: Path) -> tuple[str, ...]:
    """The NLI head's class names in logit order, from ``config.json`` or ``labels.json``."""
    config_path = directory / "config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
            id2label = config["id2label"]
            classes = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"{config_path}: needs 'id2label' mapping 0..n-1 to class names ({type(exc).__name__}: {exc})"
            ) from exc
        return classes
    if (directory / "labels.json").exists():
        return read_labels(directory / "labels.json")
    raise ModelError(f"{directory}: an NLI teacher needs config.json (id2label) or labels.json (class names)")


def entailment_index(classes: Sequence[str], override: object = None) -> int:
    """The entailment class: ``override`` (a name or index) or the class named entailment."""
    if isinstance(override, int) and not isinstance(override, bool):
        if not 0 <= override < len(classes):
            raise ModelError(
                f"entailment index {override} is outside the {len(classes)} classes {list(classes)}"
            )
        return override
    wanted = str(override).lower() if override is not None else "entailment"
    found = [i for i, name in enumerate(classes) if name.lower() == wanted]
    if len(found) != 1:
        raise ModelError(
            f"no single class named {wanted!r} among {list(classes)}; "
            "set 'entailment' (name or index) in teacher.json"
        )
    return found[0]


class NliTeacher(LabelSetTeacher):
    """A `Teacher` from an ONNX sequence-pair classifier and a label set."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        label_set: LabelSet,
        *,
        classes: Sequence[str],
        entailment: int,
        identity: str,
        output: str = "logits",
        threads: int = 1,
        max_length: int = 512,
        batch_tokens: int = 8192,
    ) -> None:
        self._session, self._tokenizer = open_onnx(model_path, tokenizer_path, threads)
        if self._tokenizer.post_processor is None:
            raise ModelError(
                f"{tokenizer_path}: no post-processor, so nothing marks where the premise ends "
                "and the hypothesis starts; save the tokenizer the model was trained with"
            )
        self._tokenizer.no_padding()
        # Cut the premise, never the hypothesis: it names the label.
        self._tokenizer.enable_truncation(max_length=max_length, strategy="only_first")
        self._inputs = graph_inputs(self._session, model_path, output)
        self.label_set = label_set
        self.classes = tuple(classes)
        self.entailment = entailment
        self._output = output
        self._identity = identity
        self._max_chars = CHARS_PER_TOKEN * max_length
        self._batch_tokens = batch_tokens
        self._hypotheses = [h for label in label_set.labels for h in label_set.hypotheses(label)]
        self._owners = np.array(
            [i for i, label in enumerate(label_set.labels) for _ in label_set.hypotheses(label)],
            dtype=np.int64,
        )
        padding = self._tokenizer.padding
        self._pad_id = int(padding["pad_id"]) if padding else _pad_id(self._tokenizer)
        width = self._run([self._encode_pair("probe", self._hypotheses[0])]).shape[1]
        if width != len(self.classes):
            raise ModelError(
                f"{model_path}: outputs {width} classes but the config names {len(self.classes)}: {list(self.classes)}"
            )

    @classmethod
    def from_directory(
        cls, directory: Path, label_set: LabelSet, *, threads: int = 1, batch_tokens: int = 8192
    ) -> NliTeacher:
        from worker.teacher.e5format import sha256_file

        config: dict[str, object] = {}
        if (directory / "teacher.json").exists():
            try:
                config = json.loads((directory / "teacher.json").read_text())
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot read {directory / 'teacher.json'}: {exc}") from exc
        classes = nli_classes(directory)
        index = entailment_index(classes, config.get("entailment"))
        if not (directory / "model.onnx").exists():
            raise ModelError(f"model file {directory / 'model.onnx'} does not exist")
        digest = sha256_file(directory / "model.onnx")[:16]
        teacher = cls(
            directory / "model.onnx",
            directory / "tokenizer.json",
            label_set,
            classes=classes,
            entailment=index,
            identity=f"{config.get('id', directory.name)}-nli@{digest}.{label_set.sha256[:12]}",
            output=str(config.get("output", "logits")),
            threads=threads,
            max_length=int(str(config.get("max_length", 512))),
            batch_tokens=batch_tokens,
        )
        log.info(
            "nli_teacher_loaded",
            identity=teacher.identity,
            label_set=label_set.id,
            entailment=classes[index],
            pairs_per_utterance=teacher.pairs_per_utterance,
        )
        return teacher

    @property
    def pairs_per_utterance(self) -> int:
        """Model rows one text costs: one per hypothesis, so at least one per label."""
        return len(self._hypotheses)

    def logits(self, texts: Sequence[str]) -> Logits:
        premises = [clean_text(t, self._max_chars) for t in texts]
        m = len(self._hypotheses)
        if not premises:
            return np.zeros((0, len(self.labels)), np.float32)
        pairs = [self._encode_pair(p, h) for p in premises for h in self._hypotheses]
        entail = self._run(pairs)[:, self.entailment].reshape(len(premises), m)
        out = np.zeros((len(premises), len(self.labels)), dtype=np.float32)
        np.add.at(out.T, self._owners, entail.T)
        out /= np.bincount(self._owners, minlength=len(self.labels)).astype(np.float32)
        centred: Logits = (out - out.mean(axis=1, keepdims=True)).astype(np.float32)
        return centred

    def iter_logits(self, texts: Iterable[str], chunk_size: int = 1024) -> Iterator[Logits]:
        # A chunk of texts is chunk_size × pairs_per_utterance model rows: keep rows bounded.
        rows = max(1, chunk_size // self.pairs_per_utterance)
        iterator = iter(texts)
        while chunk := list(islice(iterator, rows)):
            yield self.logits(chunk)

    def _encode_pair(self, premise: str, hypothesis: str) -> Encoding:
        return self._tokenizer.encode(premise, hypothesis)

    def _run(self, pairs: Sequence[Encoding]) -> Logits:
        """Class logits of every pair, in order: length-sorted batches under the token budget."""
        # n >= 1: callers never run an empty batch
        return run_in_batches(
            [len(p.ids) for p in pairs],
            self._batch_tokens,
            lambda rows: self._run_batch([pairs[i] for i in rows]),
        )

    def _run_batch(self, batch: Sequence[Encoding]) -> Logits:
        longest = max(len(e.ids) for e in batch)
        input_ids = np.full((len(batch), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        types = np.zeros((len(batch), longest), dtype=np.int64)
        for r, encoding in enumerate(batch):
            k = len(encoding.ids)
            input_ids[r, :k] = encoding.ids
            mask[r, :k] = 1
            types[r, :k] = encoding.type_ids
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = types
        try:
            (values,) = self._session.run([self._output], feed)
        except Exception as exc:  # onnxruntime raises its own bare exception types
            raise ModelError(f"the NLI model failed on a batch of {len(batch)} pairs: {exc}") from exc
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2:
            raise ModelError(
                f"the NLI model's {self._output!r} has shape {values.shape}, not [batch, classes]"
            )
        return values


def _pad_id(tokenizer: Tokenizer) -> int:
    for token in ("<pad>", "[PAD]"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0
