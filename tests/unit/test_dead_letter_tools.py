"""Reading dead letters back: their reason, id and position, and which ones redrive chooses."""

from __future__ import annotations

import dataclasses
import time

import pytest

from worker.dev.dead_letters import Selection, StoredLetter, describe_letter, parse_position
from worker.errors import BadInput, ModelError
from worker.schemas import DeadLetter, DeadLetterStage, Utterance
from worker.topics import UTTERANCES


def letter(
    raw: bytes, key: bytes | None = None, *, error: Exception | None = None, offset: int = 7
) -> StoredLetter:
    if error is None:
        try:
            Utterance.from_json_bytes(raw)
        except BadInput as exc:
            error = exc
    assert error is not None
    dead = DeadLetter.from_failure(
        original=raw,
        key=key,
        topic=UTTERANCES,
        partition=2,
        offset=offset,
        stage=DeadLetterStage.DECODE if isinstance(error, BadInput) else DeadLetterStage.CLASSIFY,
        error=error,
        timestamp=time.time(),
        max_original_bytes=1024,
    )
    return StoredLetter(0, 3, dead)


def test_a_dead_letter_carries_the_reason_metrics_count_by() -> None:
    stored = letter(b'{"id": "a"}', b"a")
    assert stored.letter.reason == "text_missing"
    assert DeadLetter.from_json_bytes(stored.letter.to_json_bytes()).reason == "text_missing"
    assert stored.reason == "text_missing"


def test_a_letter_written_before_the_reason_field_gets_it_by_decoding_again() -> None:
    stored = letter(b"not json at all")
    older = StoredLetter(0, 3, dataclasses.replace(stored.letter, reason=None))
    assert older.reason == "not_json"
    failed = letter(b'{"id": "b", "text": "hi"}', error=ModelError("child died"))
    assert failed.letter.reason is None and failed.reason == "ModelError"


def test_the_id_is_the_originals_or_its_key() -> None:
    assert letter(b'{"id": "u-1"}', b"other-key").original_id == "u-1"
    assert letter(b"\xff garbage", b"k-2").original_id == "k-2"
    assert letter(b"\xff garbage").original_id is None


def test_describe_shows_where_it_lies_and_a_printable_preview() -> None:
    line = describe_letter(letter(b'{"id": "a"}\n' + b"x" * 200, b"a"))
    columns = line.split("\t")
    assert columns[:6] == ["dlq:0:3", "utterances:2:7", "decode", "not_json", "a", "212B"]
    assert columns[6].startswith('{"id": "a"}\\n') and len(columns[6]) <= 80


def test_a_selection_needs_a_filter_and_every_given_filter_must_hold() -> None:
    with pytest.raises(BadInput, match="choose dead letters"):
        Selection()
    missing = letter(b'{"id": "a"}', b"a", offset=7)
    assert Selection(reasons=frozenset({"text_missing"})).matches(missing)
    assert not Selection(reasons=frozenset({"text_missing"}), positions=frozenset({(2, 8)})).matches(missing)
    assert Selection(ids=frozenset({"a", "b"}), positions=frozenset({(2, 7)})).matches(missing)
    assert Selection(everything=True).matches(missing)


@pytest.mark.parametrize(("text", "position"), [("2:1534", (2, 1534)), ("utterances:0:9", (0, 9))])
def test_positions_as_tail_prints_them(text: str, position: tuple[int, int]) -> None:
    assert parse_position(text) == position


def test_a_bad_position_names_itself() -> None:
    with pytest.raises(BadInput, match="not a position: 'x:1'"):
        parse_position("x:1")
