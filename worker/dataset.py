"""Versioned distillation datasets: Parquet shards plus an atomically replaced manifest.

A dataset directory holds ``shard-<id>.parquet`` files and ``manifest.json``::

    {"dataset_version": 3, "schema_version": 1, "teacher": {"id": ..., "labels": [...]},
     "shards": [{"name": ..., "rows": n, "sha256": ...}, ...],
     "counts": {"<locale>": {"<label>": n}}, "time_range": [t0, t1], "notes": [...]}

Each shard is written to a temporary file, fsynced and renamed into place; the manifest is
rewritten the same way after it, so a crash leaves either the old or the new manifest and at
worst an orphan shard that no manifest lists. A shard's name comes from the caller (e.g. a
hash of the entries it covers), so writing the same entries twice yields one shard.

Rows: id, text, locale, teacher_logits (list<float32>), teacher_label, source, weight, and
optional student_logits, model_version, stratum, sampled_at, labelled_at.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.errors import DataError, MissingExtra

SCHEMA_VERSION = 1

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("teacher", "pyarrow") from exc

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("locale", pa.string()),
        ("teacher_logits", pa.list_(pa.float32())),
        ("teacher_label", pa.string()),
        ("source", pa.string()),
        ("weight", pa.float32()),
        ("student_logits", pa.list_(pa.float32())),
        ("model_version", pa.string()),
        ("stratum", pa.string()),
        ("sampled_at", pa.float64()),
        ("labelled_at", pa.float64()),
    ]
)


@dataclass
class ShardRows:
    """Column buffers for one shard; optional columns may stay empty (written as nulls)."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    locales: list[str] = field(default_factory=list)
    teacher_logits: list[npt.NDArray[np.float32]] = field(default_factory=list)
    teacher_labels: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    student_logits: list[Sequence[float] | None] = field(default_factory=list)
    model_versions: list[str | None] = field(default_factory=list)
    strata: list[str | None] = field(default_factory=list)
    sampled_at: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def table(self, labelled_at: float) -> pa.Table:
        n = len(self)

        def column(values: list[object], default: object = None) -> list[object]:
            return values if len(values) == n else [default] * n

        return pa.table(
            {
                "id": self.ids,
                "text": self.texts,
                "locale": self.locales,
                "teacher_logits": [np.asarray(v, np.float32).tolist() for v in self.teacher_logits],
                "teacher_label": self.teacher_labels,
                "source": column(self.sources, ""),  # type: ignore[arg-type]
                "weight": column(self.weights, 1.0),  # type: ignore[arg-type]
                "student_logits": column(self.student_logits),  # type: ignore[arg-type]
                "model_version": column(self.model_versions),  # type: ignore[arg-type]
                "stratum": column(self.strata),  # type: ignore[arg-type]
                "sampled_at": column(self.sampled_at),  # type: ignore[arg-type]
                "labelled_at": [labelled_at] * n,
            },
            schema=SCHEMA,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; datasets are shared with other jobs
    with os.fdopen(fd, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, object]:
    path = directory / "manifest.json"
    if not path.exists():
        raise DataError(f"{directory} is not a dataset: no manifest.json")
    try:
        manifest: dict[str, object] = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}")
    return manifest


class DatasetWriter:
    """Appends shards to a dataset directory and keeps its manifest current."""

    def __init__(self, directory: Path, teacher_id: str, labels: Sequence[str]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "manifest.json").exists():
            self.manifest = read_manifest(directory)
            teacher = self.manifest["teacher"]
            assert isinstance(teacher, dict)
            if list(teacher["labels"]) != list(labels):
                raise DataError(f"{directory}: dataset labels {teacher['labels']} differ from {list(labels)}")
        else:
            self.manifest = {
                "dataset_version": 0,
                "schema_version": SCHEMA_VERSION,
                "teacher": {"id": teacher_id, "labels": list(labels)},
                "shards": [],
                "counts": {},
                "time_range": None,
                "notes": [],
            }

    def has_shard(self, name: str) -> bool:
        shards = self.manifest["shards"]
        assert isinstance(shards, list)
        return any(s["name"] == name for s in shards)

    def write_shard(self, name: str, rows: ShardRows, note: dict[str, object] | None = None) -> Path:
        """Write ``rows`` as shard ``name`` and publish it in the manifest (idempotent)."""
        path = self.directory / f"shard-{name}.parquet"
        if self.has_shard(name):
            return path
        now = time.time()
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".shard-{name}.")
        os.fchmod(fd, 0o644)
        os.close(fd)
        pq.write_table(rows.table(now), tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        shards = self.manifest["shards"]
        counts = self.manifest["counts"]
        assert isinstance(shards, list) and isinstance(counts, dict)
        shards.append(
            {"name": name, "file": path.name, "rows": len(rows), "sha256": _sha256(path), "written_at": now}
        )
        for locale, label in zip(rows.locales, rows.teacher_labels, strict=True):
            per_locale = counts.setdefault(locale, {})
            per_locale[label] = per_locale.get(label, 0) + 1
        stamps = [t for t in rows.sampled_at if t is not None] or [now]
        old = self.manifest["time_range"]
        lo, hi = min(stamps), max(stamps)
        if isinstance(old, list):
            lo, hi = min(lo, old[0]), max(hi, old[1])
        self.manifest["time_range"] = [lo, hi]
        if note:
            notes = self.manifest["notes"]
            assert isinstance(notes, list)
            notes.append({"shard": name, **note})
        version = self.manifest["dataset_version"]
        assert isinstance(version, int)
        self.manifest["dataset_version"] = version + 1
        _atomic_write(self.directory / "manifest.json", json.dumps(self.manifest, indent=1).encode())
        return path


@dataclass(frozen=True)
class Batch:
    texts: list[str]
    locales: list[str]
    teacher_logits: npt.NDArray[np.float32]
    ids: list[str]
    sources: list[str]


def iter_batches(directory: Path, batch_size: int = 4096) -> Iterator[Batch]:
    """Stream every row of the dataset's listed shards, in manifest order."""
    manifest = read_manifest(directory)
    shards = manifest["shards"]
    assert isinstance(shards, list)
    for shard in shards:
        path = directory / str(shard["file"])
        if not path.exists():
            raise DataError(f"{directory}: manifest lists {path.name}, which is missing")
        parquet = pq.ParquetFile(path)
        for record in parquet.iter_batches(
            batch_size=batch_size, columns=["id", "text", "locale", "teacher_logits", "source"]
        ):
            logits = record.column("teacher_logits").to_pylist()
            yield Batch(
                texts=record.column("text").to_pylist(),
                locales=record.column("locale").to_pylist(),
                teacher_logits=np.asarray(logits, dtype=np.float32),
                ids=record.column("id").to_pylist(),
                sources=record.column("source").to_pylist(),
            )


def dataset_labels(directory: Path) -> tuple[str, ...]:
    teacher = read_manifest(directory)["teacher"]
    assert isinstance(teacher, dict)
    return tuple(teacher["labels"])
