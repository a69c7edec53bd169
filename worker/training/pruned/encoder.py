"""Pruned-transformer students: the teacher's own encoder cut to a few layers and a pruned vocabulary.

Two published recipes compress the teacher instead of replacing it:
- **L2_ends**: keep layers [0, 11], prune the vocabulary, INT8; no further training (here the
  classification head is refit on the cut encoder, `PrunedMode.REFIT`).
- **me5s**: keep 4 layers, prune the vocabulary to the corpus with a byte-fallback unigram
  tokenizer, then distil (`PrunedMode.DISTIL`, see `worker.training.pruned.distil`).

This module is numpy + onnx only: it cuts the dequantised e5 weights (`cut_encoder`), builds
the student tokenizer (`build_pruned_tokenizer`), writes the ONNX graph with the teacher's own
graph builder (`build_graph`) and quantises it without the known INT8 collapse
(`quantise_guarded`).

Student id layout: the `worker.training.vocab` layout (0 ``<pad>``, 1 ``<unk>``, 2..257 bytes,
then the kept teacher pieces) followed by ``<s>`` and ``</s>``, which the tokenizer adds around
every text, as the teacher's does. The teacher's ``query:`` prefix is baked into the tokenizer's
normaliser, so the model directory needs nothing from the caller that the worker does not do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, normalizers, processors

from worker.errors import MissingExtra
from worker.teacher.e5format import E5Config, E5File, E5Vocab
from worker.teacher.onnx_graph import OPSET, HeadWeights, _encoder_nodes, _Graph, _head_nodes
from worker.training.nibbles import embedding_to_4bit
from worker.training.vocab import PrunedVocab, prune

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("teacher", "onnx") from exc

Array = npt.NDArray[np.float32]

BOS, EOS = "<s>", "</s>"
# Layer sets of the comparison, by count: the paper's T_l keeps the first layers; L2_ends keeps
# both ends; me5s keeps 4. Spreading the rest over the stack keeps the last layer in every set of
# two or more, which the L2_ends card found to matter.
LAYER_SETS: dict[int, tuple[int, ...]] = {
    1: (0,),
    2: (0, 11),
    3: (0, 5, 11),
    4: (0, 1, 2, 3),
    6: (0, 2, 4, 6, 8, 11),
}
_LAYER_TENSORS = ("q", "k", "v", "ao", "fi", "fo")


class PrunedMode(StrEnum):
    REFIT = "refit"  # cut encoder frozen, head refit (L2_ends)
    DISTIL = "distil"  # cut encoder and head distilled to the teacher's logits (me5s)


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """``"0,11"`` -> (0, 11); ``"first4"`` -> (0, 1, 2, 3). Indices must be distinct and in range."""
    spec = spec.strip()
    if spec.startswith("first"):
        count = int(spec.removeprefix("first"))
        layers = tuple(range(count))
    else:
        layers = tuple(int(part) for part in spec.split(",") if part.strip())
    if not layers:
        raise ValueError(f"layer list {spec!r} is empty")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range for a {n_layers}-layer teacher")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise ValueError(f"layers {list(layers)} must be distinct and increasing")
    return layers


def build_pruned_tokenizer(
    teacher_tokenizer: Tokenizer,
    counts: Counter[int],
    min_count: int,
    teacher_vocab: E5Vocab,
    prefix: str,
) -> tuple[Tokenizer, PrunedVocab]:
    """The byte-fallback student tokenizer with the teacher's specials and prefix.

    ``counts`` should come from the prefixed texts, so the prefix's own pieces are kept.
    """
    tokenizer, vocab = prune(teacher_tokenizer, counts, min_count)
    tokenizer.add_special_tokens([BOS, EOS])
    bos_id, eos_id = len(vocab), len(vocab) + 1
    if tokenizer.token_to_id(BOS) != bos_id or tokenizer.token_to_id(EOS) != eos_id:
        raise RuntimeError("tokenizers placed the added specials at unexpected ids")
    if prefix:
        # Prepend first, so the prefix goes through the same normalisation as in the teacher.
        teacher_norm = teacher_tokenizer.normalizer
        steps = [normalizers.Prepend(prefix)] + ([teacher_norm] if teacher_norm is not None else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    teacher_ids = np.concatenate([vocab.teacher_ids, [teacher_vocab.bos, teacher_vocab.eos]]).astype(np.int64)
    return tokenizer, PrunedVocab(pieces=(*vocab.pieces, BOS, EOS), teacher_ids=teacher_ids)


@dataclass(frozen=True)
class PrunedEncoder:
    """The teacher encoder's float weights cut to ``layers``, with a pruned embedding table.

    Tensors keep e5's names, with the kept layers renumbered ``l0..l{k-1}``; ``emb.word`` has
    one row per student id. It offers the part of `E5File`'s interface the teacher's ONNX
    builder reads (``config``, ``vocab.pieces``, ``tensor``), so one builder serves both.
    """

    layers: tuple[int, ...]  # teacher indices of the kept layers
    config: E5Config
    vocab: E5Vocab
    tensors: dict[str, Array]
    # The teacher's Q4_0 scales of ``emb.word``'s rows: the table is frozen in training, so it
    # can be stored at 4 bits exactly as the teacher stores it (`quantise_guarded`).
    word_scales: npt.NDArray[np.float16] | None = None

    def tensor(self, name: str, rows: npt.NDArray[np.int64] | None = None) -> Array:
        array = self.tensors[name]
        return array if rows is None else array[rows]

    @property
    def n_parameters(self) -> int:
        return int(sum(a.size for a in self.tensors.values()))


def teacher_rows(teacher_ids: npt.NDArray[np.int64], unk: int) -> npt.NDArray[np.int64]:
    """The teacher embedding row of each student id.

    Byte pieces and ``<unk>`` take the teacher's ``<unk>`` row: the teacher itself sees
    ``<unk>`` where its vocabulary has no piece, so a frozen encoder meets familiar input.
    """
    return np.where(teacher_ids >= 0, teacher_ids, unk).astype(np.int64)


def published_word_scales(e5: E5File, tokenizer: Tokenizer) -> npt.NDArray[np.float16]:
    """`PrunedEncoder.word_scales` of a published pruned student, from its tokenizer: each
    student piece's teacher row by name (byte pieces and ``<unk>`` take ``<unk>``'s, as in
    `cut_encoder`). Re-quantising its ``fp32.onnx`` with them stores the table exactly again."""
    index = {piece: i for i, piece in enumerate(e5.vocab.pieces)}
    vocabulary = tokenizer.get_vocab()
    teacher_ids = np.full(len(vocabulary), -1, np.int64)
    for piece, student_id in vocabulary.items():
        teacher_ids[student_id] = index.get(piece, -1)
    return e5.block_scales("emb.word", teacher_rows(teacher_ids, e5.vocab.unk))


def cut_encoder(e5: E5File, layers: Sequence[int], vocab: PrunedVocab) -> PrunedEncoder:
    """Dequantise the embeddings for the student's vocabulary and the chosen layers only."""
    layers = tuple(layers)
    rows = teacher_rows(vocab.teacher_ids, e5.vocab.unk)
    word = e5.tensor("emb.word", rows=rows)
    word[0] = 0.0  # <pad>: masked everywhere; zero keeps the table honest
    tensors: dict[str, Array] = {
        "emb.word": word,
        "emb.pos": e5.tensor("emb.pos"),
        "emb.type": e5.tensor("emb.type"),
        "emb.ln.w": e5.tensor("emb.ln.w"),
        "emb.ln.b": e5.tensor("emb.ln.b"),
    }
    for new, old in enumerate(layers):
        for part in _LAYER_TENSORS:
            for kind in ("w", "b"):
                tensors[f"l{new}.{part}.{kind}"] = e5.tensor(f"l{old}.{part}.{kind}")
        for norm in ("aln", "oln"):
            for kind in ("w", "b"):
                tensors[f"l{new}.{norm}.{kind}"] = e5.tensor(f"l{old}.{norm}.{kind}")
    config = replace(e5.config, layers=len(layers), embedding_rows=len(vocab))
    pieces = vocab.pieces
    student_vocab = E5Vocab(
        pieces=pieces,
        scores=np.zeros(len(pieces), np.float32),
        bos=len(pieces) - 2,
        eos=len(pieces) - 1,
        pad=0,
        unk=1,
        normalisation={},
    )
    return PrunedEncoder(
        layers=layers,
        config=config,
        vocab=student_vocab,
        tensors=tensors,
        word_scales=e5.block_scales("emb.word", rows),
    )


def build_graph(encoder: PrunedEncoder, head: HeadWeights | None) -> onnx.ModelProto:
    """``input_ids, attention_mask -> logits, embedding`` (``embedding`` only without a head).

    Weights are inline: even six layers with a 20k vocabulary stay far below protobuf's 2 GB.
    Every node is named, so quantisation can exclude nodes by name.
    """
    g = _Graph()

    def add(name: str, array: Array) -> str:
        g.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    # The builder reads only config, vocab.pieces and tensor(); PrunedEncoder provides them.
    embedding = _encoder_nodes(g, cast(E5File, encoder), add)
    outputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", encoder.config.hidden])
    ]
    g.nodes.append(helper.make_node("Identity", [embedding], ["embedding"]))
    if head is not None:
        logits = _head_nodes(g, embedding, head)
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        outputs.insert(
            0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", head.n_labels])
        )
    for node in g.nodes:
        node.name = node.output[0]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    graph = helper.make_graph(g.nodes, "pruned_e5", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="intent-worker"
    )
    model.ir_version = 8
    return model


# Encoder weights that dynamic INT8 quantises. Not the FFN output projection (``fo``): its input
# is the GELU output, whose outliers wreck per-tensor activation scales. Measured on the 1-layer
# refit student, 1,358 validation texts, label agreement with FP32: every weight MatMul 92.7%
# (97.1% per-channel), all but ``fo`` per-channel 99.4%, embeddings alone 99.7%.
QUANTISED_WEIGHTS = (".q.wT", ".k.wT", ".v.wT", ".ao.wT", ".fi.wT")


def encoder_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes that dynamic INT8 may touch (`QUANTISED_WEIGHTS`).

    Everything else stays float: activation-by-activation MatMuls (attention), LayerNorm,
    Gelu (Erf), Softmax, the FFN output projection, the head and the embedding Gather.
    """
    names = []
    for node in model.graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.op_type == "MatMul" and weight.startswith("l") and weight.endswith(QUANTISED_WEIGHTS):
            names.append(node.name)
    return names


def quantise_naive(fp32: Path, int8: Path) -> Path:
    """onnxruntime's default dynamic INT8 on every op type it supports: the known-risky baseline."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return int8


def quantise_guarded(
    fp32: Path,
    int8: Path,
    quantise_embedding: bool = True,
    weight_only: Sequence[str] = (),
    word_scales: npt.NDArray[np.float16] | None = None,
) -> Path:
    """Per-channel dynamic INT8 on `encoder_weight_matmuls`, weight-only INT8 on the MatMul
    weights named by the ``weight_only`` suffixes (e.g. `WEIGHT_ONLY`), plus a compact
    embedding table.

    The embedding table is most of a pruned model's bytes. With ``word_scales`` (the teacher's
    Q4_0 scales of its rows, `PrunedEncoder.word_scales`) it is stored at 4 bits on exactly the
    teacher's grid (`worker.training.nibbles`): the rows are the teacher's own and training
    leaves them frozen, so this loses nothing. Otherwise it is INT8 with one float scale per row
    (symmetric, ``max|row| / 127``). Either is unpacked after the Gather, so only the looked-up
    rows are touched and no activation is ever quantised for it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    nodes = encoder_weight_matmuls(model)
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    quantize_dynamic(
        str(fp32),
        str(int8),
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=excluded,
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    quantised = onnx.load(str(int8))
    if quantise_embedding and word_scales is not None:
        embedding_to_4bit(quantised, "emb.word", scales=word_scales)
    elif quantise_embedding:
        _quantise_embedding_rows(quantised, "emb.word")
    _weight_only_int8(quantised, weight_only)
    onnx.save(quantised, str(int8))
    return int8


# Weights that may be stored INT8 but multiplied in float: the FFN output projection, whose
# GELU input wrecks activation scales (see QUANTISED_WEIGHTS). Per output column scales,
# dequantised by a DequantizeLinear on the initializer, so no activation is quantised for it.
# It saves 1.8 MB a layer but costs parity: on the CPU-distilled 2-layer student, 99.40% label
# agreement with FP32 against 99.56% with it float, so the trainer tries it first and falls
# back (`worker.training.pruned.run`).
WEIGHT_ONLY = (".fo.wT",)
# The head's first weight (384 x 1024 float, 1.6 MB): weight-only INT8 cost 0.01 points of parity on
# the 2-layer student (99.53% -> 99.52%), so every try but the last stores it INT8.
HEAD_WEIGHT_ONLY = ("head0.w",)


def weight_only_tries(n_layers: int) -> list[tuple[str, ...]]:
    """What the trainer stores weight-only INT8, smallest first, until parity holds: the FFN
    output weights of every layer, then of all but the last (whose output is pooled straight
    into the embedding), then none of them (each with the head's first weight), then nothing."""
    first_layers = tuple(f"l{i}{WEIGHT_ONLY[0]}" for i in range(n_layers - 1))
    tries: list[tuple[str, ...]] = [WEIGHT_ONLY + HEAD_WEIGHT_ONLY]
    if first_layers:
        tries.append(first_layers + HEAD_WEIGHT_ONLY)
    return [*tries, HEAD_WEIGHT_ONLY, ()]


def _weight_only_int8(model: onnx.ModelProto, suffixes: Sequence[str]) -> None:
    graph = model.graph
    for node in list(graph.node):
        if node.op_type != "MatMul" or not node.input[1].endswith(tuple(suffixes)):
            continue
        name = node.input[1]
        index = next((i for i, t in enumerate(graph.initializer) if t.name == name), None)
        if index is None:
            continue
        weight = numpy_helper.to_array(graph.initializer[index]).astype(np.float32)  # [in, out]
        scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
        codes = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        del graph.initializer[index]
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{name}.int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}.zero"),
            ]
        )
        position = list(graph.node).index(node)
        graph.node.insert(
            position,
            helper.make_node(
                "DequantizeLinear",
                [f"{name}.int8", f"{name}.scale", f"{name}.zero"],
                [name],
                name=f"{name}.dequantised",
                axis=1,
            ),
        )


def _quantise_embedding_rows(model: onnx.ModelProto, name: str) -> None:
    graph = model.graph
    index = next(i for i, t in enumerate(graph.initializer) if t.name == name)
    table = numpy_helper.to_array(graph.initializer[index]).astype(np.float32)
    scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0
    codes = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    del graph.initializer[index]
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes, f"{name}.int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale"),
        ]
    )
    position = next(i for i, n in enumerate(graph.node) if n.op_type == "Gather" and n.input[0] == name)
    gather = graph.node[position]
    ids, out = gather.input[1], gather.output[0]
    replacement = [
        helper.make_node("Gather", [f"{name}.int8", ids], [f"{out}.codes"], name=f"{out}.codes"),
        helper.make_node(
            "Cast", [f"{out}.codes"], [f"{out}.float"], name=f"{out}.float", to=TensorProto.FLOAT
        ),
        helper.make_node("Gather", [f"{name}.scale", ids], [f"{out}.scale"], name=f"{out}.scale"),
        helper.make_node("Mul", [f"{out}.float", f"{out}.scale"], [out], name=out),
    ]
    del graph.node[position]
    for offset, node in enumerate(replacement):
        graph.node.insert(position + offset, node)


def vocabulary_report(vocab: PrunedVocab, e5_config: E5Config, n_teacher_pieces: int) -> dict[str, object]:
    """How much the pruned vocabulary keeps and saves (embedding bytes, float32 and INT8)."""
    kept = int((vocab.teacher_ids[: len(vocab) - 2] >= 0).sum())
    hidden = e5_config.hidden
    return {
        "student_ids": len(vocab),
        "kept_teacher_pieces": kept,
        "teacher_pieces": n_teacher_pieces,
        "teacher_embedding_rows": e5_config.embedding_rows,
        "byte_pieces": 256,
        "embedding_mb_fp32": round(len(vocab) * hidden * 4 / 1e6, 2),
        "teacher_embedding_mb_fp32": round(e5_config.embedding_rows * hidden * 4 / 1e6, 2),
        "saved_mb_fp32": round((e5_config.embedding_rows - len(vocab)) * hidden * 4 / 1e6, 2),
    }


def run_graph(
    model: onnx.ModelProto | Path,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    output: str,
    threads: int = 1,
    max_length: int = 128,
    batch_size: int = 128,
) -> Array:
    """One output of a pruned graph for ``texts``, batched in order of length, in input order."""
    import onnxruntime as ort

    from worker.models.onnx import pad_batch, session_options

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    encodings = tokenizer.encode_batch(list(texts))
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
    parts = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_batch([encodings[i].ids for i in chunk], 0, max_length)
        (values,) = session.run([output], {"input_ids": ids, "attention_mask": mask})
        parts.append(np.asarray(values, np.float32))
    if not parts:
        return np.zeros((0, 0), np.float32)
    merged = np.concatenate(parts)
    result: Array = np.empty_like(merged)
    result[np.asarray(order, dtype=np.int64)] = merged
    return result
