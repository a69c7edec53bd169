"""A label-set change flows through datasets, training inputs and student cards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from worker.config import MODELS_DIR
from worker.errors import DataError, ModelError
from worker.loop.dataset import DatasetWriter, ShardRows, read_manifest
from worker.loop.label_sets import common_label_set, manifest_label_set
from worker.models.onnx import label_names_id
from worker.models.student import Student
from worker.stream.app import LabelContract, check_label_set

LABELS = ("Action", "Other", "Recall")


def _rows(n: int) -> ShardRows:
    return ShardRows(
        ids=[f"u{i}" for i in range(n)],
        texts=["set an alarm"] * n,
        locales=["en"] * n,
        teacher_logits=[np.zeros(3, np.float32)] * n,
        teacher_labels=["Action"] * n,
    )


def test_datasets_are_tagged_with_the_label_set_and_keep_to_it(tmp_path: Path) -> None:
    DatasetWriter(tmp_path / "a", "zs@1", LABELS, label_set="intents-3@aaaaaaaaaaaa").write_shard(
        "s", _rows(2)
    )
    assert read_manifest(tmp_path / "a")["teacher"]["label_set"] == "intents-3@aaaaaaaaaaaa"
    with pytest.raises(DataError, match="holds label set intents-3@aaaaaaaaaaaa, not intents-3@bbbbbbbbbbbb"):
        DatasetWriter(tmp_path / "a", "zs@1", LABELS, label_set="intents-3@bbbbbbbbbbbb")
    reopened = DatasetWriter(tmp_path / "a", "zs@1", LABELS, label_set="intents-3@aaaaaaaaaaaa")
    assert reopened.write_shard("t", _rows(1)).rows == 1
    DatasetWriter(tmp_path / "b", "head@1", LABELS)  # no label-set file: the names are the set
    assert read_manifest(tmp_path / "b")["teacher"]["label_set"] == label_names_id(LABELS)


def test_manifests_older_than_label_sets_mean_their_label_names(tmp_path: Path) -> None:
    DatasetWriter(tmp_path / "old", "head@1", LABELS).write_shard("s", _rows(1))
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["teacher"]["label_set"]
    path.write_text(json.dumps(manifest))
    assert manifest_label_set(read_manifest(tmp_path / "old")) == label_names_id(LABELS)
    assert DatasetWriter(tmp_path / "old", "head@1", LABELS).write_shard("t", _rows(1)).rows == 1


def test_training_inputs_must_share_one_label_set(tmp_path: Path) -> None:
    for name, label_set in (("a", "x@1"), ("b", "x@1"), ("c", "y@2")):
        DatasetWriter(tmp_path / name, "t@1", LABELS, label_set=label_set)
    manifests = {name: read_manifest(tmp_path / name) for name in "abc"}
    assert common_label_set({k: manifests[k] for k in "ab"}) == ("x@1", LABELS)
    with pytest.raises(DataError, match="different label sets"):
        common_label_set(manifests)
    DatasetWriter(tmp_path / "d", "t@1", ("Other", "Action", "Recall"), label_set="x@1")
    with pytest.raises(DataError, match="order their labels differently"):
        common_label_set({"a": manifests["a"], "d": read_manifest(tmp_path / "d")})


def _student_copy(tmp_path: Path, **card_changes: object) -> Path:
    directory = tmp_path / "student"
    shutil.copytree(MODELS_DIR / "student", directory)
    card = json.loads((directory / "card.json").read_text())
    card.update(card_changes)
    (directory / "card.json").write_text(json.dumps(card))
    return directory


def test_a_student_s_label_set_comes_from_its_card(tmp_path: Path) -> None:
    labels = json.loads((MODELS_DIR / "student" / "labels.json").read_text())
    assert Student(MODELS_DIR / "student").label_set == label_names_id(labels)
    declared = Student(_student_copy(tmp_path, label_set="intents-3@abc", labels=labels))
    assert declared.label_set == "intents-3@abc"


def test_labels_that_contradict_the_declared_label_set_are_refused(tmp_path: Path) -> None:
    directory = _student_copy(tmp_path, label_set="intents-3@abc", labels=["Action", "Other", "Purchase"])
    with pytest.raises(ModelError, match=r"contradicts card\.json"):
        Student(directory)


def _relabelled(tmp_path: Path, name: str, labels: list[str], label_set: str | None) -> Student:
    directory = tmp_path / name
    shutil.copytree(MODELS_DIR / "student", directory)
    (directory / "labels.json").write_text(json.dumps(labels))
    card = json.loads((directory / "card.json").read_text())
    card.update(labels=labels, version=name)
    if label_set is not None:
        card["label_set"] = label_set
    (directory / "card.json").write_text(json.dumps(card))
    return Student(directory)


def test_the_worker_accepts_a_declared_new_label_set_and_refuses_a_broken_one(tmp_path: Path) -> None:
    three, other_three = ["Action", "Other", "Recall"], ["Action", "Other", "Purchase"]
    legacy = LabelContract.of(Student(MODELS_DIR / "student"))
    # Students older than label sets: the names are the contract, as before.
    with pytest.raises(ModelError, match="has labels"):
        check_label_set(_relabelled(tmp_path, "legacy-renamed", other_three, None), legacy)
    check_label_set(_relabelled(tmp_path, "legacy-same", three, None), legacy)
    # A card that names another label set is a deliberate change (the gate asked for it).
    new = _relabelled(tmp_path, "new", other_three, "routes@bbbbbbbbbbbb")
    check_label_set(new, legacy)
    # And back again: a rollback to the old student from the new label set.
    check_label_set(Student(MODELS_DIR / "student"), LabelContract.of(new))
    # One label set with other names is a broken model.
    broken = _relabelled(tmp_path, "broken", three, "routes@bbbbbbbbbbbb")
    with pytest.raises(ModelError, match="in the same label set routes@bbbbbbbbbbbb"):
        check_label_set(broken, LabelContract.of(new))
