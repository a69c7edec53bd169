"""Every error the worker raises on purpose.

    WorkerError
    ├── BadInput          one input cannot be processed (bad JSON, missing field, bad text)
    ├── ModelError        a model directory or graph is missing, corrupt or inconsistent
    │   └── CacheError    a cached build artefact failed its integrity check
    ├── DataError         a data set file is missing or malformed
    ├── ServiceError      Kafka or Redis (embedded or configured) cannot be started or reached
    └── MissingExtra      an optional dependency group is not installed

Foreign errors are wrapped with ``raise ... from exc`` and name the input they concern.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class for every error intent-worker raises deliberately."""


class BadInput(WorkerError):
    """One input (an utterance, a text) cannot be processed.

    ``reason`` is a short, stable class of the problem (``not_json``, ``text_missing``): the
    message names the input precisely, the reason is what metrics count by.
    """

    def __init__(self, message: str, *, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.reason = reason


class ModelError(WorkerError):
    """A model is missing, corrupt or does not match what the caller expects."""


class CacheError(ModelError):
    """A cached build artefact is missing or fails its integrity check."""


class DataError(WorkerError):
    """A data set is missing or malformed."""


class ServiceError(WorkerError):
    """An embedded or configured service (Kafka, Redis) cannot be started or reached."""


class MissingExtra(WorkerError):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"{module!r} is not installed; it comes with the {extra!r} extra: "
            f"pip install 'intent-worker[{extra}]'"
        )
        self.extra = extra
        self.module = module
