"""A cascade model directory: the first student answers when sure, the second scores the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from constant_student import CONSTANT, constant_student

from worker.cli import main
from worker.config import MODELS_DIR
from worker.errors import ModelError
from worker.models.registry import Registry
from worker.models.student import Student, _margins

TEXTS = ["set an alarm for seven", "what did I buy last week", "hello there", "明天早上七点叫我起床", "ok"]


def build(tmp_path: Path, below: float, name: str = "cascade") -> Path:
    second = tmp_path / "second-src"
    if not second.exists():
        constant_student(second, CONSTANT)
    out = tmp_path / name
    code = main(
        [
            "cascade",
            str(MODELS_DIR / "student"),
            str(second),
            "--escalate-below",
            str(below),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.mark.parametrize("below", [0.0, 0.5, 1.01])
def test_uncertain_utterances_and_only_those_escalate(tmp_path: Path, below: float) -> None:
    first = Student(MODELS_DIR / "student")
    own = first.logits(TEXTS)
    cascade = Student(build(tmp_path, below))
    got = cascade.logits(TEXTS)
    up = _margins(own) < below
    np.testing.assert_allclose(got[~up], own[~up], atol=1e-6)
    np.testing.assert_allclose(got[up], np.tile(CONSTANT, (int(up.sum()), 1)), atol=1e-6)
    assert cascade.escalated == int(up.sum()) and cascade.scored == len(TEXTS)
    one = cascade.logits([TEXTS[0]])  # the single-utterance path escalates the same way
    np.testing.assert_allclose(one[0], got[0], atol=1e-5)


def test_card_names_both_students_and_the_threshold(tmp_path: Path) -> None:
    card = json.loads((build(tmp_path, 0.3) / "card.json").read_text())
    assert card["version"].startswith("cascade-")
    assert card["cascade"]["second"] == "second"
    assert card["cascade"]["escalate_below_margin"] == 0.3
    assert card["cascade"]["first_version"] == Student(MODELS_DIR / "student").version
    assert card["cascade"]["second_version"] == "constant-1"


def test_the_registry_keeps_the_second_student(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    release = registry.add(build(tmp_path, 1.01))
    served = Student(registry.directory(release))
    np.testing.assert_allclose(served.logits(TEXTS), np.tile(CONSTANT, (len(TEXTS), 1)), atol=1e-6)


def test_broken_cascades_are_refused(tmp_path: Path) -> None:
    directory = build(tmp_path, 0.2)
    card = json.loads((directory / "card.json").read_text())
    for bad in (
        {"second": "missing", "escalate_below_margin": 0.2},
        {"second": "second", "escalate_below_margin": 2.0},
        {"second": "../second-src", "escalate_below_margin": 0.2},
        "second",
    ):
        (directory / "card.json").write_text(json.dumps({**card, "cascade": bad}))
        with pytest.raises(ModelError):
            Student(directory)


def test_cascade_command_refuses_a_bad_margin(tmp_path: Path) -> None:
    second = constant_student(tmp_path / "second-src", CONSTANT)
    code = main(
        [
            "cascade",
            str(MODELS_DIR / "student"),
            str(second),
            "--escalate-below",
            "3",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and not (tmp_path / "x").exists()


def test_escalations_are_counted_in_the_inference_process_and_on_metrics(tmp_path: Path) -> None:
    from worker.models.student_process import StudentProcess
    from worker.stream.metrics import ModelLoadCollector

    def exposed() -> float:
        family = next(m for m in ModelLoadCollector().collect() if m.name == "intent_worker_escalations")
        return float(family.samples[0].value)

    before_here, before_children, before_metric = Student.escalations, StudentProcess.escalations, exposed()
    process = StudentProcess(build(tmp_path, 1.01), threads=1, rows=2)  # every utterance escalates
    try:
        predictions, _ = process.classify(TEXTS)
        assert {p.label for p in predictions} == {Student(MODELS_DIR / "student").labels[1]}
        process.classify(TEXTS[:2])
    finally:
        process.close()
    assert StudentProcess.escalations - before_children == len(TEXTS) + 2
    assert Student.escalations == before_here  # counted in the child, reported to the parent
    assert exposed() - before_metric == len(TEXTS) + 2
