"""What ``send``, ``send --file`` and ``replay`` make of their input, before any broker is involved."""

from __future__ import annotations

import json

import pytest

from worker.dev.client import argument_lines, outgoing_from_lines, read_lines
from worker.errors import BadInput
from worker.schemas import Utterance


def test_non_utf8_bytes_in_an_argument_are_an_error_naming_it() -> None:
    # How Python hands `send $'caf\xe9'` over: the undecodable byte as a lone surrogate.
    argument = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(BadInput, match=r"argument 2 is not UTF-8 \(byte 0xe9 at byte 4\)"):
        argument_lines(["fine", argument])


def test_valid_utf8_arguments_are_sent_as_they_are() -> None:
    lines = argument_lines(["café", "明日の天気"])
    messages = list(outgoing_from_lines(lines, locale="fr"))
    texts = [Utterance.from_json_bytes(m.value).text for m in messages]
    assert texts == ["café", "明日の天気"]


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_argument_says_why_it_is_not_sent(text: str) -> None:
    with pytest.raises(BadInput, match=r"argument 1 is (empty|whitespace only): an utterance needs a text"):
        argument_lines([text])


def test_a_non_utf8_line_in_a_file_names_the_file_and_the_line() -> None:
    raw = b"book a table\n\xff\xfe latin-1 text\n"
    with pytest.raises(BadInput, match=r"data\.txt line 2 is not UTF-8 \(byte 0xff at byte 1\)"):
        read_lines(raw, "data.txt")


def test_a_malformed_jsonl_line_is_an_error_not_a_text() -> None:
    lines = read_lines(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "broken"\n', "in.jsonl")
    messages = outgoing_from_lines(lines)
    assert json.loads(next(messages).value)["id"] == "a"
    with pytest.raises(BadInput, match=r"in\.jsonl line 2 starts with '\{' but is not a JSON object"):
        next(messages)


def test_a_lone_surrogate_escape_in_jsonl_is_forwarded_for_the_worker_to_judge() -> None:
    # Valid JSON whose text decodes to an unpaired surrogate: no encoder crash, the escape is kept.
    (message,) = outgoing_from_lines(read_lines(b'{"id": "s", "text": "\\ud800 hi"}', "stdin"))
    assert b"\\ud800" in message.value
    with pytest.raises(BadInput, match="unpaired surrogate"):
        Utterance.from_json_bytes(message.value)


def test_text_lines_and_json_lines_mix_and_blank_lines_are_skipped() -> None:
    lines = read_lines(b'set an alarm\n\n{"text": "play jazz", "extra": 1}\n', "stdin")
    records = [json.loads(m.value) for m in outgoing_from_lines(lines, locale="en")]
    assert [r["text"] for r in records] == ["set an alarm", "play jazz"]
    assert records[1]["extra"] == 1 and records[1]["locale"] == "en"
