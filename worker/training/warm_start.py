"""Warm starts: a student's float weights read back from its served ONNX model.

A published model directory keeps only ``model.onnx`` (usually static-QDQ INT8); the float
export is not committed. Its weights are still all there: float initializers as they are, and
each quantised one as the ``<name>_quantized`` / ``<name>_scale`` / ``<name>_zero_point``
triple that onnxruntime's quantiser writes, dequantised here ((q - zero) * scale, per channel
along axis 0 where the scale is a vector), and a 4-bit table as its codes and scales
(``--table-bits 4``). The names are the torch parameter names the
exporter used, so the result loads into a fresh student of the same configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.errors import MissingExtra
from worker.training.nibbles import unpack_rows
from worker.training.vocab import FIRST_PIECE_ID

try:
    import onnx
    from onnx import numpy_helper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("teacher", "onnx") from exc

Array = npt.NDArray[np.float32]
_QUANTISED = "_quantized"


def onnx_weights(path: Path, names: set[str]) -> dict[str, Array]:
    """The float values of ``names`` (torch parameter names) in the ONNX model at ``path``.

    A name that the model holds neither as a float initializer nor as a quantised triple is
    missing from the result, so the caller can say which.
    """
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    weights: dict[str, Array] = {}
    for name in names:
        if name in tensors and tensors[name].dtype == np.float32:
            weights[name] = tensors[name].astype(np.float32)
            continue
        nibbles = [k for k in tensors if k.startswith(name) and k.endswith(".nibbles.codes")]
        if len(nibbles) == 1:  # a 4-bit table (`worker.training.nibbles`)
            packed, scales = tensors[nibbles[0]], tensors[nibbles[0].removesuffix("codes") + "scales"]
            weights[name] = unpack_rows(packed, scales, packed.shape[1] * 2 // scales.shape[1])
            continue
        codes = tensors.get(name + _QUANTISED)
        scale = tensors.get(name + _QUANTISED + "_scale", tensors.get(name + "_scale"))
        if codes is None or scale is None:
            continue
        zero = tensors.get(name + _QUANTISED + "_zero_point", tensors.get(name + "_zero_point"))
        shape = (-1,) + (1,) * (codes.ndim - 1)
        offset = np.zeros(1) if zero is None else np.reshape(zero.astype(np.float64), shape)
        values = (codes.astype(np.float64) - offset) * np.reshape(scale.astype(np.float64), shape)
        weights[name] = values.astype(np.float32)
    return weights


TABLE = "embedding.weight"
#: Below this share of its own pieces found in the old student, a warm start is refused: the
#: directory is more likely the wrong one than an older generation of this student.
MIN_SHARED_PIECES = 0.5


@dataclass(frozen=True)
class Remap:
    """How the old table became the new one: rows copied by piece, rows mapped for new pieces."""

    copied: int
    mapped: int
    shared_pieces: float  # of the new vocabulary's teacher pieces (bytes and specials aside)


def warm_start_weights(
    model_dir: Path, vocabulary: dict[str, int], shapes: dict[str, tuple[int, ...]], initial_table: Array
) -> tuple[dict[str, Array], Remap]:
    """Every weight of the student in ``model_dir``, for the student about to train.

    Every weight must have the shape in ``shapes``, except the table's row count when the
    vocabularies (piece -> id) differ: then the old rows are carried over by piece, and the rows
    of pieces the old student did not have come from ``initial_table`` (this student's own
    initialisation) through the linear map that best takes the initial rows of the shared pieces
    to their trained ones (`remap_table`). Raises ValueError naming what differs when the
    architectures differ or too few pieces are shared.
    """
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab()
    weights = onnx_weights(model_dir / "model.onnx", set(shapes))
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ValueError(f"{model_dir / 'model.onnx'} holds no weights named {missing}")
    expected = dict(shapes)
    if TABLE in expected and TABLE in weights:
        expected[TABLE] = (weights[TABLE].shape[0], *expected[TABLE][1:])
    wrong = {k: (weights[k].shape, v) for k, v in expected.items() if weights[k].shape != v}
    if wrong:
        raise ValueError(f"{model_dir} is another architecture: shapes (theirs, ours) {wrong}")
    if theirs == vocabulary:
        return weights, Remap(copied=len(vocabulary), mapped=0, shared_pieces=1.0)
    weights[TABLE], remap = remap_table(weights[TABLE], theirs, vocabulary, initial_table)
    if remap.shared_pieces < MIN_SHARED_PIECES:
        raise ValueError(
            f"{model_dir} shares only {remap.shared_pieces:.0%} of this vocabulary's pieces: "
            "not an earlier generation of this student"
        )
    return weights, remap


def remap_table(
    old_table: Array, old_vocabulary: dict[str, int], vocabulary: dict[str, int], initial_table: Array
) -> tuple[Array, Remap]:
    """The old student's table re-indexed for ``vocabulary`` (see `warm_start_weights`)."""
    pairs = [(new, old_vocabulary[piece]) for piece, new in vocabulary.items() if piece in old_vocabulary]
    new_ids = np.array([new for new, _ in pairs], np.int64)
    old_ids = np.array([old for _, old in pairs], np.int64)
    table = np.array(initial_table, np.float32)
    table[new_ids] = old_table[old_ids]
    fresh = np.setdiff1d(np.arange(len(vocabulary)), new_ids)
    if fresh.size:
        table[fresh] = map_rows(initial_table[new_ids], old_table[old_ids], initial_table[fresh])
    pieces = [new for new in vocabulary.values() if new >= FIRST_PIECE_ID]
    shared = int(np.count_nonzero(new_ids >= FIRST_PIECE_ID))
    return table, Remap(copied=len(pairs), mapped=int(fresh.size), shared_pieces=shared / max(len(pieces), 1))


def map_rows(known_initial: Array, known_trained: Array, initial: Array) -> Array:
    """Trained-looking rows for ``initial`` ones: the linear map that best takes the initial rows
    of known pieces to their trained rows (least squares), applied to the others' initial rows."""
    mapping, *_ = np.linalg.lstsq(known_initial, known_trained, rcond=None)
    return np.asarray(initial @ mapping, np.float32)
