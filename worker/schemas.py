"""The Python mirror of ``schemas/*.json``: one frozen type per record, JSON in and out.

Decoding validates (a bad record raises :class:`BadInput` naming the record and the field);
unknown extra fields are ignored. Encoding writes compact UTF-8 JSON with ``schema_version``
first. ``tests/unit/test_schemas.py`` checks that these types and the JSON Schemas agree.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, TypeVar

from worker.errors import BadInput

SCHEMA_VERSION = 1
MAX_TEXT_CHARS = 10_000  # the default of INTENT_MAX_TEXT_CHARS and the schema's maxLength
MAX_ID_CHARS = 256
MAX_LOCALE_CHARS = 35
UNKNOWN_LOCALE = "und"  # BCP 47 for "undetermined": a sample or row without a locale

_Enum = TypeVar("_Enum", bound=StrEnum)


class DeadLetterStage(StrEnum):
    """The step of the pipeline that failed on an input."""

    DECODE = "decode"
    CLASSIFY = "classify"


class SampleReason(StrEnum):
    """Which quota of the sampler kept a sample."""

    STRATUM = "stratum"
    UNCERTAIN = "uncertain"


_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def _dumps(record: Mapping[str, object]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _load_object(raw: bytes, record: str) -> dict[str, object]:
    """Strict UTF-8 JSON object, or a :class:`BadInput` saying precisely what is wrong."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"{record}: not valid UTF-8 ({exc.reason} at byte {exc.start})", reason="not_utf8"
        ) from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:  # the C decoder recurses once per nesting level
        raise BadInput(f"{record}: JSON nested too deeply", reason="not_json") from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers past the digit limit
        raise BadInput(f"{record}: not valid JSON ({exc})", reason="not_json") from exc
    if not isinstance(value, dict):
        raise BadInput(
            f"{record}: JSON {_json_type(value)} where an object was expected", reason="not_object"
        )
    return value


class _Fields:
    """Typed reads of one decoded JSON object; every failure names the record and the field."""

    def __init__(self, record: str, obj: dict[str, object]) -> None:
        self.record = record
        self.obj = obj

    def fail(self, name: str, problem: str, kind: str) -> BadInput:
        """``kind`` is the problem's class; ``<field>_<kind>`` becomes the error's ``reason``."""
        field_name = re.split(r"[.\[]", name, maxsplit=1)[0]  # scores.x and logits[3]: one reason each
        return BadInput(f"{self.record}: field {name!r} {problem}", reason=f"{field_name}_{kind}")

    def _get(self, name: str) -> object:
        if name not in self.obj:
            raise self.fail(name, "is missing", "missing")
        value = self.obj[name]
        if value is None:
            raise self.fail(name, "is null", "null")
        return value

    def version(self, *, required: bool) -> int:
        if not required and self.obj.get("schema_version") is None:
            return SCHEMA_VERSION
        value = self._get("schema_version")
        if isinstance(value, bool) or value != SCHEMA_VERSION:
            raise self.fail(
                "schema_version", f"is {value!r}; this worker reads version {SCHEMA_VERSION}", "unsupported"
            )
        return SCHEMA_VERSION

    def _check_str(self, name: str, value: object, *, max_len: int | None, text: bool) -> str:
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, not {_json_type(value)}", "wrong_type")
        if not value:
            raise self.fail(name, "is empty", "empty")
        if max_len is not None and len(value) > max_len:
            raise self.fail(name, f"has {len(value)} characters, more than the {max_len} allowed", "too_long")
        if text and value.isspace():
            raise self.fail(name, "is whitespace only", "empty")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # "\ud800" is valid JSON but not text
                raise self.fail(
                    name, f"holds an unpaired surrogate at character {exc.start}", "bad_text"
                ) from exc
        return value

    def string(self, name: str, *, max_len: int | None = None, text: bool = False) -> str:
        """A required non-empty string; ``text`` also refuses whitespace only."""
        return self._check_str(name, self._get(name), max_len=max_len, text=text)

    def optional_string(self, name: str, *, max_len: int | None = None) -> str | None:
        """An optional string: absent, null or empty all read as None."""
        value = self.obj.get(name)
        if value is None or value == "":
            return None
        return self._check_str(name, value, max_len=max_len, text=False)

    def nullable_string(self, name: str, *, max_len: int | None = None) -> str | None:
        """A required field that may be null (or empty, read as null)."""
        if name not in self.obj:
            raise self.fail(name, "is missing", "missing")
        return self.optional_string(name, max_len=max_len)

    def number(self, name: str, *, minimum: float | None = 0.0, maximum: float | None = None) -> float:
        return self._check_number(name, self._get(name), minimum, maximum)

    def optional_number(self, name: str, *, minimum: float | None = 0.0) -> float | None:
        value = self.obj.get(name)
        return None if value is None else self._check_number(name, value, minimum, None)

    def _check_number(self, name: str, value: object, minimum: float | None, maximum: float | None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, not {_json_type(value)}", "wrong_type")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(name, "is not finite", "out_of_range")
        if minimum is not None and number < minimum:
            raise self.fail(name, f"is {number}, below {minimum}", "out_of_range")
        if maximum is not None and number > maximum:
            raise self.fail(name, f"is {number}, above {maximum}", "out_of_range")
        return number

    def integer(self, name: str) -> int:
        value = self._get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, not {_json_type(value)}", "wrong_type")
        if value < 0:
            raise self.fail(name, f"is {value}, below 0", "out_of_range")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be a boolean, not {_json_type(value)}", "wrong_type")
        return value

    def scores(self, name: str) -> dict[str, float]:
        value = self._get(name)
        if not isinstance(value, dict) or not value:
            raise self.fail(name, f"must be a non-empty object, not {_json_type(value)}", "wrong_type")
        return {str(k): self._check_number(f"{name}.{k}", v, 0.0, 1.0) for k, v in value.items()}

    def numbers(self, name: str) -> tuple[float, ...]:
        value = self._get(name)
        if not isinstance(value, list) or not value:
            raise self.fail(name, f"must be a non-empty array, not {_json_type(value)}", "wrong_type")
        return tuple(self._check_number(f"{name}[{i}]", v, None, None) for i, v in enumerate(value))

    def metadata(self, name: str) -> dict[str, object]:
        value = self.obj.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, not {_json_type(value)}", "wrong_type")
        return value

    def choice(self, name: str, enum: type[_Enum]) -> _Enum:
        value = self._get(name)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, not {_json_type(value)}", "wrong_type")
        try:
            return enum(value)
        except ValueError as exc:
            allowed = ", ".join(repr(member.value) for member in enum)
            raise self.fail(name, f"is {value!r}, not one of {allowed}", "out_of_range") from exc


@dataclass(frozen=True, slots=True)
class Utterance:
    """``utterance.v1``: one utterance to classify."""

    SCHEMA: ClassVar[str] = "utterance.v1"

    id: str
    text: str
    locale: str | None = None
    timestamp: float | None = None
    metadata: Mapping[str, object] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json_bytes(cls, raw: bytes, *, max_text_chars: int = MAX_TEXT_CHARS) -> Utterance:
        """Decode a record from the ``utterances`` topic; :class:`BadInput` says why one is refused."""
        fields = _Fields(cls.SCHEMA, _load_object(raw, cls.SCHEMA))
        return cls(
            schema_version=fields.version(required=False),
            id=fields.string("id", max_len=MAX_ID_CHARS),
            text=fields.string("text", max_len=max_text_chars, text=True),
            locale=fields.optional_string("locale", max_len=MAX_LOCALE_CHARS),
            timestamp=fields.optional_number("timestamp"),
            metadata=fields.metadata("metadata"),
        )

    def to_dict(self) -> dict[str, object]:
        record: dict[str, object] = {"schema_version": self.schema_version, "id": self.id, "text": self.text}
        if self.locale is not None:
            record["locale"] = self.locale
        if self.timestamp is not None:
            record["timestamp"] = self.timestamp
        if self.metadata:
            record["metadata"] = dict(self.metadata)
        return record

    def to_json_bytes(self) -> bytes:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Intent:
    """``intent.v1``: the student's label for one utterance."""

    SCHEMA: ClassVar[str] = "intent.v1"

    id: str
    label: str
    scores: Mapping[str, float]
    model_version: str
    locale: str | None
    latency_ms: float
    timestamp: float
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> Intent:
        fields = _Fields(cls.SCHEMA, _load_object(raw, cls.SCHEMA))
        return cls(
            schema_version=fields.version(required=True),
            id=fields.string("id", max_len=MAX_ID_CHARS),
            label=fields.string("label"),
            scores=fields.scores("scores"),
            model_version=fields.string("model_version"),
            locale=fields.nullable_string("locale", max_len=MAX_LOCALE_CHARS),
            latency_ms=fields.number("latency_ms"),
            timestamp=fields.number("timestamp"),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "label": self.label,
            "scores": dict(self.scores),
            "model_version": self.model_version,
            "locale": self.locale,
            "latency_ms": self.latency_ms,
            "timestamp": self.timestamp,
        }

    def to_json_bytes(self) -> bytes:
        return _dumps(self.to_dict())


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """``dead_letter.v1``: an input that could not be processed, with its bytes and the reason."""

    SCHEMA: ClassVar[str] = "dead_letter.v1"

    original_base64: str
    original_key_base64: str | None
    original_size: int
    original_truncated: bool
    topic: str
    partition: int
    offset: int
    stage: DeadLetterStage
    error_type: str
    error_message: str
    timestamp: float
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_failure(
        cls,
        *,
        original: bytes | None,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        stage: DeadLetterStage,
        error: BaseException,
        timestamp: float,
        max_original_bytes: int,
    ) -> DeadLetter:
        """The dead letter for ``error`` on the input at ``topic``/``partition``/``offset``.

        Base64 makes the bytes 4/3 larger, so a value longer than ``max_original_bytes`` keeps only
        its prefix (flagged ``original_truncated``): the dead letter must still fit in a Kafka message.
        """
        value = original or b""
        kept = value[:max_original_bytes]
        return cls(
            original_base64=_b64(kept),
            original_key_base64=None if key is None else _b64(key),
            original_size=len(value),
            original_truncated=len(kept) < len(value),
            topic=topic,
            partition=partition,
            offset=offset,
            stage=stage,
            error_type=type(error).__name__,
            error_message=str(error),
            timestamp=timestamp,
        )

    def original(self) -> bytes:
        return base64.b64decode(self.original_base64, validate=True)

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> DeadLetter:
        fields = _Fields(cls.SCHEMA, _load_object(raw, cls.SCHEMA))
        if "original_key_base64" not in fields.obj:
            raise fields.fail("original_key_base64", "is missing", "missing")
        key = fields.obj["original_key_base64"]
        return cls(
            schema_version=fields.version(required=True),
            # May be empty: an empty value is a bad input too.
            original_base64=_plain_string(fields, "original_base64"),
            original_key_base64=None if key is None else _plain_string(fields, "original_key_base64"),
            original_size=fields.integer("original_size"),
            original_truncated=fields.boolean("original_truncated"),
            topic=fields.string("topic"),
            partition=fields.integer("partition"),
            offset=fields.integer("offset"),
            stage=fields.choice("stage", DeadLetterStage),
            error_type=fields.string("error_type"),
            error_message=_plain_string(fields, "error_message"),
            timestamp=fields.number("timestamp"),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "schema_version": self.schema_version,
            "original_base64": self.original_base64,
            "original_key_base64": self.original_key_base64,
            "original_size": self.original_size,
            "original_truncated": self.original_truncated,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "stage": self.stage.value,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "timestamp": self.timestamp,
        }

    def to_json_bytes(self) -> bytes:
        return _dumps(self.to_dict())


def _plain_string(fields: _Fields, name: str) -> str:
    """A required string that may be empty (an exception's message can be)."""
    if name not in fields.obj:
        raise fields.fail(name, "is missing", "missing")
    value = fields.obj[name]
    if not isinstance(value, str):
        raise fields.fail(name, f"must be a string, not {_json_type(value)}", "wrong_type")
    return value


@dataclass(frozen=True, slots=True)
class BufferSample:
    """``buffer_sample.v1``: one sampled utterance in the Redis buffer, with the student's view of it."""

    SCHEMA: ClassVar[str] = "buffer_sample.v1"

    id: str
    text: str
    locale: str | None
    label: str
    logits: tuple[float, ...]
    scores: Mapping[str, float]
    margin: float
    model_version: str
    stratum: str
    reason: SampleReason
    sampling_probability: float
    weight: float
    timestamp: float
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> BufferSample:
        fields = _Fields(cls.SCHEMA, _load_object(raw, cls.SCHEMA))
        return cls(
            schema_version=fields.version(required=True),
            id=fields.string("id", max_len=MAX_ID_CHARS),
            text=fields.string("text", text=True),
            locale=fields.nullable_string("locale", max_len=MAX_LOCALE_CHARS),
            label=fields.string("label"),
            logits=fields.numbers("logits"),
            scores=fields.scores("scores"),
            margin=fields.number("margin", maximum=1.0),
            model_version=fields.string("model_version"),
            stratum=fields.string("stratum"),
            reason=fields.choice("reason", SampleReason),
            sampling_probability=_probability(fields, "sampling_probability"),
            weight=fields.number("weight", minimum=1.0),
            timestamp=fields.number("timestamp"),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "text": self.text,
            "locale": self.locale,
            "label": self.label,
            "logits": list(self.logits),
            "scores": dict(self.scores),
            "margin": self.margin,
            "model_version": self.model_version,
            "stratum": self.stratum,
            "reason": self.reason.value,
            "sampling_probability": self.sampling_probability,
            "weight": self.weight,
            "timestamp": self.timestamp,
        }

    def to_json_bytes(self) -> bytes:
        return _dumps(self.to_dict())


def _probability(fields: _Fields, name: str) -> float:
    value = fields.number(name, maximum=1.0)
    if value <= 0.0:
        raise fields.fail(name, "must be above 0", "out_of_range")
    return value
