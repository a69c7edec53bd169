"""The shipped student serves every language the product promises: a small fixture of clear
requests, written by us (tests/data/multilingual_smoke.jsonl: three Action, three Recall and
three Other utterances in each of the 18 served languages), labelled as the teacher labels it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from worker.config import Settings
from worker.models.student import Student
from worker.teacher import OnnxTeacher

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "multilingual_smoke.jsonl"


def test_the_fixture_covers_every_served_language_and_label(settings: Settings) -> None:
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    cells = {(row["locale"], row["label"]) for row in rows}
    assert {lang for lang, _ in cells} == set(settings.served_languages)
    assert len(cells) == 3 * len(settings.served_languages)


def _agreement(teacher: OnnxTeacher, student: Path) -> tuple[float, dict[str, str]]:
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    texts = [row["text"] for row in rows]
    agree = np.argmax(teacher.logits(texts), 1) == np.argmax(Student(student).logits(texts), 1)
    by_language: dict[str, list[bool]] = defaultdict(list)
    for row, same in zip(rows, agree, strict=True):
        by_language[row["locale"]].append(bool(same))
    return float(agree.mean()), {lang: f"{sum(v)}/{len(v)}" for lang, v in sorted(by_language.items())}


def test_the_shipped_student_keeps_its_measured_agreement_on_clear_requests_in_every_language(
    embedded_teacher: OnnxTeacher, student: Path
) -> None:
    # 83% (135/162) for cnn-39ada50ce1, trained with our alarm and reminder templates, whose
    # phrasing is close to this fixture's alarm rows, so part of the gain is not independent;
    # 78% (127/162) for cnn-79ce0ab44f before it (125 for cnn-5b1833b2fa, 124 for cnn-17f196dba1),
    # 62% for the English-centred cnn-19ba3b4c6c: a regression guard while the target below is
    # not met.
    agreement, report = _agreement(embedded_teacher, student)
    assert agreement >= 0.80, f"agreement {agreement:.1%} per language: {report}"


@pytest.mark.xfail(
    reason="issue 12 target not met yet: the shipped student agrees with the teacher on 83% of the fixture",
    strict=True,
)
def test_the_shipped_student_agrees_with_the_teacher_on_90_percent_of_clear_requests(
    embedded_teacher: OnnxTeacher, student: Path
) -> None:
    agreement, report = _agreement(embedded_teacher, student)
    assert agreement >= 0.90, f"agreement {agreement:.1%} per language: {report}"
