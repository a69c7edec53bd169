"""The JSON Schemas in schemas/ and the Python types in worker/schemas.py agree."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from worker.config import REPO_ROOT
from worker.errors import BadInput
from worker.schemas import (
    MAX_TEXT_CHARS,
    BufferSample,
    DeadLetter,
    DeadLetterStage,
    Intent,
    SampleReason,
    Utterance,
)

Record = Utterance | Intent | DeadLetter | BufferSample
SCHEMAS_DIR = REPO_ROOT / "schemas"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS_DIR / f"{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["title"] == name
    return Draft202012Validator(schema)


def examples() -> list[Record]:
    utterance = Utterance(
        id="u-1",
        text="réveille-moi à 7 heures",
        locale="fr-FR",
        timestamp=1.7e9,
        metadata={"device": "kitchen"},
    )
    return [
        utterance,
        Utterance(id="u-2", text="hi"),
        Intent(
            id="u-1",
            label="alarm_set",
            scores={"alarm_set": 0.9, "weather_query": 0.1},
            model_version="student-3",
            locale="fr-FR",
            latency_ms=3.5,
            timestamp=1.7e9,
            label_set="intents-3@1decba78354a",
        ),
        Intent(
            id="u-2", label="x", scores={"x": 1.0}, model_version="v", locale=None, latency_ms=0, timestamp=0
        ),
        DeadLetter.from_failure(
            original=b"\xff not json",
            key=b"k",
            topic="utterances",
            partition=3,
            offset=42,
            stage=DeadLetterStage.DECODE,
            error=BadInput("utterance: not valid UTF-8"),
            timestamp=1.7e9,
            max_original_bytes=1024,
        ),
        BufferSample(
            id="u-1",
            text="réveille-moi à 7 heures",
            locale=None,
            label="alarm_set",
            logits=(2.5, -1.25),
            scores={"alarm_set": 0.9, "weather_query": 0.1},
            margin=0.8,
            model_version="student-3",
            stratum="und|alarm_set",
            reason=SampleReason.UNCERTAIN,
            sampling_probability=0.25,
            weight=4.0,
            timestamp=1.7e9,
        ),
    ]


def decoder(record: Record) -> Callable[[bytes], Record]:
    return type(record).from_json_bytes


@pytest.mark.parametrize("record", examples(), ids=lambda r: f"{r.SCHEMA}")
def test_python_records_validate_and_round_trip(record: Record) -> None:
    encoded = record.to_json_bytes()
    document = json.loads(encoded)
    assert document["schema_version"] == 1
    errors = [e.message for e in validator(record.SCHEMA).iter_errors(document)]
    assert errors == []
    assert decoder(record)(encoded) == record


@pytest.mark.parametrize("record", examples(), ids=lambda r: f"{r.SCHEMA}")
def test_fields_and_required_sets_match(record: Record) -> None:
    schema = validator(record.SCHEMA).schema
    fields = {f.name for f in dataclasses.fields(record)}
    assert set(schema["properties"]) == fields
    if isinstance(record, Utterance):  # what producers must send: the fields without defaults
        no_default = {
            f.name
            for f in dataclasses.fields(record)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        assert set(schema["required"]) == no_default == {"id", "text"}
    else:  # what the worker writes: every field, always (optional: fields added to v1 compatibly)
        assert (
            set(schema["required"]) | ADDED_IN_V1.get(record.SCHEMA, set()) == fields == set(record.to_dict())
        )


#: Fields added to a v1 schema after its release: optional, so earlier records stay valid.
ADDED_IN_V1 = {
    "dead_letter.v1": {
        "original_key_size",
        "original_key_truncated",
        "error_message_size",
        "error_message_truncated",
        "reason",
    },
    "intent.v1": {"label_set"},
}


def full_document(record: Record) -> dict[str, Any]:
    document = json.loads(record.to_json_bytes())
    return {name: document.get(name) for name in validator(record.SCHEMA).schema["properties"]}


def pairs() -> list[tuple[Record, str]]:
    return [
        (record, name) for record in examples()[::2] for name in validator(record.SCHEMA).schema["properties"]
    ]


@pytest.mark.parametrize(("record", "field"), pairs(), ids=lambda x: x if isinstance(x, str) else x.SCHEMA)
def test_a_missing_required_field_is_rejected_by_both(record: Record, field: str) -> None:
    document = full_document(record)
    del document[field]
    schema_ok = validator(record.SCHEMA).is_valid(document)
    required = field in validator(record.SCHEMA).schema["required"]
    assert schema_ok is not required
    if required:
        with pytest.raises(BadInput, match=f"field '{field}' is missing"):
            decoder(record)(json.dumps(document).encode())
    else:
        decoder(record)(json.dumps(document).encode())


@pytest.mark.parametrize(("record", "field"), pairs(), ids=lambda x: x if isinstance(x, str) else x.SCHEMA)
def test_a_wrongly_typed_field_is_rejected_by_both(record: Record, field: str) -> None:
    document = full_document(record)
    document[field] = [[True]]  # no field of any schema accepts an array of arrays
    assert not validator(record.SCHEMA).is_valid(document)
    with pytest.raises(BadInput, match=f"{record.SCHEMA}: field '{field}'"):
        decoder(record)(json.dumps(document).encode())


def utterance_json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


BAD_JSON_UTTERANCES = [
    ("array", b'[{"id": "a", "text": "hi"}]', "JSON array where an object was expected"),
    ("string", b'"book a table"', "JSON string where an object was expected"),
    ("null", b"null", "JSON null where an object was expected"),
    ("no id", utterance_json(text="hi"), "field 'id' is missing"),
    ("null id", utterance_json(id=None, text="hi"), "field 'id' is null"),
    ("int id", utterance_json(id=7, text="hi"), "field 'id' must be a string, not number"),
    ("empty id", utterance_json(id="", text="hi"), "field 'id' is empty"),
    ("no text", utterance_json(id="a"), "field 'text' is missing"),
    ("null text", utterance_json(id="a", text=None), "field 'text' is null"),
    ("int text", utterance_json(id="a", text=42), "field 'text' must be a string, not number"),
    ("list text", utterance_json(id="a", text=["hi"]), "field 'text' must be a string, not array"),
    ("bool text", utterance_json(id="a", text=True), "field 'text' must be a string, not boolean"),
    ("empty text", utterance_json(id="a", text=""), "field 'text' is empty"),
    ("blank text", utterance_json(id="a", text=" \t\n\u3000 "), "field 'text' is whitespace only"),
    (
        "long text",
        utterance_json(id="a", text="x" * (MAX_TEXT_CHARS + 1)),
        f"field 'text' has {MAX_TEXT_CHARS + 1} characters, more than the {MAX_TEXT_CHARS} allowed",
    ),
    ("1 MB text", utterance_json(id="a", text="y" * 1_000_000), "field 'text' has 1000000 characters"),
    ("int locale", utterance_json(id="a", text="hi", locale=5), "field 'locale' must be a string"),
    (
        "text timestamp",
        utterance_json(id="a", text="hi", timestamp="now"),
        "field 'timestamp' must be a number",
    ),
    (
        "negative timestamp",
        utterance_json(id="a", text="hi", timestamp=-1),
        "field 'timestamp' is -1.0, below 0",
    ),
    ("list metadata", utterance_json(id="a", text="hi", metadata=[1]), "field 'metadata' must be an object"),
    ("version 2", utterance_json(schema_version=2, id="a", text="hi"), "field 'schema_version' is 2"),
    (
        "version true",
        utterance_json(schema_version=True, id="a", text="hi"),
        "field 'schema_version' is True",
    ),
]


@pytest.mark.parametrize(
    ("case", "raw", "reason"), BAD_JSON_UTTERANCES, ids=[c[0] for c in BAD_JSON_UTTERANCES]
)
def test_bad_utterances_are_rejected_by_both(case: str, raw: bytes, reason: str) -> None:
    assert not validator("utterance.v1").is_valid(json.loads(raw))
    with pytest.raises(BadInput, match=f"^utterance.v1: .*{reason}"):
        Utterance.from_json_bytes(raw)


UNDECODABLE = [
    (
        "latin-1",
        '{"id": "a", "text": "caf\xe9"}'.encode("latin-1"),
        "not valid UTF-8 (invalid continuation byte",
    ),
    ("binary", b"\xff\xfe\x00garbage", "not valid UTF-8 (invalid start byte at byte 0)"),
    ("truncated", b'{"id": "a", "text": "hi"', "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("NaN", b'{"id": "a", "text": "hi", "timestamp": NaN}', "non-standard JSON constant NaN"),
    ("deep", b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ("huge int", b'{"id": "a", "text": "hi", "timestamp": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ("lone surrogate", b'{"id": "a", "text": "hi \\ud800"}', "field 'text' holds an unpaired surrogate"),
    ("inf", b'{"id": "a", "text": "hi", "timestamp": 1e999}', "field 'timestamp' is not finite"),
]


@pytest.mark.parametrize(("case", "raw", "reason"), UNDECODABLE, ids=[c[0] for c in UNDECODABLE])
def test_undecodable_utterances_raise_bad_input(case: str, raw: bytes, reason: str) -> None:
    """Inputs a JSON Schema cannot even see (or cannot express) are still a precise BadInput."""
    with pytest.raises(BadInput, match=re.escape(reason)):
        Utterance.from_json_bytes(raw)


def test_unknown_fields_are_ignored_and_optional_fields_default() -> None:
    raw = utterance_json(id="a", text="book a table", colour="red", locale="", nested={"x": [1]})
    assert validator("utterance.v1").is_valid(json.loads(raw))
    utterance = Utterance.from_json_bytes(raw)
    assert utterance == Utterance(id="a", text="book a table")
    assert utterance.locale is None and utterance.metadata == {} and utterance.schema_version == 1


def test_intents_from_before_label_sets_still_read() -> None:
    record = Intent("u", "Action", {"Action": 1.0}, "v", None, 1.0, 2.0, label_set="x@1").to_dict()
    del record["label_set"]
    assert validator("intent.v1").is_valid(record)
    assert Intent.from_json_bytes(json.dumps(record).encode()).label_set is None


def test_the_text_limit_is_configurable() -> None:
    raw = utterance_json(id="a", text="123456")
    assert Utterance.from_json_bytes(raw, max_text_chars=6).text == "123456"
    with pytest.raises(BadInput, match="6 characters, more than the 5 allowed"):
        Utterance.from_json_bytes(raw, max_text_chars=5)


def test_dead_letters_keep_the_original_bytes_or_flag_a_prefix() -> None:
    original = bytes(range(256)) * 4
    common: dict[str, Any] = {
        "key": None,
        "topic": "utterances",
        "partition": 0,
        "offset": 7,
        "stage": DeadLetterStage.DECODE,
        "error": BadInput("utterance.v1: not valid UTF-8"),
        "timestamp": 1.0,
    }
    whole = DeadLetter.from_failure(original=original, max_original_bytes=4096, **common)
    assert whole.original() == original and not whole.original_truncated
    assert (whole.error_type, whole.original_key_base64) == ("BadInput", None)
    prefix = DeadLetter.from_failure(original=original, max_original_bytes=100, **common)
    assert prefix.original() == original[:100]
    assert prefix.original_truncated and prefix.original_size == len(original)
    assert DeadLetter.from_json_bytes(prefix.to_json_bytes()) == prefix
