"""structlog configuration, done once at start-up by the CLI."""

from __future__ import annotations

import logging
import sys

import structlog


def renderer(*, json_logs: bool) -> structlog.typing.Processor:
    """JSON lines, or the console renderer: coloured only when stderr is a terminal (a file, a
    pipe or a journal gets plain text, not ANSI escapes)."""
    if json_logs:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=_is_terminal(sys.stderr))


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def configure_logging(*, json_logs: bool, level: str = "INFO") -> None:
    """JSON lines for production, a readable console renderer for development; to stderr."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer(json_logs=json_logs),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def stdlib_logging_config(*, json_logs: bool, level: str = "INFO") -> dict[str, object]:
    """A ``logging.config.dictConfig`` that renders stdlib records (Faust, aiokafka) like structlog's.

    The Faust worker installs it at start-up. Faust, mode and aiokafka are chatty at INFO about
    their own machinery; they log at WARNING and above unless ``level`` is DEBUG.
    """
    name = level.upper()
    libraries = name if name == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    renderer(json_logs=json_logs),
                ],
                "foreign_pre_chain": [
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                ],
            }
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "structlog",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {library: {"level": libraries} for library in ("faust", "mode", "aiokafka")},
        "root": {"handlers": ["stderr"], "level": name},
    }
