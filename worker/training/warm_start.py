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

from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.errors import MissingExtra
from worker.training.nibbles import unpack_rows

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


def warm_start_weights(
    model_dir: Path, vocabulary: dict[str, int], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Array]:
    """Every weight of the student in ``model_dir``, checked against the student about to train:
    the same vocabulary (piece -> id) and a weight of the same shape for every name in ``shapes``.

    Raises ValueError naming what differs, so a warm start never loads a table whose rows mean
    other pieces.
    """
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab()
    if theirs != vocabulary:
        raise ValueError(
            f"{model_dir} has another vocabulary ({len(theirs)} pieces against {len(vocabulary)}): "
            "warm starts need the same data and --min-count as that student"
        )
    weights = onnx_weights(model_dir / "model.onnx", set(shapes))
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ValueError(f"{model_dir / 'model.onnx'} holds no weights named {missing}")
    wrong = {k: (weights[k].shape, v) for k, v in shapes.items() if weights[k].shape != v}
    if wrong:
        raise ValueError(f"{model_dir} is another architecture: shapes (theirs, ours) {wrong}")
    return weights
