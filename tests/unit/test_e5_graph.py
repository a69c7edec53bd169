"""The e5 reader, ONNX builder and build cache, on a tiny random model written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from e5_fixture import TinyE5, reference_embedding, write_tiny_e5

from worker.errors import ModelError
from worker.teacher.build import ensure_encoder, ensure_head_graph, verify
from worker.teacher.e5format import E5File
from worker.teacher.head import forward
from worker.teacher.onnx_graph import HeadWeights, attach_head, build_encoder


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, TinyE5]:
    path = tmp_path / "tiny.bin"
    return path, write_tiny_e5(path)


def test_reader_dequantises_exactly(tiny: tuple[Path, TinyE5]) -> None:
    path, model = tiny
    e5 = E5File(path)
    assert e5.config.hidden == 64 and e5.config.layers == 2 and e5.config.ffn == 128
    assert list(e5.vocab.pieces) == model.pieces
    assert e5.vocab.normalisation[9] == (32,) and e5.vocab.normalisation[1] == ()
    for name, values in model.tensors.items():
        np.testing.assert_array_equal(e5.tensor(name), values, err_msg=name)
    rows = np.array([5, 0, 7])
    np.testing.assert_array_equal(e5.tensor("emb.word", rows=rows), model.tensors["emb.word"][rows])


def test_reader_refuses_a_file_that_is_not_e5(tmp_path: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelError, match="not an e5 model file"):
        E5File(path)


def _run(model_path: Path, ids: list[list[int]], output: str) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    longest = max(len(r) for r in ids)
    input_ids = np.ones((len(ids), longest), np.int64)
    mask = np.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    (values,) = session.run([output], {"input_ids": input_ids, "attention_mask": mask})
    return np.asarray(values)


def test_onnx_encoder_matches_numpy_reference_with_padding(tmp_path: Path, tiny: tuple[Path, TinyE5]) -> None:
    path, model = tiny
    graph = build_encoder(E5File(path), tmp_path / "encoder.weights")
    onnx.save(graph, str(tmp_path / "encoder.onnx"))
    batch = [[0, 10, 11, 12, 2], [0, 30, 2], [0, 2]]
    got = _run(tmp_path / "encoder.onnx", batch, "embedding")
    for row, ids in zip(got, batch, strict=True):
        np.testing.assert_allclose(row, reference_embedding(model, ids), atol=2e-5)


def test_head_graph_matches_numpy_head(tmp_path: Path, tiny: tuple[Path, TinyE5]) -> None:
    path, _ = tiny
    rng = np.random.default_rng(1)
    head = HeadWeights(
        layers=(
            (rng.normal(0, 0.3, (64, 16)).astype(np.float32), np.zeros(16, np.float32)),
            (rng.normal(0, 0.3, (16, 5)).astype(np.float32), rng.normal(0, 0.1, 5).astype(np.float32)),
        ),
        groups=np.array([0, 0, 1, 2, 2]),
        n_labels=3,
    )
    encoder = build_encoder(E5File(path), tmp_path / "encoder.weights")
    onnx.save(attach_head(encoder, head), str(tmp_path / "teacher.onnx"))
    onnx.save(encoder, str(tmp_path / "encoder.onnx"))
    batch = [[0, 10, 11, 2], [0, 40, 41, 42, 43, 2]]
    logits = _run(tmp_path / "teacher.onnx", batch, "logits")
    embeddings = _run(tmp_path / "encoder.onnx", batch, "embedding")
    np.testing.assert_allclose(logits, forward(head, embeddings), atol=1e-5)
    # Grouped logits are log-probabilities of each label, centred per row.
    np.testing.assert_allclose(logits.mean(axis=1), 0.0, atol=1e-6)


def test_second_build_is_a_no_op(tmp_path: Path, tiny: tuple[Path, TinyE5]) -> None:
    path, _ = tiny
    first = ensure_encoder(tmp_path / "cache", path, max_length=32)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    second = ensure_encoder(tmp_path / "cache", path, max_length=32)
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.directory.iterdir()} == stamps


def test_key_changes_with_the_inputs(tmp_path: Path, tiny: tuple[Path, TinyE5]) -> None:
    path, _ = tiny
    a = ensure_encoder(tmp_path / "cache", path, max_length=32)
    b = ensure_encoder(tmp_path / "cache", path, max_length=16)
    other = tmp_path / "other.bin"
    write_tiny_e5(other, seed=5)
    c = ensure_encoder(tmp_path / "cache", other, max_length=32)
    assert len({a.key, b.key, c.key}) == 3


@pytest.mark.parametrize("victim", ["encoder.weights", "encoder.onnx", "tokenizer.json", "manifest.json"])
def test_corrupted_cache_file_is_detected_and_rebuilt(
    tmp_path: Path, tiny: tuple[Path, TinyE5], victim: str
) -> None:
    path, _ = tiny
    files = ensure_encoder(tmp_path / "cache", path, max_length=32)
    target = files.directory / victim
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    assert verify(files.directory, ["encoder.weights", "encoder.onnx", "tokenizer.json"])
    rebuilt = ensure_encoder(tmp_path / "cache", path, max_length=32)
    assert verify(rebuilt.directory, ["encoder.weights", "encoder.onnx", "tokenizer.json"]) == []
    ids = [[0, 10, 11, 2]]
    assert np.isfinite(_run(rebuilt.encoder, ids, "embedding")).all()


def test_head_graph_is_cached_and_verified(tmp_path: Path, tiny: tuple[Path, TinyE5]) -> None:
    path, _ = tiny
    files = ensure_encoder(tmp_path / "cache", path, max_length=32)
    head = HeadWeights(
        layers=((np.eye(64, 3, dtype=np.float32), np.zeros(3, np.float32)),), groups=None, n_labels=3
    )
    graph = ensure_head_graph(files, head, "ab" * 32)
    stamp = graph.stat().st_mtime_ns
    assert ensure_head_graph(files, head, "ab" * 32).stat().st_mtime_ns == stamp
    graph.write_bytes(graph.read_bytes()[:-10])
    assert ensure_head_graph(files, head, "ab" * 32).stat().st_size > 0
    assert verify(files.directory, [graph.name]) == []
