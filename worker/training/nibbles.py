"""4-bit embedding tables: half the bytes of INT8 where a student keeps most of them.

A student's embedding table is most of its file (the CNN's 31.5k x 256 INT8 table is 8.1 of its
8.7 MB). Here each row is cut into groups of ``group`` values; each group gets one float16 scale
(``max |w| / 7``) and its values become 4-bit codes in [-7, 7], two to a byte. The graph gathers
the looked-up rows' codes and scales and unpacks them with standard ONNX ops (Cast, Div, Mul,
Sub, Concat, Reshape), so only the rows in the batch are ever touched and any onnxruntime runs it.

`embedding_to_4bit` rewrites a model in place: the Gather that reads the table (a float
initializer, or the output of a DequantizeLinear of one, as static QDQ writes it) becomes the
4-bit gather, with the same output name, so whatever followed it is unchanged (except a
static-QDQ requantisation right after it, which is removed: see `_bypass_requantisation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from worker.errors import MissingExtra

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("teacher", "onnx") from exc

Array = npt.NDArray[np.float32]
LEVELS = 7  # codes -7..7 (symmetric; 8 is the zero offset in storage)


def pack_rows(
    table: Array, group: int, scales: npt.NDArray[np.float16] | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16]]:
    """``[V, D]`` floats -> (codes ``[V, D / 2]`` uint8, scales ``[V, D / group]`` float16).

    Given ``scales``, the table must already lie on that 4-bit grid (codes -8..7, as in the
    teacher's Q4_0 blocks): it is stored exactly, or a ValueError says it is not on the grid.
    """
    rows, dim = table.shape
    if dim % group or group % 2:
        raise ValueError(f"the group size {group} must be even and divide the width {dim}")
    grouped = table.reshape(rows, dim // group, group).astype(np.float32)
    exact = scales is not None  # the given grid, codes -8..7; else our own, -7..7
    if scales is None:
        scales = (np.abs(grouped).max(axis=2) / LEVELS).astype(np.float16)
    elif scales.shape != grouped.shape[:2]:
        raise ValueError(f"scales {scales.shape} do not match {grouped.shape[:2]} groups")
    safe = np.where(scales == 0, np.float16(1), scales).astype(np.float32)
    low = -LEVELS - 1 if exact else -LEVELS
    codes = np.clip(np.rint(grouped / safe[:, :, None]), low, LEVELS).astype(np.int16) + 8
    if exact and not np.array_equal((codes - 8) * safe[:, :, None], grouped):
        raise ValueError("the table is not on the given scales' 4-bit grid")
    flat = codes.reshape(rows, dim).astype(np.uint8)
    packed: npt.NDArray[np.uint8] = (flat[:, 0::2] | (flat[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales


def unpack_rows(codes: npt.NDArray[np.uint8], scales: npt.NDArray[np.float16], group: int) -> Array:
    """The float table `pack_rows` stands for (what the graph computes for each gathered row)."""
    rows = codes.shape[0]
    flat = np.empty((rows, codes.shape[1] * 2), np.float32)
    flat[:, 0::2] = (codes & 0x0F).astype(np.float32) - 8
    flat[:, 1::2] = (codes >> 4).astype(np.float32) - 8
    grouped = flat.reshape(rows, scales.shape[1], group) * scales.astype(np.float32)[:, :, None]
    result: Array = grouped.reshape(rows, -1)
    return result


def snap_rows(table: Array, group: int) -> tuple[Array, npt.NDArray[np.float16]]:
    """``table`` rounded onto its own 4-bit grid, and that grid's scales: what `pack_rows`
    stores for it, as floats, so a model can train around exactly the table it will ship."""
    codes, scales = pack_rows(table, group)
    return unpack_rows(codes, scales, group), scales


def gathered_table(model: onnx.ModelProto) -> str:
    """The name the token-embedding Gather reads (the first Gather of ``input_ids``)."""
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    return str(gather.input[0])


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None)


def _float_table(graph: onnx.GraphProto, name: str) -> tuple[Array, list[str]]:
    """The float values behind ``name`` and the initializers/nodes that only made them."""
    tensor = _initializer(graph, name)
    if tensor is not None:
        return numpy_helper.to_array(tensor).astype(np.float32), [name]
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        raise ValueError(f"{name} is neither an initializer nor a DequantizeLinear of one")
    parts = [_initializer(graph, i) for i in producer.input]
    arrays = [numpy_helper.to_array(p).astype(np.float32) if p is not None else None for p in parts]
    quantised, scale = arrays[0], arrays[1]
    if quantised is None or scale is None:
        raise ValueError(f"the DequantizeLinear making {name} does not read initializers")
    zero = arrays[2] if len(arrays) > 2 and arrays[2] is not None else 0.0
    if np.ndim(scale) > 0 and np.size(scale) > 1:
        axis = next((a.i for a in producer.attribute if a.name == "axis"), 1)
        shape = [1] * quantised.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return (quantised - zero) * scale, [producer.input[0], producer.output[0]]


def embedding_to_4bit(
    model: onnx.ModelProto,
    table: str,
    group: int = 32,
    scales: npt.NDArray[np.float16] | None = None,
    values: Array | None = None,
) -> dict[str, int]:
    """Replace the Gather reading ``table`` by a 4-bit gather (see the module); returns sizes.

    ``table`` names a float initializer or a DequantizeLinear output. Tensors that served only
    the old table are removed. ``scales`` stores a table that is already 4-bit exactly
    (`pack_rows`), in the groups they imply; ``values`` are its floats where the graph holds
    only an INT8 rounding of them (static QDQ of a table snapped by `snap_rows`).
    """
    graph = model.graph
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table]
    if len(gathers) != 1:
        raise ValueError(f"expected one Gather reading {table}, found {len(gathers)}")
    gather = gathers[0]
    in_graph, made_from = _float_table(graph, table)
    if values is None:
        values = in_graph
    elif values.shape != in_graph.shape:
        raise ValueError(f"values {values.shape} do not match the table {in_graph.shape}")
    if scales is not None:
        group = values.shape[1] // max(scales.shape[1], 1)
    codes, scales = pack_rows(values, group, scales)
    prefix = f"{table}.nibbles"
    ids, out = gather.input[1], gather.output[0]
    dim, groups = values.shape[1], values.shape[1] // group

    def const(name: str, array: npt.NDArray[np.generic]) -> str:
        graph.initializer.append(numpy_helper.from_array(array, f"{prefix}.{name}"))
        return f"{prefix}.{name}"

    codes_name, scales_name = const("codes", codes), const("scales", scales)
    sixteen, eight = const("16", np.array(16, np.int32)), const("8", np.array(8, np.float32))
    last = const("last", np.array([-1], np.int64))
    by_group = const("by_group", np.array([0, 0, groups, group], np.int64))
    flat = const("flat", np.array([0, 0, dim], np.int64))  # Reshape's 0: keep batch and sequence

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        output = f"{prefix}.{name}"
        graph.node.insert(
            position + len(new_nodes), helper.make_node(op, inputs, [output], name=output, **attrs)
        )
        new_nodes.append(output)
        return output

    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    new_nodes: list[str] = []
    packed = node("Gather", [codes_name, ids], "gathered")
    wide = node("Cast", [packed], "int32", to=TensorProto.INT32)
    high = node("Div", [wide, sixteen], "high")
    low = node("Sub", [wide, node("Mul", [high, sixteen], "high16")], "low")
    both = node(
        "Concat",
        [node("Unsqueeze", [low, last], "low1"), node("Unsqueeze", [high, last], "high1")],
        "both",
        axis=-1,
    )
    centred = node(
        "Sub",
        [node("Cast", [node("Reshape", [both, flat], "interleaved")], "float", to=TensorProto.FLOAT), eight],
        "centred",
    )
    scale = node(
        "Unsqueeze",
        [node("Cast", [node("Gather", [scales_name, ids], "scale16")], "scale", to=TensorProto.FLOAT), last],
        "scale1",
    )
    scaled = node("Mul", [node("Reshape", [centred, by_group], "grouped"), scale], "scaled")
    graph.node.insert(position + len(new_nodes), helper.make_node("Reshape", [scaled, flat], [out], name=out))
    _drop_unused(graph, made_from)
    bypassed = _bypass_requantisation(graph, out)
    return {
        "codes_bytes": int(codes.nbytes),
        "scales_bytes": int(scales.nbytes),
        "rows": int(values.shape[0]),
        "requantisation_removed": int(bypassed),
    }


def _bypass_requantisation(graph: onnx.GraphProto, out: str) -> bool:
    """Static QDQ follows the embedding Gather with a QuantizeLinear/DequantizeLinear pair on the
    old table's per-tensor scale; left in place it would round the 4-bit rows onto that INT8 grid
    again. When ``out`` feeds only such a pair, its readers read ``out`` instead."""
    readers = [n for n in graph.node if out in n.input]
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
        return False
    quantise = readers[0]
    dequantise = [n for n in graph.node if quantise.output[0] in n.input]
    if not dequantise or any(n.op_type != "DequantizeLinear" for n in dequantise):
        return False
    if any(o.name in {quantise.output[0], *(n.output[0] for n in dequantise)} for o in graph.output):
        return False
    leftovers = list(quantise.input[1:])
    for node in dequantise:
        for reader in graph.node:
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = out
        leftovers += list(node.input[1:])
        graph.node.remove(node)
    graph.node.remove(quantise)
    _drop_unused(graph, [name for name in leftovers if name])
    return True


def _drop_unused(graph: onnx.GraphProto, names: list[str]) -> None:
    """Remove the nodes and initializers among ``names`` that nothing reads any more."""
    for name in reversed(names):
        if any(name in n.input for n in graph.node) or any(o.name == name for o in graph.output):
            continue
        for n in [n for n in graph.node if name in n.output]:
            graph.node.remove(n)
            _drop_unused(graph, [i for i in n.input if i])
        for t in [t for t in graph.initializer if t.name == name]:
            graph.initializer.remove(t)
