"""The model registry: promotion is a copy then an atomic pointer swap; rollback goes back one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker.errors import ModelError
from worker.models.registry import Registry, model_version


def _model(tmp_path: Path, student: Path, version: str) -> Path:
    out = tmp_path / "candidates" / version
    shutil.copytree(student, out)
    card = json.loads((out / "card.json").read_text())
    (out / "card.json").write_text(json.dumps({**card, "version": version}))
    return out


@pytest.fixture
def student() -> Path:
    from worker.config import MODELS_DIR

    return MODELS_DIR / "student"


def test_promote_then_rollback_moves_the_pointer_and_keeps_the_history(tmp_path: Path, student: Path) -> None:
    registry = Registry(tmp_path / "registry")
    assert registry.current() is None and registry.stamp() is None
    first = registry.publish(registry.add(_model(tmp_path, student, "v1")))
    stamp = registry.stamp()
    second = registry.publish(registry.add(_model(tmp_path, student, "v2"), {"promote": True}))
    assert registry.stamp() != stamp
    assert registry.current() == second and [r.version for r in registry.history()] == ["v1"]
    assert model_version(registry.directory(second)) == "v2"
    assert json.loads((registry.directory(second) / "gate.json").read_text()) == {"promote": True}
    old, now = registry.rollback()
    assert (old.version, now.version, now.action) == ("v2", "v1", "rollback")
    assert registry.directory(now) == registry.directory(first)
    assert registry.history() == []
    with pytest.raises(ModelError, match="nothing to roll back"):
        registry.rollback()


def test_a_directory_that_is_not_a_model_is_refused(tmp_path: Path, student: Path) -> None:
    broken = _model(tmp_path, student, "v3")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer"):
        Registry(tmp_path / "registry").add(broken)
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "current.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        Registry(tmp_path / "registry").current()
