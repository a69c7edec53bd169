"""Shared fixtures: settings built explicitly (never from the process environment)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.config import MODELS_DIR, REPO_ROOT, Settings
from worker.teacher import OnnxTeacher, load_embedded_teacher

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(scope="session")
def settings(teacher_cache: Path) -> Settings:
    return Settings(
        cache_dir=teacher_cache,
        teacher_dir=MODELS_DIR / "teacher",
        teacher_threads=2,
        shared_data_dir=SHARED_DATA,
    )


@pytest.fixture(scope="session")
def embedded_teacher(settings: Settings) -> Iterator[OnnxTeacher]:
    yield load_embedded_teacher(settings)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The development data in ../shared/data; fails (never skips) when it is missing."""
    if not (SHARED_DATA / "massive").is_dir():
        pytest.fail(f"this test reads the development data at {SHARED_DATA}, which is missing")
    return SHARED_DATA
