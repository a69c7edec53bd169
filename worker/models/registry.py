"""The model registry: promoted students, and the one pointer every worker serves from.

Layout of ``Settings.registry_dir`` (a shared volume when workers run on several hosts)::

    versions/<version>/   model.onnx, tokenizer.json, labels.json, card.json, gate.json
    current.json          model_pointer.v1: the version to serve, and the ones before it

``promote`` copies a model directory into ``versions/`` (staged, then renamed), then replaces
``current.json`` atomically; ``rollback`` points it back at the previous version. Workers
poll ``current.json`` (a ``stat`` every ``model_poll_interval_s``) and hot-reload on change.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from worker.config import Settings
from worker.errors import ModelError

if TYPE_CHECKING:
    from worker.models.student import Student

log = structlog.get_logger(__name__)

_Model = TypeVar("_Model")

POINTER = "current.json"
SCHEMA_VERSION = 1
HISTORY = 20  # previous versions kept in the pointer (rollback depth)
# What a servable model directory holds.
REQUIRED_FILES = ("model.onnx", "tokenizer.json", "labels.json", "card.json")


def copy_model_files(model_dir: Path, target: Path) -> None:
    """A model directory's files into ``target`` (existing), a cascade's second student included."""
    for name in REQUIRED_FILES:
        shutil.copy2(model_dir / name, target / name)
    card = json.loads((model_dir / "card.json").read_text())
    cascade = card.get("cascade") if isinstance(card, dict) else None
    if isinstance(cascade, dict) and isinstance(cascade.get("second"), str):
        second = target / cascade["second"]
        second.mkdir()
        copy_model_files(model_dir / cascade["second"], second)


@dataclass(frozen=True)
class Release:
    """One promoted version."""

    version: str
    path: str  # relative to the registry root
    promoted_at: float
    action: str = "promote"  # promote | rollback

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": self.path,
            "promoted_at": self.promoted_at,
            "action": self.action,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Release:
        try:
            return cls(
                str(raw["version"]),
                str(raw["path"]),
                float(raw["promoted_at"]),
                str(raw.get("action", "promote")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model pointer entry {raw!r} is malformed: {exc}") from exc


def model_version(model_dir: Path) -> str:
    """The version a model directory's card declares (its directory name if none)."""
    try:
        card = json.loads((model_dir / "card.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}/card.json cannot be read: {exc}") from exc
    return str(card.get("version") or model_dir.name)


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def pointer(self) -> Path:
        return self.root / POINTER

    def stamp(self) -> tuple[int, int, int] | None:
        """What changes when the pointer is replaced: (inode, mtime_ns, size); None if absent."""
        try:
            st = self.pointer.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> dict[str, Any] | None:
        try:
            raw: dict[str, Any] = json.loads(self.pointer.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ModelError(f"{self.pointer} is not valid JSON: {exc}") from exc
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ModelError(
                f"{self.pointer}: schema_version {raw.get('schema_version')} is not {SCHEMA_VERSION}"
            )
        return raw

    def current(self) -> Release | None:
        raw = self._read()
        return Release.from_dict(raw["current"]) if raw else None

    def history(self) -> list[Release]:
        """Previous versions, most recent last."""
        raw = self._read()
        return [Release.from_dict(r) for r in raw.get("previous", [])] if raw else []

    def directory(self, release: Release) -> Path:
        return self.root / release.path

    def _write(self, current: Release, previous: list[Release]) -> None:
        payload = {
            "schema_version": SCHEMA_VERSION,
            "current": current.to_dict(),
            "previous": [r.to_dict() for r in previous[-HISTORY:]],
        }
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{POINTER}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(payload, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.pointer)

    def add(self, model_dir: Path, gate_report: dict[str, Any] | None = None) -> Release:
        """Copy ``model_dir`` into ``versions/`` (idempotent per version); does not publish it."""
        missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
        if missing:
            raise ModelError(f"{model_dir} lacks {', '.join(missing)}: not a model directory")
        version = model_version(model_dir)
        target = self.root / "versions" / version
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}."))
            copy_model_files(model_dir, staging)
            if gate_report is not None:
                (staging / "gate.json").write_text(json.dumps(gate_report, indent=2) + "\n")
            staging.chmod(0o755)
            os.replace(staging, target)
        return Release(version, f"versions/{version}", time.time())

    def publish(self, release: Release) -> Release:
        """Make ``release`` the version workers serve; the one before goes to the history."""
        self.root.mkdir(parents=True, exist_ok=True)
        raw = self._read()
        previous = [Release.from_dict(r) for r in raw.get("previous", [])] if raw else []
        if raw:
            previous.append(Release.from_dict(raw["current"]))
        self._write(release, previous)
        return release

    def rollback(self) -> tuple[Release, Release]:
        """Point back at the previous version; returns (from, to)."""
        raw = self._read()
        if not raw:
            raise ModelError(
                f"nothing to roll back: no model has been promoted in {self.root}, so the workers serve "
                "the student of INTENT_STUDENT_DIR (`intent-worker promote DIR` publishes one)"
            )
        if not raw.get("previous"):
            version = raw.get("current", {}).get("version", "?")
            raise ModelError(
                f"nothing to roll back to: {version} is the only version promoted in {self.root}"
            )
        previous = [Release.from_dict(r) for r in raw["previous"]]
        back = previous.pop()
        now = Release(back.version, back.path, time.time(), action="rollback")
        self._write(now, previous)
        return Release.from_dict(raw["current"]), now


def initial_model(settings: Settings, open_model: Callable[[Path], _Model]) -> _Model:
    """The model to start with, as ``open_model`` opens its directory: the registry's current
    version, else the first previous one that opens, else ``student_dir`` (a broken promotion
    never keeps a new worker from starting)."""
    registry = Registry(settings.registry_dir)
    try:
        releases = [r for r in (registry.current(), *reversed(registry.history())) if r is not None]
    except ModelError as exc:
        log.error("registry_unreadable", registry=str(settings.registry_dir), error=str(exc))
        releases = []
    for release in releases:
        try:
            return open_model(registry.directory(release))
        except ModelError as exc:
            log.error("registry_model_unusable", version=release.version, error=str(exc))
    return open_model(settings.student_dir)


def initial_student(settings: Settings) -> Student:
    """:func:`initial_model`, loaded in this process (``promote`` measures it)."""
    # Imported here: promote and rollback use the registry without loading onnxruntime.
    from worker.models.student import Student

    return initial_model(settings, lambda directory: Student(directory, threads=settings.inference_threads))
