"""Log rendering: ANSI colours only on a terminal."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from worker.logging import configure_logging, stdlib_logging_config

ESC = "\x1b["


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _log_with_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("test").exception("something_failed", partition=3)


def test_no_ansi_escapes_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(json_logs=False)
    structlog.get_logger("test").info("worker_ready", partitions=4)
    _log_with_traceback()
    text = stream.getvalue()
    assert "worker_ready" in text and "partitions=4" in text and "ValueError: boom" in text
    assert ESC not in text


def test_colours_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(json_logs=False)
    structlog.get_logger("test").info("worker_ready", partitions=4)
    assert ESC in stream.getvalue()


def test_library_records_have_no_ansi_escapes_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    formatters: dict[str, dict[str, object]] = stdlib_logging_config(json_logs=False)["formatters"]  # type: ignore[assignment]
    options = {k: v for k, v in formatters["structlog"].items() if k != "()"}
    formatter = structlog.stdlib.ProcessorFormatter(**options)  # type: ignore[arg-type]
    record = logging.LogRecord(
        "aiokafka", logging.WARNING, __file__, 1, "Unable connect to node %s", (1,), None
    )
    text = formatter.format(record)
    assert "Unable connect to node 1" in text
    assert ESC not in text
