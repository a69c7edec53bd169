"""``table_bits``: a CNN student trained around a frozen 4-bit embedding table ships that table
at 4 bits exactly, and its INT8 model is checked against the float one like any other; and warm
starts (``init_from``) from a published student's served model."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from dataset_fixture import write_dataset
from onnx import numpy_helper
from tokenizers import Tokenizer

from worker.models.student import Student
from worker.teacher.e5format import E5File, default_weights_path
from worker.teacher.tokenizer import build_tokenizer
from worker.training.distil import TrainConfig
from worker.training.nibbles import snap_rows, unpack_rows
from worker.training.run import TABLE_GROUP, TrainRequest, train_model_dir

LABELS = ("Action", "Other", "Recall")
TEXTS = [
    "set an alarm for seven",
    "turn off the kitchen lights",
    "what did i order last week",
    "remind me what we talked about",
    "tell me a joke",
    "how tall is the eiffel tower",
    "pon una alarma a las siete",
    "qu'est-ce que j'ai acheté hier",
    "明日の天気を教えて",
    "알람 맞춰 줘",
    "включи свет на кухне",
    "bonjour, ça va ?",
]


@functools.cache
def _e5() -> E5File:
    return E5File(default_weights_path())


def _teacher_tokenizer() -> Tokenizer:
    tokenizer = build_tokenizer(_e5().vocab, max_length=512)
    tokenizer.no_padding()
    return tokenizer


def _dataset(path: Path, texts: list[str] = TEXTS) -> Path:
    rows = [f"{t} {i}" for i in range(8) for t in texts]
    logits = np.array([[3.0, 0.0, -1.0], [0.0, 3.0, -1.0], [-1.0, 0.0, 3.0]], np.float32)
    return write_dataset(path, rows, logits[np.arange(len(rows)) % 3], LABELS)


def _train(
    tmp_path: Path,
    table_bits: int,
    init_from: Path | None = None,
    epochs: int = 2,
    min_count: int = 1,
    texts: list[str] = TEXTS,
    keep_characters: bool = False,
) -> dict[str, object]:
    data = tmp_path / f"ds-{abs(hash(tuple(texts)))}"
    request = TrainRequest(
        arch="cnn",
        out=tmp_path / f"student-{table_bits}-{'warm' if init_from else 'cold'}",
        datasets=(data if data.exists() else _dataset(data, texts),),
        init_from=init_from,
        min_count=min_count,
        keep_characters=keep_characters,
        filters=8,
        kernel_sizes=(2, 3),
        embedding_dim=32,
        parity_texts=tuple(TEXTS),
        train=TrainConfig(
            epochs=epochs,
            batch_size=16,
            threads=1,
            valid_fraction=0.2,
            table_bits=table_bits,
            table_epochs=1,
        ),
    )
    return train_model_dir(request, _teacher_tokenizer(), _e5(), "teacher@test")


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_the_shipped_table_is_the_trained_float_table_at_4_bits(tmp_path: Path) -> None:
    card = _train(tmp_path, table_bits=4)
    out = tmp_path / "student-4-cold"
    table = card["int8"]["table"]  # type: ignore[index]
    assert table["bits"] == 4 and table["group"] == TABLE_GROUP
    assert len(table["history"]) == 1  # the epoch around the frozen table
    assert len(card["training"]["history"]) == 3  # type: ignore[index]
    float_table = _initializers(out / "fp32.onnx")["embedding.weight"]
    # The float model's table is already on its 4-bit grid: training left the snapped rows alone.
    snapped, _ = snap_rows(float_table, TABLE_GROUP)
    np.testing.assert_array_equal(snapped, float_table)
    assert card["int8"]["shipped"]  # type: ignore[index]
    served = _initializers(out / "model.onnx")
    (codes,) = [v for k, v in served.items() if k.endswith(".nibbles.codes")]
    (scales,) = [v for k, v in served.items() if k.endswith(".nibbles.scales")]
    np.testing.assert_array_equal(unpack_rows(codes, scales, TABLE_GROUP), float_table)
    assert not any(v.shape == float_table.shape for v in served.values())
    student = Student(out, threads=1)
    assert student.labels == LABELS
    assert np.isfinite(student.logits(TEXTS)).all()
    assert json.loads((out / "card.json").read_text())["int8"]["table"]["bits"] == 4


def test_without_table_bits_the_table_stays_int8_and_trainable(tmp_path: Path) -> None:
    card = _train(tmp_path, table_bits=0)
    assert "table" not in card["int8"]  # type: ignore[operator]
    assert not any(
        name.endswith(".nibbles.codes") for name in _initializers(tmp_path / "student-0-cold" / "model.onnx")
    )


def test_a_warm_start_reads_the_served_int8_weights_back(tmp_path: Path) -> None:
    from worker.training.warm_start import onnx_weights

    _train(tmp_path, table_bits=0)
    served = tmp_path / "student-0-cold"
    floats = _initializers(served / "fp32.onnx")
    names = {"embedding.weight", "convs.0.weight", "convs.1.bias", "out.weight", "out.bias"}
    weights = onnx_weights(served / "model.onnx", names)
    assert set(weights) == names
    for name in names:
        spread = float(np.abs(floats[name]).max())
        np.testing.assert_allclose(weights[name], floats[name], atol=spread / 100, err_msg=name)


def test_a_warm_start_with_no_epochs_then_table_bits_keeps_the_student_and_records_it(tmp_path: Path) -> None:
    _train(tmp_path, table_bits=0)
    served = tmp_path / "student-0-cold"
    card = _train(tmp_path, table_bits=4, init_from=served, epochs=0)
    version = json.loads((served / "card.json").read_text())["version"]
    init = card["training"]["init_from"]  # type: ignore[index]
    assert init == {
        "path": str(served),
        "version": version,
        "copied": init["copied"],
        "mapped": 0,
        "shared_pieces": 1.0,
    }
    assert card["training"]["history"] and card["int8"]["table"]["valid_loss_before_snap"] is None  # type: ignore[index]
    before = Student(served, threads=1).logits(TEXTS)
    after = Student(tmp_path / "student-4-warm", threads=1).logits(TEXTS)
    assert (before.argmax(1) == after.argmax(1)).mean() >= 0.75  # one epoch around the 4-bit table


def test_a_warm_start_reads_a_4_bit_table_back_exactly(tmp_path: Path) -> None:
    from worker.training.warm_start import onnx_weights

    _train(tmp_path, table_bits=4)
    served = tmp_path / "student-4-cold"
    table = onnx_weights(served / "model.onnx", {"embedding.weight"})["embedding.weight"]
    np.testing.assert_array_equal(table, _initializers(served / "fp32.onnx")["embedding.weight"])


def test_a_warm_start_into_a_larger_vocabulary_copies_rows_by_piece_and_maps_the_new_ones(
    tmp_path: Path,
) -> None:
    from worker.training.warm_start import onnx_weights

    _train(tmp_path, table_bits=0, texts=TEXTS[:9])  # an earlier generation, on less text
    served = tmp_path / "student-0-cold"
    card = _train(tmp_path, table_bits=0, init_from=served, epochs=0)  # every text
    init = card["training"]["init_from"]  # type: ignore[index]
    assert init["mapped"] > 0 and init["copied"] > 0 and init["shared_pieces"] >= 0.5
    old_vocabulary = Tokenizer.from_file(str(served / "tokenizer.json")).get_vocab()
    new_vocabulary = Tokenizer.from_file(str(tmp_path / "student-0-warm" / "tokenizer.json")).get_vocab()
    old_table = onnx_weights(served / "model.onnx", {"embedding.weight"})["embedding.weight"]
    new_table = _initializers(tmp_path / "student-0-warm" / "fp32.onnx")["embedding.weight"]  # no epochs
    shared = [piece for piece in new_vocabulary if piece in old_vocabulary]
    assert len(shared) == init["copied"] and len(new_vocabulary) - len(shared) == init["mapped"]
    for piece in shared:
        np.testing.assert_array_equal(new_table[new_vocabulary[piece]], old_table[old_vocabulary[piece]])
    assert np.isfinite(new_table).all()


def test_a_warm_start_from_a_student_of_other_text_is_refused(tmp_path: Path) -> None:
    _train(tmp_path, table_bits=0)
    other = ["ხვალ დილის შვიდზე მაღვიძარა", "ነገ ጠዋት በሰባት ሰዓት አስነሳኝ", "พรุ่งนี้ปลุกฉันตอนเจ็ดโมง"]
    with pytest.raises(ValueError, match="shares only"):
        _train(tmp_path, table_bits=0, init_from=tmp_path / "student-0-cold", texts=other)


def test_kept_characters_get_rows_mapped_into_the_trained_table(tmp_path: Path) -> None:
    card = _train(tmp_path, table_bits=4, min_count=2, keep_characters=True)
    vocabulary = card["vocabulary"]  # type: ignore[index]
    # Every one-character piece is kept; those the 96 training rows did not show twice are mapped.
    assert vocabulary["size"] > 15_000 and vocabulary["rows_mapped"] > 14_000
    student = Student(tmp_path / "student-4-cold", threads=1)
    tokens = student._tokenizer.encode("闹钟").tokens
    assert tokens and not any(t.startswith("<0x") for t in tokens)  # characters, not their bytes
    assert np.isfinite(student.logits(["闹钟", *TEXTS])).all()


def test_untrained_rows_take_the_map_from_initial_to_trained_rows() -> None:
    import torch

    from worker.training.run import map_untrained_rows
    from worker.training.vocab import FIRST_PIECE_ID, PrunedVocab

    rng = np.random.default_rng(0)
    n, dim = FIRST_PIECE_ID + 40, 6
    teacher_ids = np.array([-1] * FIRST_PIECE_ID + list(range(100, 140)), np.int64)
    vocab = PrunedVocab(pieces=tuple(str(i) for i in range(n)), teacher_ids=teacher_ids)
    counts = Counter({100 + i: 5 for i in range(30)} | {130: 1})  # 130-139 seen under twice
    initial = rng.standard_normal((n, dim)).astype(np.float32)
    mapping = rng.standard_normal((dim, dim)).astype(np.float32)
    trained = initial @ mapping + 0.5  # plus a shift no linear map without offset takes exactly
    trained[FIRST_PIECE_ID : FIRST_PIECE_ID + 30] = initial[FIRST_PIECE_ID : FIRST_PIECE_ID + 30] @ mapping
    model = torch.nn.Module()
    model.embedding = torch.nn.Embedding(n, dim)
    with torch.no_grad():
        model.embedding.weight.copy_(torch.from_numpy(trained))
    assert map_untrained_rows(model, initial, vocab, counts, min_count=2) == 10
    table = model.embedding.weight.detach().numpy()
    np.testing.assert_allclose(
        table[FIRST_PIECE_ID + 30 :], initial[FIRST_PIECE_ID + 30 :] @ mapping, atol=1e-4
    )
    np.testing.assert_array_equal(table[:FIRST_PIECE_ID], trained[:FIRST_PIECE_ID])  # bytes stay
    np.testing.assert_array_equal(
        table[FIRST_PIECE_ID : FIRST_PIECE_ID + 30], trained[FIRST_PIECE_ID : FIRST_PIECE_ID + 30]
    )
