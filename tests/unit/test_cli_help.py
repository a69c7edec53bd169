"""The command line as a new user meets it: help texts, and what rollback and train say."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from worker.cli.commands import build_parser
from worker.cli.model_commands import say_quantisation
from worker.cli.registry_commands import rollback
from worker.config import MODELS_DIR, Settings
from worker.errors import ModelError
from worker.loop.gate import Thresholds, decide, golden_from_labelled, measure
from worker.models.student import Student


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = commands.choices[name]
    return found


def test_top_level_help_speaks_to_a_user_not_to_a_maintainer() -> None:
    text = build_parser().format_help()
    assert "Nothing imports" not in text and "``" not in text
    assert "INTENT_*" in text


def test_every_train_option_has_a_help_text() -> None:
    train = subparser("train")
    missing = [a.dest for a in train._actions if a.option_strings and not a.help]
    assert missing == []


def test_promote_thresholds_show_their_defaults() -> None:
    promote = subparser("promote")
    shown = {a.option_strings[0]: a.help or "" for a in promote._actions if a.option_strings}
    for option, default in (
        ("--max-agreement-drop", "0.005"),
        ("--max-f1-drop", "0.005"),
        ("--max-kl-growth", "0.1"),
        ("--min-int8-parity", "0.995"),
        ("--max-latency-ratio", "1.25"),
    ):
        assert shown[option].endswith(f"else {default})"), option  # the variable, else the default
    assert "else 0.995)" in " ".join(promote.format_help().split())


def test_rollback_with_nothing_promoted_says_so_without_naming_a_missing_file(tmp_path: Path) -> None:
    settings = Settings(registry_dir=tmp_path / "registry")
    with pytest.raises(ModelError) as caught:
        rollback(settings, argparse.Namespace())
    message = str(caught.value)
    assert "no model has been promoted" in message and "current.json" not in message


def fp32_candidate(tmp_path: Path) -> Path:
    """The shipped student dressed as a model whose INT8 export failed parity (model.onnx = FP32)."""
    directory = tmp_path / "fp32-candidate"
    shutil.copytree(MODELS_DIR / "student", directory)
    shutil.copy(directory / "model.onnx", directory / "fp32.onnx")
    card = json.loads((directory / "card.json").read_text())
    card["int8"] = {"parity": {"label_agreement": 0.9947}, "min_agreement": 0.995, "shipped": False}
    (directory / "card.json").write_text(json.dumps(card))
    return directory


class Teacher:
    """Logits from the student itself, in chunks: enough to build a golden set."""

    identity = "test-teacher"
    label_set_id = ""

    def __init__(self, student: Student) -> None:
        self.student = student
        self.labels = tuple(student.labels)

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.student.logits(texts)

    def iter_logits(self, texts: list[str], chunk_size: int = 1024):  # type: ignore[no-untyped-def]
        for start in range(0, len(texts), chunk_size):
            yield self.student.logits(texts[start : start + chunk_size])


def test_an_fp32_candidate_reports_int8_parity_as_not_applicable(tmp_path: Path) -> None:
    candidate = Student(fp32_candidate(tmp_path))
    texts = ["book a table for two", "what did I say yesterday", "hello there"] * 200
    seen: list[int] = []
    golden = golden_from_labelled(
        texts,
        ["en"] * len(texts),
        np.full(len(texts), -1),
        Teacher(candidate),
        tmp_path,
        on_progress=seen.append,
    )
    assert sum(seen) == len(texts) and len(seen) > 1  # progress in chunks, for the bar
    report = measure(candidate, golden)
    assert math.isnan(report.int8_parity)  # not the 1.0000 of FP32 compared with itself
    assert report.int8_parity_source.startswith("n/a: FP32 served") and "99.47%" in report.int8_parity_source
    current = measure(Student(MODELS_DIR / "student"), golden)
    check = next(c for c in decide(report, current, golden, Thresholds()).checks if c.name == "int8_parity")
    assert check.passed  # nothing quantised to judge; its cost shows in the latency check


def test_train_says_on_the_console_when_it_falls_back_to_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    card = {
        "version": "cnn-x",
        "int8": {"parity": {"label_agreement": 0.9947}, "min_agreement": 0.995, "shipped": False},
        "sizes_bytes": {"model.onnx": 57_000_000},
    }
    say_quantisation(card)
    err = capsys.readouterr().err
    assert "FP32 FALLBACK" in err and "99.47%" in err and "99.5%" in err and "57.0 MB" in err
    card["int8"] = {"parity": {"label_agreement": 0.9961}, "min_agreement": 0.995, "shipped": True}
    say_quantisation(card)
    assert "model.onnx is INT8" in capsys.readouterr().err
