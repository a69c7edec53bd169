"""Where a dataset's files live: a local directory or any fsspec URL, written all-or-nothing."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from worker.errors import MissingExtra


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Where a dataset's files live: a local directory, or any fsspec URL.

    Locally a write goes to a temporary file, is fsynced and renamed into place, and the
    directory is fsynced: the file appears whole or not at all. On an object store a single
    PUT of the final name has the same all-or-nothing property.
    """

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.location = text
        self.local: Path | None = None
        self.fs: Any = None
        if "://" in text and not text.startswith("file://"):
            try:
                import fsspec  # type: ignore[import-untyped]
            except ImportError as exc:  # pragma: no cover - fsspec comes with the teacher extra
                raise MissingExtra("teacher", "fsspec") from exc
            self.fs, self.root = fsspec.core.url_to_fs(text)
        else:
            self.local = Path(text.removeprefix("file://"))
            self.root = str(self.local)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def makedirs(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).exists()
        return bool(self.fs.exists(self._path(name)))

    def read_bytes(self, name: str) -> bytes:
        if self.local is not None:
            return (self.local / name).read_bytes()
        data: bytes = self.fs.cat_file(self._path(name))
        return data

    def open(self, name: str) -> IO[bytes]:
        if self.local is not None:
            return (self.local / name).open("rb")
        handle: IO[bytes] = self.fs.open(self._path(name), "rb")
        return handle

    def write_atomic(self, name: str, payload: bytes) -> None:
        if self.local is None:
            self.fs.pipe_file(self._path(name), payload)
            return
        fd, tmp = tempfile.mkstemp(dir=self.local, prefix=f".{name}.")
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; datasets are shared with other jobs
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.local / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.local)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local is not None:
                (self.local / name).unlink()
            else:
                self.fs.rm_file(self._path(name))

    def files(self) -> dict[str, float]:
        """Every file's name and modification time (seconds since the epoch)."""
        if self.local is not None:
            if not self.local.is_dir():
                return {}
            return {p.name: p.stat().st_mtime for p in self.local.iterdir() if p.is_file()}
        out: dict[str, float] = {}
        for info in self.fs.ls(self.root, detail=True):
            out[str(info["name"]).rstrip("/").rsplit("/", 1)[-1]] = _timestamp(info)
        return out

    @property
    def canonical(self) -> str:
        """One spelling per location (absolute path, or protocol + root): what locks are keyed by."""
        if self.local is not None:
            return str(self.local.resolve())
        return str(self.fs.unstrip_protocol(self.root.rstrip("/")))

    def default_lock(self) -> AbstractContextManager[object]:
        """``flock`` on ``.lock`` locally; on a URL, no lock (pass one to the writer)."""
        if self.local is None:
            return contextlib.nullcontext()
        return flock(self.local / ".lock")


def _timestamp(info: dict[str, Any]) -> float:
    """A listing entry's modification time; fsspec backends name and type it differently."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return time.time()  # unknown: treated as new, so never removed as a stale orphan


@contextlib.contextmanager
def flock(path: Path) -> Iterator[object]:
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield fh
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
