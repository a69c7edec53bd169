"""The zero-shot teacher on the real embedded e5 encoder, loaded as the worker loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.cli.commands import build_parser
from worker.cli.model_commands import teacher_eval, teacher_zero_shot
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


def test_the_zero_shot_command_scores_texts(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    labels = MODELS_DIR / "labels" / "intents-3-examples.json"
    args = build_parser().parse_args(
        [
            "teacher",
            "zero-shot",
            "--labels",
            str(labels),
            "--json",
            "what's on my calendar friday",
            "hi there",
        ]
    )
    assert teacher_zero_shot(settings, args) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines() if line.startswith('{"text"')]
    assert [r["label"] for r in rows] == ["Recall", "Other"]
    assert abs(sum(rows[0]["scores"].values()) - 1) < 1e-3
    assert "intents-3-examples@" in out.err and "1 model row(s) per text" in out.err


def test_teacher_eval_takes_a_label_set(settings: Settings, tmp_path: Path) -> None:
    rows = [{"id": str(i), "locale": "en", "text": t, "label": g} for i, (t, g) in enumerate(CLEAR.items())]
    data = tmp_path / "clear.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report.json"
    labels = MODELS_DIR / "labels" / "intents-3.json"
    args = build_parser().parse_args(
        ["teacher", "eval", "--labels", str(labels), "--data", str(data), "--out", str(report), "--quiet"]
    )
    assert teacher_eval(settings, args) == 0
    payload = json.loads(report.read_text())
    assert payload["label_set"].startswith("intents-3@")
    assert payload["metrics"]["overall"]["accuracy"] == 1.0
