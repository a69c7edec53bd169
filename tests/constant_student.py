"""A model directory whose graph answers the same logits for every text: a student whose answers
a test can tell apart from the shipped one's (the second student of a cascade, say)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from worker.config import MODELS_DIR

CONSTANT = [0.0, 10.0, 0.0]  # always the second label, very sure


def constant_student(directory: Path, values: list[float]) -> Path:
    """A model directory whose graph answers ``values`` for every text (the shipped tokenizer)."""
    directory.mkdir()
    for name in ("tokenizer.json", "labels.json"):
        shutil.copy(MODELS_DIR / "student" / name, directory / name)
    zero = helper.make_node("ReduceSum", ["ids_f", "axis"], ["rowsum"], keepdims=1)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
            zero,
            helper.make_node("Mul", ["rowsum", "nothing"], ["zeros"]),
            helper.make_node("Add", ["zeros", "values"], ["logits"]),
        ],
        "constant",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(values)])],
        [
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("nothing", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("values", TensorProto.FLOAT, [1, len(values)], values),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    card = json.loads((MODELS_DIR / "student" / "card.json").read_text())
    (directory / "card.json").write_text(json.dumps({**card, "version": "constant-1"}))
    return directory
