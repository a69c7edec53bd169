"""4-bit embedding tables: the packing round-trips within half a step, and the rewritten graph
gathers exactly the rows the packing stands for."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.training.nibbles import LEVELS, embedding_to_4bit, pack_rows, unpack_rows


def _table(rows: int = 50, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    table[3] = 0.0  # an all-zero row (pad) stays zero
    return table


@pytest.mark.parametrize("group", [32, 16, 8])
def test_packing_round_trips_within_half_a_step_of_each_group(group: int) -> None:
    table = _table()
    codes, scales = pack_rows(table, group)
    assert codes.shape == (50, 16) and codes.dtype == np.uint8
    assert scales.shape == (50, 32 // group)
    restored = unpack_rows(codes, scales, group)
    step = np.repeat(scales.astype(np.float32), group, axis=1)
    assert np.all(np.abs(restored - table) <= step / 2 + 1e-3 * np.abs(table) + 1e-6)
    assert not restored[3].any()
    assert np.abs(restored).max() <= np.abs(table).max() * (1 + 1e-3)
    assert LEVELS == 7


def test_a_group_that_does_not_divide_the_width_is_refused() -> None:
    with pytest.raises(ValueError, match="group size"):
        pack_rows(_table(dim=30), 16)


def _gather_model(table: np.ndarray, quantised: bool) -> tuple[object, str]:
    nodes, inits = [], []
    if quantised:  # as static QDQ writes it: DequantizeLinear of a UINT8 table, then Gather
        scale = np.float32(np.abs(table).max() / 127)
        codes = (np.rint(table / scale) + 128).astype(np.uint8)
        inits += [
            numpy_helper.from_array(codes, "w_q"),
            numpy_helper.from_array(np.array(scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "w_zero"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="dq"))
    else:
        inits.append(numpy_helper.from_array(table, "w"))
    nodes.append(helper.make_node("Gather", ["w", "ids"], ["emb"], name="gather"))
    if quantised:  # and requantises the gathered rows on the table's grid
        nodes.append(helper.make_node("QuantizeLinear", ["emb", "w_scale", "w_zero"], ["emb_q"], name="q"))
        nodes.append(
            helper.make_node("DequantizeLinear", ["emb_q", "w_scale", "w_zero"], ["emb_dq"], name="dq2")
        )
        nodes.append(helper.make_node("Identity", ["emb_dq"], ["out"], name="out"))
    else:
        nodes.append(helper.make_node("Identity", ["emb"], ["out"], name="out"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", table.shape[1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "w"


@pytest.mark.parametrize("quantised", [False, True])
def test_the_rewritten_gather_returns_the_packed_rows(quantised: bool) -> None:
    table = _table()
    model, name = _gather_model(table, quantised)
    sizes = embedding_to_4bit(model, name, group=16)  # type: ignore[arg-type]
    assert sizes["rows"] == 50
    assert sizes["requantisation_removed"] == int(quantised)
    left = {t.name for t in model.graph.initializer}  # type: ignore[attr-defined]
    assert not left & {"w", "w_q", "w_scale", "w_zero"}  # the old table and its grid are gone
    ops = {n.op_type for n in model.graph.node}  # type: ignore[attr-defined]
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    ids = np.array([[0, 3, 49], [7, 7, 1]], np.int64)
    (got,) = session.run(["out"], {"ids": ids})
    codes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name.endswith(".codes")))  # type: ignore[attr-defined]
    scales = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name.endswith(".scales")))  # type: ignore[attr-defined]
    expected = unpack_rows(codes, scales, 16)[ids]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.abs(got - table[ids]).max() < 0.2
