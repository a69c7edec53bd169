"""Versioned distillation datasets: Parquet shards plus an atomically replaced manifest.

A dataset is a directory (a local path, or any fsspec URL such as ``s3://bucket/ds``)
holding ``shard-<id>.parquet`` files and ``manifest.json`` (``schemas/dataset_manifest.v1.json``)::

    {"dataset_version": 3, "schema_version": 1,
     "teacher": {"id": "name@hash", "hash": "hash", "labels": [...], "label_set": "name@hash"},
     "shards": [{"name": ..., "file": ..., "rows": n, "sha256": ..., "written_at": t}, ...],
     "counts": {"<locale>": {"<label>": n}}, "time_range": [t0, t1],
     "runs": [{"run": ..., "rows": n, "disagreement": {"<locale>": {"n": n, "rate": r}}}, ...],
     "notes": [...]}

**Crash safety.** A shard is written whole under its final name (locally: a temporary file,
fsynced, renamed), then published by rewriting the manifest the same way. A crash leaves the
old or the new manifest, and at worst an orphan shard that no manifest lists (readers ignore
it; ``compact`` removes it). A shard's name comes from the caller (a hash of the entries it
covers), so writing the same entries twice yields one shard. Rows that carry a ``buffer_id``
(the Redis entry they came from) are also de-duplicated one by one at publication, under the
dataset's lock, so two writers racing on the same entries never both publish them.

**Concurrency.** Publication is a read-modify-write of the manifest under a lock: ``flock`` on
a local directory, or whatever lock the caller passes (the labelling job uses a Redis lock,
which also covers object stores).

**Label sets.** A dataset holds the logits of one teacher over one label set
(``teacher.label_set``: the teacher's label-set id; manifests written before label sets
lack it and mean the id of their label names). A writer for another teacher or label set
is refused, and the trainer refuses to mix datasets of different label sets.

Rows (``schemas/dataset_row.v1.json``): id, text, locale, teacher_logits (list<float32>),
teacher_label, source, weight, and optional student_logits, model_version, stratum,
buffer_id, sampled_at, labelled_at.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from worker.errors import DataError, MissingExtra
from worker.loop.label_sets import manifest_label_set
from worker.loop.store import Store, sha256_bytes
from worker.models.onnx import label_names_id

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("teacher", "pyarrow") from exc

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("dataset_version", "teacher", "shards", "counts", "time_range")
ORPHAN_GRACE_S = 600.0  # a shard younger than this may be a writer's commit in progress

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
        ("buffer_id", pa.string()),
        ("sampled_at", pa.float64()),
        ("labelled_at", pa.float64()),
    ]
)

Lock = Callable[[], AbstractContextManager[object]]


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
    buffer_ids: list[str | None] = field(default_factory=list)
    sampled_at: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: Sequence[bool]) -> ShardRows:
        """The rows where ``keep`` is true (optional columns stay empty if they were)."""

        def pick(values: list[Any]) -> list[Any]:
            return [v for v, k in zip(values, keep, strict=True) if k] if len(values) == len(keep) else values

        return ShardRows(**{name: pick(getattr(self, name)) for name in self.__dataclass_fields__})

    def table(self, labelled_at: float) -> pa.Table:
        n = len(self)

        def column(values: list[Any], default: object = None) -> list[Any]:
            return values if len(values) == n else [default] * n

        return pa.table(
            {
                "id": self.ids,
                "text": self.texts,
                "locale": self.locales,
                "teacher_logits": [np.asarray(v, np.float32).tolist() for v in self.teacher_logits],
                "teacher_label": self.teacher_labels,
                "source": column(self.sources, ""),
                "weight": column(self.weights, 1.0),
                "student_logits": column(self.student_logits),
                "model_version": column(self.model_versions),
                "stratum": column(self.strata),
                "buffer_id": column(self.buffer_ids),
                "sampled_at": column(self.sampled_at),
                "labelled_at": [labelled_at] * n,
            },
            schema=SCHEMA,
        )


def split_bucket(row_id: str) -> float:
    """A stable number in [0, 1) from a row id: the trainer holds back rows below its validation
    fraction, and every evaluation of held-back rows picks them the same way.

    Only the part before a ``:`` counts, so a text and its translation (``id`` and
    ``id:en``) always fall in the same split.
    """
    key = row_id.split(":", 1)[0]
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


@contextlib.contextmanager
def _both(outer: Lock, inner: Lock) -> Iterator[object]:
    """The caller's lock (e.g. Redis, across hosts), then the store's own (``flock``, locally)."""
    with outer(), inner() as held:
        yield held


def _parse_manifest(store: Store) -> dict[str, Any]:
    if not store.exists(MANIFEST):
        raise DataError(f"{store.location} is not a dataset: no {MANIFEST}")
    try:
        manifest: dict[str, Any] = json.loads(store.read_bytes(MANIFEST))
    except ValueError as exc:
        raise DataError(f"{store.location}/{MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{store.location}/{MANIFEST}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    teacher = manifest.get("teacher")
    if missing or not isinstance(teacher, dict) or not {"id", "labels"} <= set(teacher):
        raise DataError(
            f"{store.location}/{MANIFEST} is not a dataset_manifest.v1: missing {missing or 'teacher id/labels'}"
        )
    if not isinstance(manifest["shards"], list) or not all(
        isinstance(s, dict) and {"name", "file", "rows"} <= set(s) for s in manifest["shards"]
    ):
        raise DataError(f"{store.location}/{MANIFEST}: malformed shard list")
    manifest.setdefault("runs", [])
    manifest.setdefault("notes", [])
    manifest.setdefault("retired", [])
    return manifest


def read_manifest(location: str | Path) -> dict[str, Any]:
    return _parse_manifest(Store(location))


def _write_manifest(store: Store, manifest: dict[str, Any]) -> None:
    store.write_atomic(MANIFEST, json.dumps(manifest, indent=1).encode())


def _shard_file(name: str) -> str:
    return f"shard-{name}-{uuid.uuid4().hex[:8]}.parquet"


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _teacher_hash(teacher_id: str) -> str:
    return teacher_id.rpartition("@")[2] if "@" in teacher_id else sha256_bytes(teacher_id.encode())[:16]


Note = dict[str, object] | None
#: A writer's run line for what a commit makes of its run (labelling.RunReport.to_manifest).
RunLine = Callable[["Commit"], dict[str, object]]


@dataclass(frozen=True)
class Commit:
    """What publishing a shard did."""

    name: str  # the shard as published (differs from the asked name when rows were dropped)
    rows: int  # rows published (0: nothing new)
    duplicates: int  # rows dropped because their buffer entry is already in the dataset


class DatasetWriter:
    """Appends shards to a dataset and keeps its manifest current; safe with several writers."""

    def __init__(
        self,
        location: str | Path,
        teacher_id: str,
        labels: Sequence[str],
        *,
        label_set: str | None = None,
        lock: Lock | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``label_set``: the teacher's label-set id (default: the id of ``labels``)."""
        label_set = label_set or label_names_id(labels)
        self.store = Store(location)
        self.location = self.store.location
        self.lock: Lock = (
            self.store.default_lock if lock is None else partial(_both, lock, self.store.default_lock)
        )
        self.clock = clock
        self.store.makedirs()
        self._entries: set[str] = set()  # buffer ids of the shards in _indexed
        self._indexed: set[str] = set()
        with self.lock():
            if self.store.exists(MANIFEST):
                self.manifest = _parse_manifest(self.store)
                held = manifest_label_set(self.manifest)
                if held != label_set:
                    raise DataError(
                        f"{self.location} holds label set {held}, not {label_set}: a new label set "
                        "needs a new dataset"
                    )
                if list(self.manifest["teacher"]["labels"]) != list(labels):
                    raise DataError(
                        f"{self.location}: dataset labels {self.manifest['teacher']['labels']} differ from {list(labels)}"
                    )
                if self.manifest["teacher"]["id"] != teacher_id:
                    raise DataError(
                        f"{self.location} was labelled by {self.manifest['teacher']['id']}, not {teacher_id}: "
                        "write to a new dataset (train on several with --data A B)"
                    )
            else:
                self.manifest = {
                    "dataset_version": 0,
                    "schema_version": SCHEMA_VERSION,
                    "teacher": {
                        "id": teacher_id,
                        "hash": _teacher_hash(teacher_id),
                        "labels": list(labels),
                        "label_set": label_set,
                    },
                    "shards": [],
                    "counts": {},
                    "time_range": None,
                    "runs": [],
                    "notes": [],
                }
                _write_manifest(self.store, self.manifest)

    def has_shard(self, name: str) -> bool:
        return any(s["name"] == name for s in self.manifest["shards"])

    def refresh(self) -> None:
        """Re-read the manifest (other writers may have published) and index new shards' entries."""
        self.manifest = _parse_manifest(self.store)
        for shard in self.manifest["shards"]:
            if shard["name"] in self._indexed:
                continue
            with self.store.open(shard["file"]) as fh:
                parquet = pq.ParquetFile(fh)
                if "buffer_id" in parquet.schema_arrow.names:
                    column = parquet.read(columns=["buffer_id"]).column("buffer_id").to_pylist()
                    self._entries.update(v for v in column if v is not None)
            self._indexed.add(shard["name"])

    def known_entries(self, buffer_ids: Sequence[str]) -> list[bool]:
        """Which of ``buffer_ids`` the dataset already holds (as of the last refresh)."""
        return [b in self._entries for b in buffer_ids]

    def write_shard(
        self, name: str, rows: ShardRows, note: Note = None, run: RunLine | None = None
    ) -> Commit:
        """Write ``rows`` as shard ``name`` and publish it in the manifest (idempotent), with ``run``'s
        line for this commit (replacing its last one): a killed run keeps a line for what it published."""
        if self.has_shard(name):
            return Commit(name, 0, 0)
        now = self.clock()
        payload = _table_bytes(rows.table(now))
        # The file name is unique to this write: a writer racing on the same entries never
        # replaces a file another one has published.
        file = _shard_file(name)
        self.store.write_atomic(file, payload)
        with self.lock():
            self.refresh()
            if self.has_shard(name):
                self.store.delete(file)
                return Commit(name, 0, 0)
            duplicates = 0
            if rows.buffer_ids:
                fresh = [b is None or b not in self._entries for b in rows.buffer_ids]
                duplicates = len(fresh) - sum(fresh)
                if duplicates:
                    # Another writer published some of these entries first: publish only the rest.
                    self.store.delete(file)
                    rows = rows.select(fresh)
                    if not rows:
                        log.info("shard_duplicate", shard=name, duplicates=duplicates)
                        return Commit(name, 0, duplicates)
                    name = sha256_bytes(f"{name}:{','.join(str(b) for b in rows.buffer_ids)}".encode())[:20]
                    payload = _table_bytes(rows.table(now))
                    file = _shard_file(name)
                    self.store.write_atomic(file, payload)
            commit = Commit(name, len(rows), duplicates)
            self._publish(name, file, rows, payload, now, note, None if run is None else run(commit))
        return commit

    def _publish(
        self,
        name: str,
        file: str,
        rows: ShardRows,
        payload: bytes,
        now: float,
        note: dict[str, object] | None,
        run: dict[str, object] | None = None,
    ) -> None:
        manifest = self.manifest
        if run is not None:  # replaces the run's earlier line
            manifest["runs"] = [line for line in manifest["runs"] if line.get("run") != run["run"]] + [run]
        manifest["shards"].append(
            {
                "name": name,
                "file": file,
                "rows": len(rows),
                "sha256": sha256_bytes(payload),
                "written_at": now,
            }
        )
        counts = manifest["counts"]
        for locale, label in zip(rows.locales, rows.teacher_labels, strict=True):
            per_locale = counts.setdefault(locale, {})
            per_locale[label] = per_locale.get(label, 0) + 1
        stamps = [t for t in rows.sampled_at if t is not None] or [now]
        lo, hi = min(stamps), max(stamps)
        if isinstance(manifest["time_range"], list):
            lo, hi = min(lo, manifest["time_range"][0]), max(hi, manifest["time_range"][1])
        manifest["time_range"] = [lo, hi]
        if note:
            manifest["notes"].append({"shard": name, **note})
        manifest["dataset_version"] += 1
        _write_manifest(self.store, manifest)
        self._entries.update(b for b in rows.buffer_ids if b is not None)
        self._indexed.add(name)

    def add_run(self, run: dict[str, object]) -> None:
        """Record one labelling run (its drift line) in the manifest."""
        with self.lock():
            self.manifest = _parse_manifest(self.store)
            runs = [line for line in self.manifest["runs"] if line.get("run") != run["run"]]
            self.manifest["runs"] = [*runs, run]  # replaces the line published with its last shard
            self.manifest["dataset_version"] += 1
            _write_manifest(self.store, self.manifest)


@dataclass(frozen=True)
class Batch:
    texts: list[str]
    locales: list[str]
    teacher_logits: npt.NDArray[np.float32]
    ids: list[str]
    sources: list[str]


def iter_batches(location: str | Path, batch_size: int = 4096) -> Iterator[Batch]:
    """Stream every row of the dataset's listed shards, in manifest order."""
    store = Store(location)
    for shard in _parse_manifest(store)["shards"]:
        if not store.exists(shard["file"]):
            raise DataError(f"{store.location}: manifest lists {shard['file']}, which is missing")
        with store.open(shard["file"]) as fh:
            parquet = pq.ParquetFile(fh)
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


def dataset_labels(location: str | Path) -> tuple[str, ...]:
    return tuple(read_manifest(location)["teacher"]["labels"])


def _read_shard(store: Store, shard: dict[str, Any]) -> pa.Table:
    """A whole shard in :data:`SCHEMA`; columns added since it was written come back as nulls."""
    with store.open(shard["file"]) as fh:
        table = pq.read_table(fh)
    for column in SCHEMA:
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def __getattr__(name: str) -> Any:
    """``stats``, ``compact`` and ``orphans`` live in :mod:`worker.loop.compaction` (imported late:
    it builds on this module)."""
    if name in ("compact", "orphans", "stats"):
        from worker.loop import compaction

        return getattr(compaction, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
