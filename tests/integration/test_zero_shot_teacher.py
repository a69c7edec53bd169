"""The zero-shot teacher on the real embedded e5 encoder, loaded as the worker loads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.config import MODELS_DIR, Settings
from worker.teacher import ZeroShotTeacher, load_teacher

pytestmark = pytest.mark.integration

CLEAR = {
    "turn off the lights in the living room": "Action",
    "schalte das Licht im Flur aus": "Action",
    "play some rock music": "Action",
    "what meetings do I have tomorrow": "Recall",
    "hello, how are you today": "Other",
    "what's the weather like in paris": "Other",
}


@pytest.mark.parametrize("file", ["intents-3.json", "intents-3-examples.json"])
def test_the_label_set_setting_makes_a_zero_shot_teacher(settings: Settings, file: str) -> None:
    path = MODELS_DIR / "labels" / file
    teacher = load_teacher(settings.model_copy(update={"teacher_labels": path}))
    assert isinstance(teacher, ZeroShotTeacher)
    assert teacher.labels == ("Action", "Other", "Recall")
    assert teacher.label_set_id.startswith(path.stem + "@")
    logits = teacher.logits(list(CLEAR))
    assert [teacher.labels[i] for i in logits.argmax(axis=1)] == list(CLEAR.values())
    np.testing.assert_allclose(logits.mean(axis=1), 0, atol=1e-4)
    # Same texts one by one: batching and padding change nothing.
    single = np.concatenate([teacher.logits([text]) for text in CLEAR])
    np.testing.assert_allclose(single, logits, atol=1e-3)


def test_a_label_set_in_the_teacher_directory_is_picked_up(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "label_set.json").write_text((MODELS_DIR / "labels" / "massive-scenarios.json").read_text())
    teacher = load_teacher(settings.model_copy(update={"teacher_dir": tmp_path}))
    assert len(teacher.labels) == 18
    assert teacher.labels[int(teacher.logits(["will it snow tomorrow in Oslo"]).argmax())] == "weather"
