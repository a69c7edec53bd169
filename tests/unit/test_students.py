"""Student architectures, vocabulary pruning with byte fallback, export and the model directory."""

from __future__ import annotations

import functools
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from worker.errors import ModelError
from worker.models.registry import REQUIRED_FILES
from worker.models.student import Student, classify
from worker.teacher.e5format import E5File, default_weights_path
from worker.teacher.tokenizer import build_tokenizer
from worker.training.distil import Example, TrainConfig, TrainResult, train_student
from worker.training.export import export_onnx, quantise_static, run_logits, verify_parity
from worker.training.students import StudentConfig, build_student, initial_embeddings
from worker.training.vocab import BYTE_PIECES, FIRST_PIECE_ID, character_pieces, count_pieces, prune

CORPUS = [
    "set an alarm for seven",
    "what is on my shopping list",
    "play some jazz please",
    "turn off the kitchen lights",
    "wie wird das wetter morgen",
    "réserve une table pour deux",
    "tell me a joke",
    "did i get any emails today",
    "明日の天気を教えて",
    "알람 맞춰 줘",
]


@functools.cache
def _teacher_tokenizer() -> Tokenizer:
    tokenizer = build_tokenizer(E5File(default_weights_path()).vocab, max_length=512)
    tokenizer.no_padding()
    return tokenizer


@functools.cache
def _pruned() -> tuple[Tokenizer, object]:
    return prune(_teacher_tokenizer(), count_pieces(_teacher_tokenizer(), CORPUS))


def test_pruned_ids_map_to_the_right_teacher_rows() -> None:
    tokenizer, vocab = _pruned()
    teacher = _teacher_tokenizer()
    for piece_id in range(FIRST_PIECE_ID, len(vocab)):  # type: ignore[arg-type]
        piece = tokenizer.id_to_token(piece_id)
        assert teacher.token_to_id(piece) == vocab.teacher_ids[piece_id]  # type: ignore[attr-defined]
    e5 = E5File(default_weights_path())
    rows = vocab.teacher_ids[vocab.teacher_ids >= 0]  # type: ignore[attr-defined]
    init = initial_embeddings(e5.tensor("emb.word", rows=rows), vocab.teacher_ids, seed=0)  # type: ignore[attr-defined]
    alarm = tokenizer.token_to_id("▁alarm")
    np.testing.assert_array_equal(
        init[alarm], e5.tensor("emb.word", rows=np.array([teacher.token_to_id("▁alarm")]))[0]
    )
    assert not init[0].any()  # <pad> is zero


def test_kept_characters_cover_what_the_corpus_never_showed() -> None:
    teacher = _teacher_tokenizer()
    characters = character_pieces(teacher)
    assert 10_000 < len(characters) < 20_000
    assert all(len(teacher.id_to_token(i).removeprefix("\u2581")) == 1 for i in list(characters)[:500])
    plain, _ = _pruned()
    wide, vocab = prune(teacher, count_pieces(teacher, CORPUS), always_keep=characters)
    assert any(t.startswith("<0x") for t in plain.encode("闹钟").tokens)
    assert not any(t.startswith("<0x") for t in wide.encode("闹钟").tokens)
    assert wide.encode(CORPUS[0]).tokens == plain.encode(CORPUS[0]).tokens  # the corpus's own pieces win
    assert len(vocab) == FIRST_PIECE_ID + len(set(count_pieces(teacher, CORPUS)) | characters)


@pytest.mark.parametrize(
    ("spaced", "written"),
    [
        ("明日 の 天気 を 教え て", "明日の天気を教えて"),  # segmented word by word upstream
        ("午後 5 時 に アラーム", "午後5時にアラーム"),  # a digit beside a kanji joins too
        ("明日 の 天気 を 教えて 。", "明日の天気を教えて。"),
    ],
)
def test_spaces_inside_japanese_and_chinese_do_not_change_the_pieces(spaced: str, written: str) -> None:
    tokenizer, _ = _pruned()
    assert tokenizer.encode(spaced).tokens == tokenizer.encode(written).tokens


def test_spaces_stay_in_korean_latin_and_thai_text() -> None:
    tokenizer, _ = _pruned()
    for text in ("알람 맞춰 줘", "set an alarm for seven", "ตั้ง นาฬิกา ปลุก", "给 Dan 打电话"):
        assert tokenizer.normalizer.normalize_str(text).count(" ") == text.count(" "), text  # type: ignore[union-attr]


def test_byte_fallback_leaves_no_unknown_token_on_any_unicode() -> None:
    tokenizer, _ = _pruned()
    unk = tokenizer.token_to_id("<unk>")
    rng = random.Random(0)
    samples = ["ქართული ენა ლამაზია", "አማርኛ ቋንቋ", "🦄🫠 zzz", "ᚠᛇᚻ᛫ᛒᛦᚦ", "\u0301\u200d\ufeff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    for _ in range(300):
        samples.append(
            "".join(
                chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                for _ in range(rng.randint(1, 12))
            )
        )
    for text in samples:
        ids = tokenizer.encode(text).ids
        assert unk not in ids, text
    assert tokenizer.encode("ქ").tokens[-3:] == [BYTE_PIECES[0xE1], BYTE_PIECES[0x83], BYTE_PIECES[0xA5]]


@pytest.mark.parametrize("arch", ["cnn", "bag"])
def test_shapes_determinism_and_padding_invariance(arch: str) -> None:
    _, vocab = _pruned()
    config = StudentConfig(arch=arch, vocab_size=len(vocab), n_labels=3, embedding_dim=32, filters=16)  # type: ignore[arg-type]
    torch.manual_seed(0)
    a = build_student(config).eval()
    torch.manual_seed(0)
    b = build_student(config).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        out = a(ids, mask)
        assert out.shape == (2, 3)
        assert torch.equal(out, b(ids, mask))
        # The same texts without the extra padding give the same logits.
        np.testing.assert_allclose(a(ids[:1, :3], mask[:1, :3]), out[:1], atol=1e-6)
        np.testing.assert_allclose(a(ids[1:, :1], mask[1:, :1]), out[1:], atol=1e-6)


def _train_tiny(arch: str) -> tuple[object, Tokenizer]:
    tokenizer, vocab = _pruned()
    config = StudentConfig(arch=arch, vocab_size=len(vocab), n_labels=3, embedding_dim=32, filters=16)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_student(config)
    targets = torch.tensor([[i % 3 * 2.0 - 2, 1.0, -1.0] for i in range(len(CORPUS))])
    enc = tokenizer.encode_batch(CORPUS)
    longest = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (longest - len(e.ids)) for e in enc])
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(e.ids) for e in enc])[:, None]).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        loss = ((model(ids, mask) - targets) ** 2).mean()
        loss.backward()
        optimiser.step()
    return model.eval(), tokenizer


@pytest.mark.parametrize("arch", ["cnn", "bag"])
def test_int8_agrees_with_fp32_on_a_fixture(tmp_path: Path, arch: str) -> None:
    model, tokenizer = _train_tiny(arch)
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    int8 = quantise_static(fp32, tmp_path / "int8.onnx", tokenizer, CORPUS * 5, max_length=64)
    texts = CORPUS + [t.upper() for t in CORPUS] + [t + " now" for t in CORPUS]
    parity = verify_parity(fp32, int8, tokenizer, texts, max_length=64)
    assert parity["label_agreement"] >= 0.9
    spread = float(np.abs(run_logits(fp32, tokenizer, texts, 64)).mean())
    assert parity["mean_abs_logit_error"] < 0.1 * spread
    with torch.no_grad():
        enc = tokenizer.encode(CORPUS[0])
        ids = torch.tensor([enc.ids])
        expected = model(ids, torch.ones_like(ids)).numpy()
    np.testing.assert_allclose(run_logits(fp32, tokenizer, CORPUS[:1], 64), expected, atol=1e-5)


def _model_dir(tmp_path: Path) -> Path:
    model, tokenizer = _train_tiny("bag")
    directory = tmp_path / "student"
    directory.mkdir()
    export_onnx(model, directory / "model.onnx")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "labels.json").write_text(json.dumps(["Action", "Other", "Recall"]))
    (directory / "card.json").write_text(json.dumps({"version": "bag-test"}))
    return directory


def test_model_directory_loads_and_classifies(tmp_path: Path) -> None:
    student = Student(_model_dir(tmp_path))
    predictions, elapsed_ms = classify(["set an alarm", "", "ქართული"], student)
    assert [p.label in student.labels for p in predictions] == [True] * 3
    assert abs(sum(predictions[0].scores.values()) - 1.0) < 1e-4
    assert student.version == "bag-test" and elapsed_ms >= 0


def test_one_text_gives_the_logits_of_its_row_in_a_batch(tmp_path: Path) -> None:
    student = Student(_model_dir(tmp_path))
    texts = ["set an alarm", "", "   ", "ქართული", "réserve une table pour deux " * 40]
    batch = student.logits(texts)
    singles = np.concatenate([student.logits([text]) for text in texts])
    np.testing.assert_allclose(singles, batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_model_directory_missing_a_file_is_refused(tmp_path: Path, missing: str) -> None:
    directory = _model_dir(tmp_path)
    (directory / missing).unlink()
    with pytest.raises(ModelError, match=f"lacks {missing}"):
        Student(directory)


def test_model_directory_with_wrong_label_count_is_refused(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path)
    (directory / "labels.json").write_text(json.dumps(["A", "B"]))
    with pytest.raises(ModelError, match="outputs 3 logits"):
        Student(directory)
    shutil.rmtree(directory)


def _distil_tiny_bag(
    valid_logits: list[float], config: TrainConfig, checkpoint: Path | None = None
) -> TrainResult:
    """A tiny bag student trained on the fixture corpus, validated on the same texts against
    ``valid_logits`` (the training targets are [1, 0, -1])."""
    tokenizer, vocab = _pruned()
    student = StudentConfig(arch="bag", vocab_size=len(vocab), n_labels=3, embedding_dim=8, filters=4)  # type: ignore[arg-type]
    rows = [Example(text, np.array([1.0, 0.0, -1.0], np.float32), "en") for text in CORPUS]
    valid = [Example(text, np.array(valid_logits, np.float32), "en") for text in CORPUS]
    return train_student(
        student, None, tokenizer, lambda: iter(rows), lambda: iter(valid), config, checkpoint=checkpoint
    )


def test_the_learning_rate_drops_after_each_epoch_without_improvement() -> None:
    config = TrainConfig(epochs=6, batch_size=4, warmup_epochs=0.0, patience=3, plateau_factor=0.5, threads=1)
    result = _distil_tiny_bag([-50.0, 0.0, 50.0], config)
    rates = [epoch["learning_rate"] for epoch in result.history]
    losses = [epoch["valid_loss"] for epoch in result.history]
    assert rates[0] == config.learning_rate
    for i in range(1, len(rates)):
        improved = losses[i - 1] < min(losses[: i - 1], default=float("inf")) - 1e-6
        assert rates[i] == (rates[i - 1] if improved else rates[i - 1] * 0.5)


def test_an_epoch_improves_only_by_more_than_min_delta() -> None:
    config = TrainConfig(epochs=10, batch_size=4, warmup_epochs=0.0, patience=2, min_delta=1e9, threads=1)
    result = _distil_tiny_bag([1.0, 0.0, -1.0], config)
    assert result.best_epoch == 1  # the first epoch beats infinity; none beats it by 1e9
    assert len(result.history) == 3  # then two epochs without improvement, and it stops


def test_a_run_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    config = TrainConfig(epochs=4, batch_size=4, warmup_epochs=1.0, patience=9, threads=1)
    whole = _distil_tiny_bag([1.0, 0.0, -1.0], config)
    checkpoint = tmp_path / "train.pt"
    _distil_tiny_bag([1.0, 0.0, -1.0], replace(config, epochs=2), checkpoint)  # "killed" after epoch 2
    resumed = _distil_tiny_bag([1.0, 0.0, -1.0], config, checkpoint)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    elapsed = [e["elapsed_seconds"] for e in resumed.history]
    assert elapsed == sorted(elapsed)  # the resumed epochs count on from the saved time
    assert [e["valid_loss"] for e in resumed.history] == pytest.approx(
        [e["valid_loss"] for e in whole.history]
    )
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name])


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "train.pt"
    config = TrainConfig(epochs=1, batch_size=4, threads=1)
    _distil_tiny_bag([1.0, 0.0, -1.0], config, checkpoint)
    with pytest.raises(ValueError, match="another run"):
        _distil_tiny_bag([1.0, 0.0, -1.0], replace(config, learning_rate=0.5, epochs=2), checkpoint)


def test_each_epoch_reports_its_own_time_the_total_and_a_bound_on_time_left() -> None:
    result = _distil_tiny_bag([1.0, 0.0, -1.0], TrainConfig(epochs=2, batch_size=4, patience=9, threads=1))
    first, second = result.history
    assert second["elapsed_seconds"] >= first["epoch_seconds"] + second["epoch_seconds"] - 0.2
    assert first["rows_per_s"] > 0 and second["max_seconds_left"] == 0


def test_sparse_embedding_gradients_train_and_resume(tmp_path: Path) -> None:
    config = TrainConfig(
        epochs=3, batch_size=4, warmup_epochs=0.0, patience=9, threads=1, sparse_embeddings=True
    )
    whole = _distil_tiny_bag([1.0, 0.0, -1.0], config)
    assert whole.history[-1]["valid_loss"] < whole.history[0]["valid_loss"]
    checkpoint = tmp_path / "train.pt"
    _distil_tiny_bag([1.0, 0.0, -1.0], replace(config, epochs=1), checkpoint)
    resumed = _distil_tiny_bag([1.0, 0.0, -1.0], config, checkpoint)
    assert [e["valid_loss"] for e in resumed.history] == pytest.approx(
        [e["valid_loss"] for e in whole.history]
    )


def test_a_locale_cap_trains_on_a_share_of_the_big_locales_only(tmp_path: Path) -> None:
    from collections import Counter

    import numpy as np

    from worker.loop.dataset import DatasetWriter, ShardRows
    from worker.training.distil import TrainConfig, stream_examples

    n_big, n_small = 4000, 300
    locales = ["ko"] * n_big + ["ja"] * n_small
    writer = DatasetWriter(tmp_path / "ds", "teacher@1", ("Action", "Other", "Recall"))
    writer.write_shard(
        "a",
        ShardRows(
            ids=[f"row-{i}" for i in range(len(locales))],
            texts=[f"text {i}" for i in range(len(locales))],
            locales=locales,
            teacher_logits=list(np.zeros((len(locales), 3), np.float32)),
            teacher_labels=["Other"] * len(locales),
            sources=["test"] * len(locales),
        ),
    )
    datasets = [tmp_path / "ds"]
    every = Counter(e.locale for e in stream_examples(datasets, "train", TrainConfig()))
    capped_config = TrainConfig(max_rows_per_locale=1000)
    capped = Counter(e.locale for e in stream_examples(datasets, "train", capped_config))
    assert capped["ja"] == every["ja"]  # under the cap: every row
    assert 850 <= capped["ko"] <= 1100  # about the cap, less the validation share
    again = [e.text for e in stream_examples(datasets, "train", capped_config)]
    assert again == [e.text for e in stream_examples(datasets, "train", capped_config)]  # deterministic
    valid = [e.text for e in stream_examples(datasets, "valid", capped_config)]
    assert valid == [e.text for e in stream_examples(datasets, "valid", TrainConfig())]  # untouched


def _logit_rows(targets: list[list[float]]) -> list[Example]:
    return [
        Example(f"text {i}", np.array(t, np.float32), "en", row_id=f"r{i}") for i, t in enumerate(targets)
    ]


def test_disagreement_weights_favour_the_rows_the_student_gets_wrong_with_mean_one() -> None:
    from worker.training.targets import disagreement_weights

    rows = _logit_rows([[4.0, 0.0, 0.0]] * 6 + [[0.0, 4.0, 0.0]] * 2)

    def student(texts: Sequence[str]) -> np.ndarray:  # always says label 0
        return np.tile(np.array([[4.0, 0.0, 0.0]], np.float32), (len(texts), 1))

    weights, summary = disagreement_weights(iter(rows), student, TrainConfig(disagreement_alpha=1.0))
    assert set(weights) == {e.row_id for e in rows}
    assert np.mean(list(weights.values())) == pytest.approx(1.0)
    agreed, wrong = weights["r0"], weights["r6"]
    assert wrong > 2 * agreed  # KL 0 vs. KL 4x the mean: 1 + 4 against 1, before scaling
    assert summary["top_label_disagreement"] == pytest.approx(0.25)


def test_disagreement_weights_cap_a_single_outlier() -> None:
    from worker.training.targets import disagreement_weights

    rows = _logit_rows([[0.1, 0.0, 0.0]] * 999 + [[0.0, 40.0, 0.0]])

    def student(texts: Sequence[str]) -> np.ndarray:  # right on every row but the last
        return np.tile(np.array([[0.1, 0.0, 0.0]], np.float32), (len(texts), 1))

    config = TrainConfig(disagreement_alpha=1.0, disagreement_cap=10.0)
    weights, _ = disagreement_weights(iter(rows), student, config)
    raw_max = 1 + config.disagreement_alpha * config.disagreement_cap
    assert max(weights.values()) / min(weights.values()) == pytest.approx(raw_max, rel=1e-3)


def test_row_weights_reach_the_training_rows_only_and_weigh_their_loss(tmp_path: Path) -> None:
    from worker.loop.dataset import DatasetWriter, ShardRows
    from worker.training.distil import stream_examples

    n = 400
    writer = DatasetWriter(tmp_path / "ds", "teacher@1", ("Action", "Other", "Recall"))
    writer.write_shard(
        "a",
        ShardRows(
            ids=[f"row-{i}" for i in range(n)],
            texts=[f"text {i}" for i in range(n)],
            locales=["en"] * n,
            teacher_logits=list(np.zeros((n, 3), np.float32)),
            teacher_labels=["Other"] * n,
            sources=["test"] * n,
        ),
    )
    weights = {f"row-{i}": 3.0 for i in range(n)}
    train = list(stream_examples([tmp_path / "ds"], "train", TrainConfig(), weights))
    valid = list(stream_examples([tmp_path / "ds"], "valid", TrainConfig(), weights))
    assert train and valid
    assert {e.weight for e in train} == {3.0}
    assert {e.weight for e in valid} == {1.0}  # validation measures the plain objective
    # A weight of 3 on every row is the plain loss times 3 in the first epoch's training loss.
    tokenizer, vocab = _pruned()
    config = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0.0, threads=1, learning_rate=0.0)
    student = StudentConfig(arch="bag", vocab_size=len(vocab), n_labels=3, embedding_dim=8, filters=4)  # type: ignore[arg-type]
    rows = [Example(t, np.array([1.0, 0.0, -1.0], np.float32), "en") for t in CORPUS]
    heavy = [replace(e, weight=3.0) for e in rows]
    plain = train_student(student, None, tokenizer, lambda: iter(rows), lambda: iter(rows), config)
    weighted = train_student(student, None, tokenizer, lambda: iter(heavy), lambda: iter(heavy), config)
    assert weighted.history[0]["train_loss"] == pytest.approx(3 * plain.history[0]["train_loss"], rel=1e-5)
    assert weighted.history[0]["valid_loss"] == pytest.approx(plain.history[0]["valid_loss"], rel=1e-5)


def test_the_embedding_target_trains_a_projection_that_is_dropped_afterwards(tmp_path: Path) -> None:
    tokenizer, vocab = _pruned()
    student = StudentConfig(
        arch="cnn",
        vocab_size=len(vocab),  # type: ignore[arg-type]
        n_labels=3,
        embedding_dim=8,
        filters=4,
        kernel_sizes=(2, 3),
    )
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((len(CORPUS), 6)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    rows = [
        Example(t, np.array([1.0, 0.0, -1.0], np.float32), "en", embedding=targets[i])
        for i, t in enumerate(CORPUS)
    ]
    config = TrainConfig(
        epochs=3, batch_size=4, warmup_epochs=0.0, patience=9, threads=1, embedding_weight=1.0
    )
    whole = train_student(student, None, tokenizer, lambda: iter(rows), lambda: iter(rows), config)
    assert not hasattr(whole.model, "projection")  # only the classifier is exported
    # The training loss holds the embedding terms; validation measures the logits alone.
    plain = train_student(
        student,
        None,
        tokenizer,
        lambda: iter(rows),
        lambda: iter(rows),
        replace(config, embedding_weight=0.0),
    )
    assert whole.history[0]["train_loss"] > plain.history[0]["train_loss"]
    checkpoint = tmp_path / "train.pt"
    train_student(
        student,
        None,
        tokenizer,
        lambda: iter(rows),
        lambda: iter(rows),
        replace(config, epochs=1),
        checkpoint,
    )
    resumed = train_student(
        student, None, tokenizer, lambda: iter(rows), lambda: iter(rows), config, checkpoint
    )
    assert [e["valid_loss"] for e in resumed.history] == pytest.approx(
        [e["valid_loss"] for e in whole.history]
    )


def test_the_embedding_target_without_embeddings_is_refused() -> None:
    tokenizer, vocab = _pruned()
    student = StudentConfig(arch="bag", vocab_size=len(vocab), n_labels=3, embedding_dim=8, filters=4)  # type: ignore[arg-type]
    rows = [Example(t, np.array([1.0, 0.0, -1.0], np.float32), "en") for t in CORPUS]
    config = TrainConfig(epochs=1, batch_size=4, threads=1, embedding_weight=1.0)
    with pytest.raises(ValueError, match="teacher's embeddings"):
        train_student(student, None, tokenizer, lambda: iter(rows), lambda: iter(rows), config)
