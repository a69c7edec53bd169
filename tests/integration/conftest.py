"""Real services for the integration tests: one Tansu broker and one valkey-server per session.

They run on free loopback ports with their logs in pytest's temporary directory. A service that
cannot start makes its tests error; they never skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_harness import student_dir

from worker.dev.services import EmbeddedService, start_kafka, start_redis


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    with start_redis(tmp_path_factory.mktemp("valkey")) as service:
        yield service


@pytest.fixture(scope="session")
def kafka_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    with start_kafka(tmp_path_factory.mktemp("tansu")) as service:
        yield service


@pytest.fixture
def unique_name() -> str:
    """A fresh topic / consumer group / Redis key prefix, so tests never see each other's data."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def student() -> Path:
    """The student the worker tests serve: models/student (or, until it lands, a development one)."""
    return student_dir()
