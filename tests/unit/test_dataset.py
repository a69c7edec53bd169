"""The versioned distillation dataset: shards, manifest, idempotence, streaming reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.errors import DataError
from worker.loop.dataset import DatasetWriter, ShardRows, dataset_labels, iter_batches, read_manifest

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
    with pytest.raises(DataError, match="labelled by teacher@1"):
        DatasetWriter(tmp_path / "ds", "teacher@2", LABELS)
    (tmp_path / "ds" / read_manifest(tmp_path / "ds")["shards"][0]["file"]).unlink()
    with pytest.raises(DataError, match="missing"):
        list(iter_batches(tmp_path / "ds"))
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DataError, match="schema_version"):
        read_manifest(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(DataError, match="not a dataset_manifest"):
        read_manifest(tmp_path / "ds")
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(tmp_path / "nothing")


def _buffer_rows(ids: list[str]) -> ShardRows:
    rows = _rows(len(ids))
    rows.buffer_ids = list(ids)
    rows.sampled_at = [100.0 + i for i in range(len(ids))]
    return rows


def test_two_writers_publishing_the_same_entries_keep_each_row_once(tmp_path: Path) -> None:
    left = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    right = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)  # opened before left publishes
    assert left.write_shard("a", _buffer_rows(["1-0", "2-0", "3-0"])).rows == 3
    commit = right.write_shard("b", _buffer_rows(["2-0", "3-0", "4-0"]))  # a reclaimed overlap
    assert (commit.rows, commit.duplicates) == (1, 2) and commit.name != "b"
    assert right.write_shard("c", _buffer_rows(["1-0"])).rows == 0
    manifest = read_manifest(tmp_path / "ds")
    assert [s["rows"] for s in manifest["shards"]] == [3, 1]
    assert sorted(p.name for p in (tmp_path / "ds").glob("shard-*")) == sorted(
        s["file"] for s in manifest["shards"]
    )
    right.refresh()
    assert right.known_entries(["1-0", "4-0", "5-0"]) == [True, True, False]


def test_compaction_merges_shards_keeps_every_row_and_drops_stale_orphans(tmp_path: Path) -> None:
    from worker.loop.dataset import compact, stats

    writer = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    for i in range(5):
        writer.write_shard(f"s{i}", _rows(4, start=4 * i))
    (tmp_path / "ds" / "shard-orphan.parquet").write_bytes(b"left by a crash")
    assert stats(tmp_path / "ds")["orphans"] == ["shard-orphan.parquet"]
    before = [i for b in iter_batches(tmp_path / "ds") for i in b.ids]
    report = compact(tmp_path / "ds", target_rows=8, grace_s=0)
    assert report == {"shards_before": 5, "shards_after": 3, "orphans_removed": 1}
    assert [i for b in iter_batches(tmp_path / "ds") for i in b.ids] == before
    summary = stats(tmp_path / "ds")
    assert (summary["rows"], summary["shards"], summary["orphans"]) == (20, 3, [])
    assert summary["per_label"] == {"Action": 0, "Other": 0, "Recall": 20}


def test_a_dataset_on_an_fsspec_url_works_like_a_directory() -> None:
    location = "memory://datasets/test-fsspec"
    writer = DatasetWriter(location, "teacher@1", LABELS)
    writer.write_shard("a", _buffer_rows(["1-0", "2-0"]))
    writer.add_run({"run": "r1", "disagreement": {"*": {"n": 2, "rate": 0.5}}})
    manifest = read_manifest(location)
    assert manifest["dataset_version"] == 2 and manifest["runs"][0]["run"] == "r1"
    assert manifest["time_range"] == [100.0, 101.0]
    assert [i for b in iter_batches(location) for i in b.ids] == ["r0", "r1"]
