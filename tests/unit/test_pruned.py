"""Pruned-transformer students: layer selection, vocabulary mapping, INT8 parity, model directory."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dataset_fixture import write_dataset
from e5_fixture import TinyE5, reference_embedding, write_tiny_e5
from tokenizers import Tokenizer

from worker.data.corpora import LabelledSet
from worker.models.student import Student
from worker.teacher import E5_PREFIX
from worker.teacher.e5format import E5File, default_weights_path
from worker.teacher.head import HeadConfig
from worker.teacher.onnx_graph import HeadWeights
from worker.teacher.tokenizer import build_tokenizer
from worker.training.distil import TrainConfig, encode
from worker.training.export import verify_parity
from worker.training.nibbles import embedding_to_4bit, pack_rows, unpack_rows
from worker.training.pruned.distil import PrunedTransformer
from worker.training.pruned.encoder import (
    WEIGHT_ONLY,
    build_graph,
    build_pruned_tokenizer,
    cut_encoder,
    parse_layers,
    quantise_guarded,
    run_graph,
    weight_only_tries,
)
from worker.training.pruned.run import HeadRecipe, PrunedInputs, train_pruned_model_dir
from worker.training.run import TrainRequest
from worker.training.vocab import FIRST_PIECE_ID, count_pieces

LABELS = ("Action", "Other", "Recall")
CORPUS = [
    "set an alarm for seven",
    "wake me up at six tomorrow",
    "what did i order last week",
    "remind me what we talked about",
    "play some jazz please",
    "turn off the kitchen lights",
    "wie wird das wetter morgen",
    "réserve une table pour deux",
    "tell me a joke",
    "did i get any emails today",
    "明日の天気を教えて",
    "알람 맞춰 줘",
]
# Scripts the corpus above does not cover: Georgian and Amharic.
UNSEEN_SCRIPTS = ["ხვალ დილის შვიდზე მაღვიძარა დამიყენე", "ነገ ጠዋት በሰባት ሰዓት አስነሳኝ"]


@functools.cache
def _e5() -> E5File:
    return E5File(default_weights_path())


@functools.cache
def _teacher_tokenizer() -> Tokenizer:
    tokenizer = build_tokenizer(_e5().vocab, max_length=512)
    tokenizer.no_padding()
    return tokenizer


@functools.cache
def _pruned() -> tuple[Tokenizer, object]:
    counts = count_pieces(_teacher_tokenizer(), [E5_PREFIX + t for t in CORPUS])
    return build_pruned_tokenizer(_teacher_tokenizer(), counts, 1, _e5().vocab, E5_PREFIX)


# --- layer selection --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0,11", (0, 11)), ("0, 5, 11", (0, 5, 11)), ("first4", (0, 1, 2, 3)), ("7", (7,))],
)
def test_layer_specs_parse(spec: str, expected: tuple[int, ...]) -> None:
    assert parse_layers(spec, 12) == expected


@pytest.mark.parametrize("spec", ["", "12", "-1", "5,3", "2,2", "first13"])
def test_bad_layer_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_layers(spec, 12)


@pytest.fixture
def tiny_e5(tmp_path: Path) -> tuple[E5File, TinyE5]:
    path = tmp_path / "tiny.bin"
    model = write_tiny_e5(path)
    return E5File(path), model


def _identity_vocab(e5: E5File) -> object:
    from worker.training.vocab import PrunedVocab

    ids = np.arange(len(e5.vocab.pieces), dtype=np.int64)
    return PrunedVocab(pieces=e5.vocab.pieces, teacher_ids=ids)


@pytest.mark.parametrize("layers", [(0, 1), (1,), (0,)])
def test_cut_encoder_runs_exactly_the_kept_layers(
    tiny_e5: tuple[E5File, TinyE5], layers: tuple[int, ...]
) -> None:
    e5, model = tiny_e5
    encoder = cut_encoder(e5, layers, _identity_vocab(e5))  # type: ignore[arg-type]
    assert encoder.config.layers == len(layers)
    # The numpy reference encoder, run on a copy of the model holding only the kept layers.
    kept = TinyE5(layers=len(layers), pieces=model.pieces, scores=model.scores, tensors=dict(model.tensors))
    for new, old in enumerate(layers):
        for name, value in model.tensors.items():
            if name.startswith(f"l{old}."):
                kept.tensors[f"l{new}." + name.split(".", 1)[1]] = value
    graph = build_graph(encoder, None)
    import onnxruntime as ort

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = [4, 11, 12, 13, 2]  # not 0: the student layout keeps row 0 for <pad>, zeroed
    (got,) = session.run(
        ["embedding"],
        {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)},
    )
    want = reference_embedding(kept, ids)
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    if layers != (0, 1):  # a strict subset differs from the whole encoder
        assert not np.allclose(got[0], reference_embedding(model, ids), atol=1e-3)


# --- vocabulary mapping and byte fallback -----------------------------------


def test_pruned_ids_map_to_the_right_teacher_embedding_rows() -> None:
    tokenizer, vocab = _pruned()
    teacher = _teacher_tokenizer()
    ids = vocab.teacher_ids  # type: ignore[attr-defined]
    for student_id in range(FIRST_PIECE_ID, len(ids) - 2):
        assert teacher.token_to_id(tokenizer.id_to_token(student_id)) == ids[student_id]
    assert ids[tokenizer.token_to_id("<s>")] == _e5().vocab.bos
    assert ids[tokenizer.token_to_id("</s>")] == _e5().vocab.eos
    encoder = cut_encoder(_e5(), (0,), vocab)  # type: ignore[arg-type]
    word = encoder.tensor("emb.word")
    alarm = tokenizer.token_to_id("▁alarm")
    teacher_row = _e5().tensor("emb.word", rows=np.array([teacher.token_to_id("▁alarm")]))[0]
    np.testing.assert_array_equal(word[alarm], teacher_row)
    assert not word[0].any()  # <pad>


def test_student_tokens_are_the_teacher_tokens_with_the_prefix() -> None:
    tokenizer, vocab = _pruned()
    ids = vocab.teacher_ids  # type: ignore[attr-defined]
    for text in CORPUS:
        student = [int(ids[i]) for i in tokenizer.encode(text).ids]
        assert student == _teacher_tokenizer().encode(E5_PREFIX + text).ids


def test_byte_fallback_leaves_no_unknown_token_on_unseen_scripts() -> None:
    tokenizer, _ = _pruned()
    unk = tokenizer.token_to_id("<unk>")
    for text in UNSEEN_SCRIPTS:
        encoding = tokenizer.encode(text)
        assert unk not in encoding.ids
        assert any(token.startswith("<0x") for token in encoding.tokens)  # the script is not kept
        # No piece of these scripts is kept: their characters are all bytes, which spell the text.
        raw = b"".join(bytes([int(t[3:5], 16)]) for t in encoding.tokens if t.startswith("<0x"))
        assert raw.decode("utf-8") == text.replace(" ", "")


# --- torch twin, INT8 parity, model directory --------------------------------


def _random_head(hidden: int, seed: int = 0) -> HeadWeights:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((hidden, 3)) * 3).astype(np.float32)
    return HeadWeights(layers=((w, np.zeros(3, np.float32)),), groups=None, n_labels=3)


def test_torch_twin_matches_the_onnx_graph() -> None:
    tokenizer, vocab = _pruned()
    encoder = cut_encoder(_e5(), (0, 11), vocab)  # type: ignore[arg-type]
    head = _random_head(encoder.config.hidden)
    onnx_logits = run_graph(build_graph(encoder, head), tokenizer, CORPUS, "logits")
    model = PrunedTransformer(encoder, head).eval()
    ids, mask = encode(tokenizer, CORPUS, 64)
    with torch.no_grad():
        torch_logits, _ = model(ids, mask)
    np.testing.assert_allclose(torch_logits.numpy(), onnx_logits, atol=1e-4)


def test_guarded_int8_keeps_parity_and_leaves_norms_float(tmp_path: Path) -> None:
    tokenizer, vocab = _pruned()
    encoder = cut_encoder(_e5(), (0, 11), vocab)  # type: ignore[arg-type]
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(build_graph(encoder, _random_head(encoder.config.hidden)), str(fp32))
    int8 = quantise_guarded(fp32, tmp_path / "int8.onnx", weight_only=WEIGHT_ONLY)
    texts = CORPUS + UNSEEN_SCRIPTS
    parity = verify_parity(fp32, int8, tokenizer, texts, 64, threads=1)
    assert parity["label_agreement"] == 1.0
    ops = [node.op_type for node in onnx.load(str(int8)).graph.node]
    quantised = sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops)
    assert quantised == 5 * 2  # q, k, v, ao, fi per layer and nothing else
    assert ops.count("LayerNormalization") == 1 + 2 * 2 and "Erf" in ops and "Softmax" in ops
    # The FFN output projections are stored INT8 and multiplied in float.
    assert ops.count("DequantizeLinear") == 2
    assert int8.stat().st_size < 0.45 * fp32.stat().st_size
    # The trainer's tries, smallest first: every FFN output and the head's first weight, the
    # first layer's FFN output and the head, the head, nothing.
    tries = weight_only_tries(2)
    assert tries == [(".fo.wT", "head0.w"), ("l0.fo.wT", "head0.w"), ("head0.w",), ()]
    assert weight_only_tries(1) == [(".fo.wT", "head0.w"), ("head0.w",), ()]
    sizes = []
    for i, weight_only in enumerate(tries):
        model = quantise_guarded(fp32, tmp_path / f"try{i}.onnx", weight_only=weight_only)
        assert [n.op_type for n in onnx.load(str(model)).graph.node].count("DequantizeLinear") == 3 - i
        sizes.append(model.stat().st_size)
    assert sizes == sorted(sizes)


def test_teacher_rows_are_stored_at_4_bits_exactly(tmp_path: Path) -> None:
    tokenizer, vocab = _pruned()
    encoder = cut_encoder(_e5(), (0,), vocab)  # type: ignore[arg-type]
    assert encoder.word_scales is not None
    graph = build_graph(encoder, None)
    table = encoder.tensors["emb.word"]
    codes, scales = pack_rows(table, 32, encoder.word_scales)
    np.testing.assert_array_equal(unpack_rows(codes, scales, 32), table)
    texts = CORPUS + UNSEEN_SCRIPTS
    fp32 = run_graph(graph, tokenizer, texts, "embedding")
    embedding_to_4bit(graph, "emb.word", 32, encoder.word_scales)
    np.testing.assert_allclose(run_graph(graph, tokenizer, texts, "embedding"), fp32, atol=1e-6)
    # A table that training moved off the teacher's grid is refused, not silently rounded.
    with pytest.raises(ValueError, match="grid"):
        pack_rows(table + np.float32(1e-3), 32, encoder.word_scales)


def test_guarded_int8_with_teacher_scales_halves_the_table(tmp_path: Path) -> None:
    tokenizer, vocab = _pruned()
    encoder = cut_encoder(_e5(), (0,), vocab)  # type: ignore[arg-type]
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(build_graph(encoder, _random_head(encoder.config.hidden)), str(fp32))
    per_row = quantise_guarded(fp32, tmp_path / "int8.onnx")
    nibbles = quantise_guarded(fp32, tmp_path / "int4.onnx", word_scales=encoder.word_scales)
    texts = CORPUS + UNSEEN_SCRIPTS
    exact = run_graph(fp32, tokenizer, texts, "logits")

    def error(model: Path) -> float:
        return float(np.abs(run_graph(model, tokenizer, texts, "logits") - exact).max())

    # The 4-bit table is exact, so only the INT8 MatMuls are left to differ from FP32.
    assert error(nibbles) < error(per_row)
    rows, width = encoder.tensors["emb.word"].shape
    saved = per_row.stat().st_size - nibbles.stat().st_size
    # INT8 codes + a float32 scale per row, against 4-bit codes + a float16 scale per 32 values.
    # Give or take the unpacking nodes (under 4 kB).
    assert saved == pytest.approx(rows * (width + 4) - rows * (width // 2 + 2 * width // 32), abs=4096)


def _dataset(path: Path) -> Path:
    texts = CORPUS * 4
    logits = np.random.default_rng(0).standard_normal((len(texts), 3)).astype(np.float32) * 2
    return write_dataset(path, texts, logits, LABELS)


def _head_data() -> LabelledSet:
    intents = ["alarm_set", "alarm_set", "past_orders", "past_chat", "play_music", "iot_off"] * 2
    label_of = {
        "alarm_set": "Action",
        "past_orders": "Recall",
        "past_chat": "Recall",
        "play_music": "Action",
        "iot_off": "Action",
    }
    return LabelledSet(
        ids=[f"h{i}" for i in range(12)],
        texts=CORPUS,
        locales=["en"] * 12,
        intents=intents,
        labels=[label_of[i] for i in intents],
        ambiguous=[False] * 12,
    )


@pytest.mark.parametrize("mode", ["refit", "distil"])
def test_pruned_model_directory_loads_in_the_student_runtime(tmp_path: Path, mode: str) -> None:
    data = _dataset(tmp_path / "ds")
    head_data = _head_data()
    inputs = PrunedInputs(
        head_data=head_data,
        intent_labels=dict(zip(head_data.intents, head_data.labels, strict=True)),
        recipe=HeadRecipe(target="intents", config=HeadConfig(hidden=16, epochs=2)),
        prefix=E5_PREFIX,
    )
    request = TrainRequest(
        arch="pruned",
        out=tmp_path / "student",
        datasets=(data,),
        layers=(0,),
        mode=mode,
        parity_texts=tuple(CORPUS),
        train=TrainConfig(epochs=1, batch_size=8, learning_rate=5e-5, threads=1, valid_fraction=0.2),
    )
    card = train_pruned_model_dir(request, inputs, _teacher_tokenizer(), _e5(), "e5-small@test")
    out = tmp_path / "student"
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json",
        "fp32.onnx",
        "labels.json",
        "model.onnx",
        "tokenizer.json",
    ]
    assert card["architecture"]["layers"] == [0]
    assert "4 bits on the teacher's own Q4_0 grid" in card["int8"]["quantisation"]
    assert card["mode"] == mode
    assert (card["training"]["distillation"] is not None) == (mode == "distil")
    assert json.loads((out / "card.json").read_text())["int8"]["shipped"] == card["int8"]["shipped"]
    student = Student(out, threads=1)
    logits = student.logits(CORPUS + UNSEEN_SCRIPTS)
    assert logits.shape == (len(CORPUS) + 2, 3) and np.isfinite(logits).all()
    assert student.labels == LABELS
