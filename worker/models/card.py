"""What a student model directory says about itself, read without loading the model.

A model directory holds ``model.onnx``, ``tokenizer.json``, ``labels.json`` and ``card.json``.
:class:`StudentCard` checks that they are there and reads the card and the labels: enough for
the worker to choose, announce and contract-check a model whose ONNX session lives elsewhere
(the inference child process). :class:`worker.models.student.Student` is a card plus the
loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

from worker.errors import ModelError
from worker.models.onnx import label_names_id, read_labels
from worker.models.registry import REQUIRED_FILES


class StudentCard:
    """A model directory's card and labels, checked for consistency."""

    def __init__(self, directory: Path) -> None:
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise ModelError(f"model directory {directory} lacks {', '.join(missing)}")
        self.directory = directory
        try:
            self.card: dict[str, object] = json.loads((directory / "card.json").read_text())
        except ValueError as exc:
            raise ModelError(f"{directory}/card.json is not valid JSON: {exc}") from exc
        self.labels = read_labels(directory / "labels.json")
        declared = self.card.get("label_set")
        if declared is not None and (
            not isinstance(declared, str) or self.card.get("labels") != list(self.labels)
        ):
            # A card that names its label set also lists its labels: labels.json must agree,
            # or the directory is broken (a hand-edited or half-copied label list).
            raise ModelError(
                f"{directory}: labels.json {list(self.labels)} contradicts card.json "
                f"(label_set {declared!r}, labels {self.card.get('labels')})"
            )

    @property
    def version(self) -> str:
        return str(self.card.get("version", self.directory.name))

    @property
    def label_set(self) -> str:
        """The label set the student was distilled on: its card's ``label_set`` (the teacher's
        label-set id), else the id of its label names (students older than label sets)."""
        declared = self.card.get("label_set")
        return declared if isinstance(declared, str) else label_names_id(self.labels)
