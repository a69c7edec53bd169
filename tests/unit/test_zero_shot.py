"""Label-set files (schema and Python type agree) and the zero-shot teacher's scoring."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from jsonschema import Draft202012Validator, ValidationError

from worker.config import MODELS_DIR, REPO_ROOT
from worker.errors import BadInput, ModelError
from worker.models.onnx import label_names_id as names_id
from worker.teacher.label_set import DEFAULT_TEMPLATE, LabelSet
from worker.teacher.zero_shot import PASSAGE, QUERY, Pooling, ZeroShotConfig, ZeroShotTeacher

SCHEMA = json.loads((REPO_ROOT / "schemas" / "label_set.v1.json").read_text())
SHIPPED = sorted((MODELS_DIR / "labels").glob("*.json"))


def _doc(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema_version": 1,
        "name": "tiny",
        "labels": [
            {"name": "Action", "descriptions": ["do something"], "examples": ["turn on the lights"]},
            {
                "name": "Other",
                "descriptions": ["chat"],
                "hypothesis_templates": ["It is {label}: {description}."],
            },
        ],
    }
    doc.update(extra)
    return doc


def test_the_schema_is_valid_json_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_label_sets_follow_the_schema_and_round_trip(path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator(SCHEMA).validate(doc)
    label_set = LabelSet.from_file(path)
    assert label_set.to_json() == doc
    assert label_set.id == f"{doc['name']}@{label_set.sha256[:12]}"


def test_the_shipped_sets_are_the_ones_the_benchmark_reports() -> None:
    names = {LabelSet.from_file(p).name: LabelSet.from_file(p) for p in SHIPPED}
    assert names["intents-3"].names == names["intents-3-examples"].names == ("Action", "Other", "Recall")
    assert all(len(label.examples) == 5 for label in names["intents-3-examples"].labels)
    assert len(names["massive-scenarios"].names) == 18


BAD = {
    "missing_name": ({"name": None}, "name"),
    "bad_name": ({"name": "has space"}, "name"),
    "schema_version": ({"schema_version": 2}, "schema_version"),
    "one_label": ({"labels": [{"name": "A", "descriptions": ["a"]}]}, "at least 2"),
    "no_descriptions": ({"labels": [{"name": "A"}, {"name": "B", "descriptions": ["b"]}]}, "descriptions"),
    "empty_examples": (
        {
            "labels": [
                {"name": "A", "descriptions": ["a"], "examples": []},
                {"name": "B", "descriptions": ["b"]},
            ]
        },
        "examples",
    ),
    "empty_text": (
        {"labels": [{"name": "A", "descriptions": [""]}, {"name": "B", "descriptions": ["b"]}]},
        "descriptions",
    ),
    "unknown_field": ({"labells": []}, "unknown fields"),
    "unknown_label_field": (
        {
            "labels": [
                {"name": "A", "descriptions": ["a"], "exmaples": ["x"]},
                {"name": "B", "descriptions": ["b"]},
            ]
        },
        "unknown fields",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_documents_are_rejected_by_both_schema_and_type(case: str) -> None:
    change, message = BAD[case]
    doc = {k: v for k, v in _doc(**change).items() if v is not None}
    with pytest.raises(ValidationError):
        Draft202012Validator(SCHEMA).validate(doc)
    with pytest.raises(ModelError, match=message):
        LabelSet.from_json(doc, "test.json")


def test_rules_the_schema_cannot_state_are_the_type_s() -> None:
    repeated = _doc(labels=[{"name": "A", "descriptions": ["a"]}, {"name": "A", "descriptions": ["b"]}])
    Draft202012Validator(SCHEMA).validate(repeated)  # uniqueness of a field is beyond JSON Schema
    with pytest.raises(ModelError, match="repeated"):
        LabelSet.from_json(repeated)
    for template in ("It is {name}.", "It is {label", "{}"):
        with pytest.raises(ModelError, match="template"):
            LabelSet.from_json(_doc(hypothesis_templates=[template]))


def test_optional_fields_have_their_defaults() -> None:
    label_set = LabelSet.from_json(_doc())
    action, other = label_set.labels
    assert action.examples == ("turn on the lights",) and other.examples == ()
    assert label_set.hypotheses(action) == (DEFAULT_TEMPLATE.format(label="Action"),)
    assert label_set.hypotheses(other) == ("It is Other: chat.",)
    with_default = LabelSet.from_json(_doc(hypothesis_templates=["About {description}."]))
    assert with_default.hypotheses(with_default.labels[0]) == ("About do something.",)


def test_the_id_hashes_content_not_layout() -> None:
    a = LabelSet.from_json(_doc())
    reordered_keys = json.loads(json.dumps(_doc(), sort_keys=True))
    assert LabelSet.from_json(reordered_keys).id == a.id
    changed = _doc()
    changed["labels"][0]["descriptions"] = ["do something else"]  # type: ignore[index]
    assert LabelSet.from_json(changed).id != a.id
    assert a.id.startswith("tiny@") and len(a.id) == len("tiny@") + 12
    assert names_id(["Action", "Other"]) == names_id(["Other", "Action"]) != names_id(["Action", "Recall"])


class TwinEncoder:
    """Embeds a text by the topic words it holds, remembering what it was asked."""

    AXES: ClassVar[dict[str, int]] = {
        "light": 0,
        "lamp": 0,
        "my": 1,
        "calendar": 1,
        "hello": 2,
        "joke": 2,
        "query:": 3,
        "passage:": 4,
    }

    def __init__(self) -> None:
        self.seen: list[str] = []

    def run(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.seen += list(texts)
        out = np.full((len(texts), 6), 0.01, dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                if word in self.AXES:
                    out[i, self.AXES[word]] += 1.0
        normalised: npt.NDArray[np.float32] = out / np.linalg.norm(out, axis=1, keepdims=True)
        return normalised


def _three() -> LabelSet:
    return LabelSet.from_json(
        {
            "schema_version": 1,
            "name": "three",
            "labels": [
                {"name": "Action", "descriptions": ["light"], "examples": ["lamp", "light lamp"]},
                {"name": "Recall", "descriptions": ["my calendar"]},
                {"name": "Other", "descriptions": ["hello", "joke"]},
            ],
        }
    )


def test_zero_shot_scores_follow_the_label_set() -> None:
    encoder = TwinEncoder()
    teacher = ZeroShotTeacher(encoder, _three(), encoder_key="k" * 20)
    logits = teacher.logits(["switch the light", "my calendar please", "tell a joke", "hello"])
    assert [teacher.labels[i] for i in logits.argmax(axis=1)] == ["Action", "Recall", "Other", "Other"]
    np.testing.assert_allclose(logits.mean(axis=1), 0, atol=1e-5)
    assert teacher.label_set_id == _three().id
    # Utterances and descriptions take "passage: ", examples "query: " (the measured default).
    assert "passage: light" in encoder.seen and "query: lamp" in encoder.seen
    assert "passage: switch the light" in encoder.seen


def test_logits_are_pooled_cosines_over_the_temperature() -> None:
    encoder = TwinEncoder()
    config = ZeroShotConfig(utterance_prefix=QUERY, description_prefix=QUERY, pooling=Pooling.MAX)
    teacher = ZeroShotTeacher(encoder, _three(), encoder_key="k", config=config)
    u = encoder.run(["query: hello"])
    protos = {
        "Action": [encoder.run(["query: light"])[0]],
        "Recall": [encoder.run(["query: my calendar"])[0]],
        "Other": [encoder.run(["query: hello"])[0], encoder.run(["query: joke"])[0]],
    }
    examples = encoder.run(["query: lamp", "query: light lamp"]).mean(axis=0)
    protos["Action"].append(examples / np.linalg.norm(examples))
    expected = np.array([max(float(u[0] @ p) for p in protos[name]) for name in teacher.labels]) / 0.01
    np.testing.assert_allclose(teacher.logits(["hello"])[0], expected - expected.mean(), rtol=1e-4)


def test_lse_pooling_does_not_favour_labels_with_more_prototypes() -> None:
    label_set = LabelSet.from_json(
        {
            "schema_version": 1,
            "name": "dup",
            "labels": [
                {"name": "A", "descriptions": ["light"]},
                {"name": "B", "descriptions": ["light", "light", "light"]},
            ],
        }
    )
    logits = ZeroShotTeacher(TwinEncoder(), label_set, encoder_key="k").logits(["the light"])
    np.testing.assert_allclose(logits, 0, atol=1e-4)


def test_identity_covers_encoder_label_set_and_arrangement() -> None:
    a = ZeroShotTeacher(TwinEncoder(), _three(), encoder_key="aaaaaaaa")
    b = ZeroShotTeacher(TwinEncoder(), _three(), encoder_key="bbbbbbbb")
    c = ZeroShotTeacher(
        TwinEncoder(), _three(), encoder_key="aaaaaaaa", config=ZeroShotConfig(temperature=0.02)
    )
    other = LabelSet.from_json(_doc())
    d = ZeroShotTeacher(TwinEncoder(), other, encoder_key="aaaaaaaa")
    assert len({a.identity, b.identity, c.identity, d.identity}) == 4


def test_inputs_are_checked_and_chunks_stream() -> None:
    teacher = ZeroShotTeacher(TwinEncoder(), _three(), encoder_key="k")
    with pytest.raises(BadInput):
        teacher.logits([b"bytes"])  # type: ignore[list-item]
    chunks = list(teacher.iter_logits(iter(["light", "hello", "my", ""]), chunk_size=3))
    assert [c.shape for c in chunks] == [(3, 3), (1, 3)]
    assert ZeroShotConfig().utterance_prefix == PASSAGE
