"""Typed reads of decoded JSON records: the parsing half of :mod:`worker.schemas`.

Every failure is a :class:`BadInput` naming the record and the field, with a ``reason`` of the
form ``<field>_<kind>``; nothing of an input is quoted whole into a message (an input can be
megabytes long).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from worker.errors import BadInput

SCHEMA_VERSION = 1

_Enum = TypeVar("_Enum", bound=StrEnum)
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL: never part of an id


_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


def json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: an input can be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def truncated(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a marker naming the full length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [truncated: {limit} of {len(text)} characters]"


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def dumps(record: Mapping[str, object]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def load_object(raw: bytes, record: str) -> dict[str, object]:
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
        raise BadInput(f"{record}: JSON {json_type(value)} where an object was expected", reason="not_object")
    return value


class Fields:
    """Typed reads of one decoded JSON object; every failure names the record and the field."""

    def __init__(self, record: str, obj: dict[str, object]) -> None:
        self.record = record
        self.obj = obj

    def fail(self, name: str, problem: str, kind: str) -> BadInput:
        """``kind`` is the problem's class; ``<field>_<kind>`` becomes the error's ``reason``."""
        field_name = re.split(r"[.\[]", name, maxsplit=1)[0]  # scores.x and logits[3]: one reason each
        return BadInput(f"{self.record}: field {shown(name)} {problem}", reason=f"{field_name}_{kind}")

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
                "schema_version",
                f"is {shown(value)}; this worker reads version {SCHEMA_VERSION}",
                "unsupported",
            )
        return SCHEMA_VERSION

    def _check_str(self, name: str, value: object, *, max_len: int | None, text: bool) -> str:
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, not {json_type(value)}", "wrong_type")
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

    def identifier(self, name: str, *, max_len: int) -> str:
        """A required string with no control character: ids are keys, file names and columns of
        tab-separated output, where a NUL, a newline or a tab would break a reader."""
        value = self.string(name, max_len=max_len)
        bad = _CONTROL.search(value)
        if bad is not None:
            raise self.fail(
                name,
                f"holds the control character {bad.group()!r} at character {bad.start()}",
                "control_character",
            )
        return value

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
            raise self.fail(name, f"must be a number, not {json_type(value)}", "wrong_type")
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
            raise self.fail(name, f"must be an integer, not {json_type(value)}", "wrong_type")
        if value < 0:
            raise self.fail(name, f"is {value}, below 0", "out_of_range")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be a boolean, not {json_type(value)}", "wrong_type")
        return value

    def scores(self, name: str) -> dict[str, float]:
        value = self._get(name)
        if not isinstance(value, dict) or not value:
            raise self.fail(name, f"must be a non-empty object, not {json_type(value)}", "wrong_type")
        return {str(k): self._check_number(f"{name}.{k}", v, 0.0, 1.0) for k, v in value.items()}

    def numbers(self, name: str) -> tuple[float, ...]:
        value = self._get(name)
        if not isinstance(value, list) or not value:
            raise self.fail(name, f"must be a non-empty array, not {json_type(value)}", "wrong_type")
        return tuple(self._check_number(f"{name}[{i}]", v, None, None) for i, v in enumerate(value))

    def metadata(self, name: str) -> dict[str, object]:
        value = self.obj.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, not {json_type(value)}", "wrong_type")
        return value

    def choice(self, name: str, enum: type[_Enum]) -> _Enum:
        value = self._get(name)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, not {json_type(value)}", "wrong_type")
        try:
            return enum(value)
        except ValueError as exc:
            allowed = ", ".join(repr(member.value) for member in enum)
            raise self.fail(name, f"is {shown(value)}, not one of {allowed}", "out_of_range") from exc
