"""Export a trained student to ONNX and quantise it to INT8 (static QDQ, calibrated).

Dynamic quantisation slows convolutions down on these CPUs (ConvInteger), so students are
quantised statically: activation ranges come from running calibration texts through the
float model, and weights are per-channel INT8. The INT8 model is then checked against the
float one; `verify_parity` reports the label agreement that gates shipping it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from worker.models.onnx import pad_batch, session_options
from worker.training import require_torch

torch = require_torch()

OPSET = 17


def export_onnx(model: Any, path: Path) -> Path:
    """Write ``model`` with dynamic batch and sequence axes."""
    model.eval()
    ids = torch.ones((2, 7), dtype=torch.int64)
    mask = torch.ones((2, 7), dtype=torch.int64)
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose: the torch.export one needs
        # onnxscript and does not improve these small static graphs. Torch warns about it.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Constant folding of a strided Slice that the exporter cannot fold; harmless.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def _feeds(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids = np.array([enc.ids[:max_length] or [0]], dtype=np.int64)
        feeds.append(
            {"input_ids": ids, "attention_mask": (np.ones_like(ids) if enc.ids else np.zeros_like(ids))}
        )
    return feeds


def quantise_static(
    fp32: Path, int8: Path, tokenizer: Tokenizer, calibration: Sequence[str], max_length: int
) -> Path:
    """Static QDQ INT8: per-channel INT8 weights, UINT8 activations from calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._feeds = iter(_feeds(tokenizer, calibration, max_length))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    prepared = fp32.with_name(fp32.stem + ".prep.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Gather"],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    prepared.unlink()
    return int8


def run_logits(
    path: Path, tokenizer: Tokenizer, texts: Sequence[str], max_length: int, threads: int = 2
) -> np.ndarray:
    """Logits of an exported student for ``texts`` (batched by 256, padded per batch)."""
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(texts), 256):
        chunk = list(texts[start : start + 256])
        ids, mask = pad_batch([e.ids for e in tokenizer.encode_batch(chunk)], 0, max_length)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        out.append(np.asarray(logits, np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def verify_parity(
    fp32: Path, int8: Path, tokenizer: Tokenizer, texts: Sequence[str], max_length: int, threads: int = 2
) -> dict[str, float]:
    """Label agreement and logit error of the INT8 model against the float one."""
    a = run_logits(fp32, tokenizer, texts, max_length, threads)
    b = run_logits(int8, tokenizer, texts, max_length, threads)
    return {
        "n": len(texts),
        "label_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "mean_abs_logit_error": float(np.abs(a - b).mean()),
    }
