"""The Python mirror of ``schemas/*.json``: one frozen type per record, JSON in and out.

Decoding validates (a bad record raises :class:`BadInput` naming the record and the field);
unknown extra fields are ignored. Encoding writes compact UTF-8 JSON with ``schema_version``
first. ``tests/unit/test_schemas.py`` checks that these types and the JSON Schemas agree.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from worker.errors import BadInput
from worker.record_fields import SCHEMA_VERSION, Fields, dumps, json_type, load_object, truncated

MAX_TEXT_CHARS = 10_000  # the default of INTENT_MAX_TEXT_CHARS and the schema's maxLength
MAX_ID_CHARS = 256
MAX_LOCALE_CHARS = 35
UNKNOWN_LOCALE = "und"  # BCP 47 for "undetermined": a sample or row without a locale


class DeadLetterStage(StrEnum):
    """The step of the pipeline that failed on an input."""

    DECODE = "decode"
    CLASSIFY = "classify"


class SampleReason(StrEnum):
    """Which quota of the sampler kept a sample."""

    STRATUM = "stratum"
    UNCERTAIN = "uncertain"


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
        fields = Fields(cls.SCHEMA, load_object(raw, cls.SCHEMA))
        return cls(
            schema_version=fields.version(required=False),
            id=fields.identifier("id", max_len=MAX_ID_CHARS),
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
        return dumps(self.to_dict())


#: Longest label-set id an intent carries (``name@hash``; the schema's maxLength).
MAX_LABEL_SET_CHARS = 200


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
    #: The model's label-set id (added to v1 compatibly: absent in earlier records, read as None).
    label_set: str | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> Intent:
        fields = Fields(cls.SCHEMA, load_object(raw, cls.SCHEMA))
        return cls(
            schema_version=fields.version(required=True),
            id=fields.string("id", max_len=MAX_ID_CHARS),
            label=fields.string("label"),
            scores=fields.scores("scores"),
            model_version=fields.string("model_version"),
            locale=fields.nullable_string("locale", max_len=MAX_LOCALE_CHARS),
            latency_ms=fields.number("latency_ms"),
            timestamp=fields.number("timestamp"),
            label_set=fields.optional_string("label_set", max_len=MAX_LABEL_SET_CHARS),
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
            "label_set": self.label_set,
        }

    def to_json_bytes(self) -> bytes:
        return dumps(self.to_dict())


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


#: Defaults of INTENT_DLQ_MAX_KEY_BYTES and the longest error message a dead letter keeps.
DLQ_MAX_KEY_BYTES = 1024
DLQ_MAX_MESSAGE_CHARS = 2000
#: The smallest dead letter budget that always fits the record's fixed fields.
DLQ_MIN_RECORD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """``dead_letter.v1``: an input that could not be processed, with its bytes and the reason.

    Every part that comes from the input is bounded: the value's and the key's bytes keep a
    prefix (``*_truncated``, with the full sizes), the error message too (it may quote the
    input), and :meth:`within` cuts the value further until the whole record fits a budget.
    """

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
    # Optional fields (added compatibly): readers of earlier letters get these defaults.
    original_key_size: int | None = None
    original_key_truncated: bool = False
    error_message_size: int | None = None
    error_message_truncated: bool = False
    #: BadInput.reason (``text_missing``, ``not_json``...): what metrics count by; null for other errors.
    reason: str | None = None

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
        max_key_bytes: int = DLQ_MAX_KEY_BYTES,
        max_message_chars: int = DLQ_MAX_MESSAGE_CHARS,
    ) -> DeadLetter:
        """The dead letter for ``error`` on the input at ``topic``/``partition``/``offset``.

        Base64 makes the bytes 4/3 larger, so a value longer than ``max_original_bytes`` keeps only
        its prefix (flagged ``original_truncated``), and likewise the key and the message: the dead
        letter must still fit in a Kafka message, whatever the input.
        """
        value = original or b""
        kept = value[:max_original_bytes]
        message = str(error)
        return cls(
            original_base64=_b64(kept),
            original_key_base64=None if key is None else _b64(key[:max_key_bytes]),
            original_size=len(value),
            original_truncated=len(kept) < len(value),
            topic=topic,
            partition=partition,
            offset=offset,
            stage=stage,
            error_type=type(error).__name__,
            error_message=truncated(message, max_message_chars),
            timestamp=timestamp,
            original_key_size=None if key is None else len(key),
            original_key_truncated=key is not None and len(key) > max_key_bytes,
            error_message_size=len(message),
            error_message_truncated=len(message) > max_message_chars,
            reason=error.reason if isinstance(error, BadInput) else None,
        )

    def within(self, max_bytes: int, *, key_bytes: int = 0) -> DeadLetter:
        """This letter with its original value cut until the record (``key_bytes`` of key plus the
        JSON) takes at most ``max_bytes`` (at least :data:`DLQ_MIN_RECORD_BYTES`)."""
        letter = self
        for _ in range(8):
            excess = len(letter.to_json_bytes()) + key_bytes - max_bytes
            if excess <= 0:
                return letter
            kept = letter.original()
            # 3 bytes are 4 base64 characters; a little more so one pass usually does.
            cut = max(0, len(kept) - (excess * 3 + 3) // 4 - 64)
            if cut == len(kept) == 0:
                break
            letter = dataclasses.replace(letter, original_base64=_b64(kept[:cut]), original_truncated=True)
        return dataclasses.replace(
            letter,
            original_base64="",
            original_truncated=letter.original_size > 0,
            original_key_base64=None if letter.original_key_base64 is None else "",
            original_key_truncated=letter.original_key_base64 is not None,
            error_message=truncated(letter.error_message, 200),
            error_message_truncated=letter.error_message_truncated or len(letter.error_message) > 200,
        )

    def original(self) -> bytes:
        return base64.b64decode(self.original_base64, validate=True)

    def original_key(self) -> bytes | None:
        return None if self.original_key_base64 is None else base64.b64decode(self.original_key_base64)

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> DeadLetter:
        fields = Fields(cls.SCHEMA, load_object(raw, cls.SCHEMA))
        if "original_key_base64" not in fields.obj:
            raise fields.fail("original_key_base64", "is missing", "missing")
        key = fields.obj["original_key_base64"]
        optional = {
            name: fields.integer(name) if kind is int else fields.boolean(name)
            for name, kind in (
                ("original_key_size", int),
                ("original_key_truncated", bool),
                ("error_message_size", int),
                ("error_message_truncated", bool),
            )
            if fields.obj.get(name) is not None
        }
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
            reason=fields.optional_string("reason"),
            **optional,  # type: ignore[arg-type]
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
            "original_key_size": self.original_key_size,
            "original_key_truncated": self.original_key_truncated,
            "error_message_size": self.error_message_size,
            "error_message_truncated": self.error_message_truncated,
            "reason": self.reason,
        }

    def to_json_bytes(self) -> bytes:
        return dumps(self.to_dict())


def _plain_string(fields: Fields, name: str) -> str:
    """A required string that may be empty (an exception's message can be)."""
    if name not in fields.obj:
        raise fields.fail(name, "is missing", "missing")
    value = fields.obj[name]
    if not isinstance(value, str):
        raise fields.fail(name, f"must be a string, not {json_type(value)}", "wrong_type")
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
        fields = Fields(cls.SCHEMA, load_object(raw, cls.SCHEMA))
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
        return dumps(self.to_dict())


def _probability(fields: Fields, name: str) -> float:
    value = fields.number(name, maximum=1.0)
    if value <= 0.0:
        raise fields.fail(name, "must be above 0", "out_of_range")
    return value
