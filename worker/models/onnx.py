"""What every ONNX sequence model shares, teacher and students alike: session options, input
text cleaning, label files, and token-id batches (padding and attention masks), in one place."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from worker.errors import BadInput, ModelError

IdArray = npt.NDArray[np.int64]

_SURROGATE = re.compile("[\ud800-\udfff]")


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, max_length: int | None = None
) -> tuple[IdArray, IdArray]:
    """``input_ids`` and ``attention_mask`` [len(rows), longest], right-padded with ``pad_id``.

    Rows longer than ``max_length`` are cut; an empty row is all padding with a zero mask
    (the width is at least 1, so every model gets a valid tensor).
    """
    longest = max((len(row) for row in rows), default=0)
    if max_length is not None:
        longest = min(longest, max_length)
    longest = max(longest, 1)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for r, row in enumerate(rows):
        n = min(len(row), longest)
        input_ids[r, :n] = row[:n]
        mask[r, :n] = 1
    return input_ids, mask


def clean_text(text: object, max_chars: int) -> str:
    """One input text, validated and normalised for a tokenizer.

    A non-``str`` raises `BadInput`; the text is cut to ``max_chars`` characters, and lone
    UTF-16 surrogates (invalid in UTF-8) become U+FFFD.
    """
    if not isinstance(text, str):
        raise BadInput(f"text must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        text = text[:max_chars]
    return _SURROGATE.sub("\ufffd", text)


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def read_labels(path: Path) -> tuple[str, ...]:
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read label list {path}: {exc}") from exc
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ModelError(f"{path} must hold a non-empty JSON list of label names")
    if len(set(labels)) != len(labels):
        raise ModelError(f"{path} lists a label twice")
    return tuple(labels)


def label_names_id(labels: Sequence[str]) -> str:
    """The label-set id of a bare list of label names (a model with no label-set file):
    ``labels@<12 hex of the sha256 of the sorted names as JSON>``. Outputs name their labels,
    so the order is not part of the set; see `worker.teacher.label_set`."""
    material = json.dumps(sorted(labels), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return f"labels@{hashlib.sha256(material).hexdigest()[:12]}"
