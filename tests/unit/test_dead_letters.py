"""Dead letters stay bounded whatever the input: a huge key, a huge field, a huge value."""

from __future__ import annotations

import json

import pytest

from worker.errors import BadInput
from worker.schemas import DLQ_MAX_KEY_BYTES, DeadLetter, DeadLetterStage, Utterance

KAFKA_REQUEST_LIMIT = 1_000_000


def letter_for(raw: bytes, key: bytes | None, *, max_original_bytes: int = 512 * 1024) -> DeadLetter:
    try:
        Utterance.from_json_bytes(raw)
    except BadInput as exc:
        error = exc
    else:  # pragma: no cover - every input here is bad
        raise AssertionError("decoded")
    return DeadLetter.from_failure(
        original=raw, key=key, topic="utterances", partition=0, offset=7, stage=DeadLetterStage.DECODE,
        error=error, timestamp=1.0, max_original_bytes=max_original_bytes,
    )  # fmt: skip


def test_a_huge_key_is_cut_with_its_size_kept() -> None:
    key = b"k" * 460_000
    letter = letter_for(b"not json", key)
    assert letter.original_key_size == 460_000 and letter.original_key_truncated
    assert letter.original_key() == key[:DLQ_MAX_KEY_BYTES]
    assert letter.original() == b"not json" and not letter.original_truncated
    assert len(letter.to_json_bytes()) < 10_000


def test_a_huge_field_is_never_quoted_whole_into_the_message() -> None:
    raw = json.dumps({"schema_version": "v" * 700_000, "id": "a", "text": "hi"}).encode()
    letter = letter_for(raw, b"a")
    assert "schema_version" in letter.error_message and "700002 characters" in letter.error_message
    assert len(letter.error_message) < 300 and not letter.error_message_truncated
    assert letter.original_size == len(raw) and letter.original_truncated


def test_a_long_message_is_cut_with_a_marker_and_its_length() -> None:
    letter = DeadLetter.from_failure(
        original=b"x", key=None, topic="t", partition=0, offset=0, stage=DeadLetterStage.CLASSIFY,
        error=RuntimeError("e" * 50_000), timestamp=0.0, max_original_bytes=10,
    )  # fmt: skip
    assert letter.error_message_truncated and letter.error_message_size == 50_000
    assert letter.error_message.endswith("[truncated: 2000 of 50000 characters]")
    assert letter.original_key_size is None and not letter.original_key_truncated


@pytest.mark.parametrize("budget", [16 * 1024, 100_000, 900_000])
def test_within_cuts_the_original_until_the_record_fits(budget: int) -> None:
    raw = json.dumps({"id": "a", "text": "\u00e9" * 400_000}).encode()  # 800 KB of UTF-8
    letter = letter_for(raw, b"k" * 2000, max_original_bytes=4_000_000)
    assert len(letter.to_json_bytes()) > KAFKA_REQUEST_LIMIT
    fitted = letter.within(budget, key_bytes=DLQ_MAX_KEY_BYTES)
    assert len(fitted.to_json_bytes()) + DLQ_MAX_KEY_BYTES <= budget
    assert fitted.original_truncated and raw.startswith(fitted.original())
    assert fitted.original_size == len(raw)
    assert DeadLetter.from_json_bytes(fitted.to_json_bytes()) == fitted


def test_a_letter_written_before_the_optional_fields_still_reads() -> None:
    letter = letter_for(b"nope", b"k")
    document = json.loads(letter.to_json_bytes())
    for name in (
        "original_key_size",
        "original_key_truncated",
        "error_message_size",
        "error_message_truncated",
    ):
        del document[name]
    old = DeadLetter.from_json_bytes(json.dumps(document).encode())
    assert old.original_key_size is None and not old.original_key_truncated
    assert old.error_message == letter.error_message


@pytest.mark.parametrize("bad_id", ["a\x00b", "line\nbreak", "tab\there", "cr\r", "del\x7f"])
def test_an_id_with_a_control_character_is_bad_input(bad_id: str) -> None:
    with pytest.raises(BadInput, match="field 'id' holds the control character") as caught:
        Utterance.from_json_bytes(json.dumps({"id": bad_id, "text": "hi"}).encode())
    assert caught.value.reason == "id_control_character"


def test_an_id_with_spaces_and_unicode_is_fine() -> None:
    assert Utterance.from_json_bytes(json.dumps({"id": "u 1 é 東", "text": "hi"}).encode()).id == "u 1 é 東"
