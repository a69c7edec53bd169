"""Reading labelled JSONL and mapping intents to labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.data.corpora import IntentMapping, load_labelled, require_shared_data
from worker.errors import DataError
from worker.loop.seeding import rows_from_files


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def mapping(tmp_path: Path) -> IntentMapping:
    raw = {
        "_doc": "ignored",
        "alarm_set": ["Action", False, "r"],
        "alarm_query": ["Recall", False, "r"],
        "chitchat": ["Other", True, "r"],
    }
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(raw))
    return IntentMapping.from_files([path])


def test_mapping_files_merge_and_skip_doc_keys(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"_doc": "x", "play": ["Action", False, "why"]}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"PlayMusic": ["Action", False, "why"], "greet": ["Other", True, "why"]}))
    merged = IntentMapping.from_files([a, b])
    assert merged.entries == {
        "play": ("Action", False),
        "PlayMusic": ("Action", False),
        "greet": ("Other", True),
    }
    assert merged.labels == ("Action", "Other")


def test_load_labelled_filters_split_and_maps(tmp_path: Path, mapping: IntentMapping) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        [
            {"id": "1", "locale": "en", "text": "wake me up", "intent": "alarm_set", "split": "train"},
            {"id": "2", "locale": "en", "text": "my alarms?", "intent": "alarm_query", "split": "validation"},
            {"id": "3", "locale": "de", "text": "hallo", "intent": "chitchat", "split": "validation"},
            {"id": "4", "locale": "fr", "text": "salut", "label": "Other", "split": "validation"},
        ],
    )
    data = load_labelled([path], mapping, split="validation")
    assert data.ids == ["2", "3", "4"]
    assert data.labels == ["Recall", "Other", "Other"]
    assert data.ambiguous == [False, True, False]
    assert data.gold(("Action", "Other", "Recall")).tolist() == [2, 1, 1]
    assert data.subset([True, False, True]).ids == ["2", "4"]


def test_unmapped_intent_and_bad_rows_are_data_errors(tmp_path: Path, mapping: IntentMapping) -> None:
    unmapped = _write(tmp_path / "u.jsonl", [{"id": "9", "text": "x", "intent": "nope"}])
    with pytest.raises(DataError, match="intent 'nope' with no mapping"):
        load_labelled([unmapped], mapping, split=None)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok", "label": "Other"}\n{not json\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: invalid JSON"):
        load_labelled([broken], mapping, split=None)
    with pytest.raises(DataError, match="does not exist"):
        load_labelled([tmp_path / "missing.jsonl"], mapping, split=None)


def test_missing_shared_data_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="INTENT_SHARED_DATA_DIR"):
        require_shared_data(tmp_path)


def test_rows_from_files_takes_at_most_per_file_rows_of_each_file(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"id": f"{name}{i}", "locale": name, "text": f"t{i}", "en": "x"}) + "\n"
                for i in range(5)
            )
        )
    rows = list(rows_from_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], None, True, per_file=2))
    assert [r.id for r in rows] == ["a0", "a0:en", "a1", "a1:en", "b0", "b0:en", "b1", "b1:en"]


def test_rows_from_files_skips_the_rows_an_earlier_per_file_took(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{i}", "locale": "a", "text": f"t{i}"}) + "\n" for i in range(5))
    )
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "b0", "locale": "b", "text": "t"}) + "\n")
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    first = [r.id for r in rows_from_files(paths, None, False, per_file=2)]
    rest = [r.id for r in rows_from_files(paths, None, False, per_file=2, skip_per_file=2)]
    assert first == ["a0", "a1", "b0"]
    assert rest == ["a2", "a3"]
