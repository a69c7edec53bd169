"""The versioned distillation dataset: shards, manifest, idempotence, streaming reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.dataset import DatasetWriter, ShardRows, dataset_labels, iter_batches, read_manifest
from worker.errors import DataError

LABELS = ("Action", "Other", "Recall")


def _rows(n: int, start: int = 0) -> ShardRows:
    logits = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return ShardRows(
        ids=[f"r{start + i}" for i in range(n)],
        texts=[f"text {start + i}" for i in range(n)],
        locales=["en" if i % 2 else "de" for i in range(n)],
        teacher_logits=list(logits),
        teacher_labels=["Recall"] * n,
        sources=["test"] * n,
    )


def test_shards_publish_in_the_manifest_and_stream_back(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    writer.write_shard("a", _rows(5))
    writer.write_shard("b", _rows(3, start=5))
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["dataset_version"] == 2
    assert [s["rows"] for s in manifest["shards"]] == [5, 3]  # type: ignore[index, union-attr]
    assert manifest["counts"] == {"de": {"Recall": 5}, "en": {"Recall": 3}}
    batches = list(iter_batches(tmp_path / "ds", batch_size=4))
    ids = [i for b in batches for i in b.ids]
    assert ids == [f"r{i}" for i in range(8)]
    np.testing.assert_array_equal(batches[0].teacher_logits[1], [3, 4, 5])
    assert dataset_labels(tmp_path / "ds") == LABELS


def test_writing_the_same_shard_twice_adds_nothing(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    writer.write_shard("a", _rows(5))
    writer.write_shard("a", _rows(5))
    reopened = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    reopened.write_shard("a", _rows(5))
    assert read_manifest(tmp_path / "ds")["dataset_version"] == 1
    assert sum(len(b.ids) for b in iter_batches(tmp_path / "ds")) == 5


def test_other_labels_and_broken_manifests_are_refused(tmp_path: Path) -> None:
    DatasetWriter(tmp_path / "ds", "teacher@1", LABELS).write_shard("a", _rows(2))
    with pytest.raises(DataError, match="labels"):
        DatasetWriter(tmp_path / "ds", "teacher@2", ("Yes", "No"))
    (tmp_path / "ds" / "shard-a.parquet").unlink()
    with pytest.raises(DataError, match="missing"):
        list(iter_batches(tmp_path / "ds"))
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DataError, match="schema_version"):
        read_manifest(tmp_path / "ds")
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(tmp_path / "nothing")
