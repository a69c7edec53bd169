"""The teacher's torch twin (`corpus build --device`) gives the ONNX teacher's logits."""

from __future__ import annotations

import numpy as np
import pytest

from worker.config import Settings
from worker.teacher import OnnxTeacher
from worker.training.torch_teacher import TorchTeacher, load_embedded_torch_teacher

TEXTS = [
    "set an alarm for seven tomorrow",
    "what did I buy last week",
    "こんにちは、元気ですか",
    "明天早上七点叫我起床",
    "",
    "x" * 5000,
    "¿qué tiempo hace hoy en Madrid?",
]


@pytest.fixture(scope="module")
def torch_teacher(settings: Settings) -> TorchTeacher:
    return load_embedded_torch_teacher(settings, "cpu")


def test_same_identity_and_labels_as_the_onnx_teacher(
    torch_teacher: TorchTeacher, embedded_teacher: OnnxTeacher
) -> None:
    assert torch_teacher.identity == embedded_teacher.identity
    assert torch_teacher.labels == embedded_teacher.labels
    assert torch_teacher.label_set_id == embedded_teacher.label_set_id


def test_logits_match_the_onnx_teacher(torch_teacher: TorchTeacher, embedded_teacher: OnnxTeacher) -> None:
    expected = embedded_teacher.logits(TEXTS)
    got = torch_teacher.logits(TEXTS)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-3)
    chunks = list(torch_teacher.iter_logits(TEXTS, chunk_size=3))
    np.testing.assert_allclose(np.concatenate(chunks), got, atol=1e-5)


def test_no_texts_no_rows(torch_teacher: TorchTeacher) -> None:
    assert torch_teacher.logits([]).shape == (0, len(torch_teacher.labels))
