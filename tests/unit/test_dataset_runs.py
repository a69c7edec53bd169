"""A labelling run's line is published with each of its shards, so a run that is killed between
shards still has a line counting what it published; its last line replaces the earlier ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.loop.dataset import Commit, DatasetWriter, ShardRows, read_manifest

LABELS = ("Action", "Other", "Recall")


def rows(n: int, start: int = 0) -> ShardRows:
    return ShardRows(
        ids=[f"r{start + i}" for i in range(n)],
        texts=[f"text {start + i}" for i in range(n)],
        locales=["en"] * n,
        teacher_logits=list(np.zeros((n, 3), dtype=np.float32)),
        teacher_labels=["Recall"] * n,
        sources=["buffer"] * n,
        buffer_ids=[f"{start + i}-0" for i in range(n)],
    )


def test_a_killed_runs_published_rows_have_a_run_line(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    published: list[int] = []

    def line(commit: Commit) -> dict[str, object]:
        published.append(commit.rows)
        return {"run": "killed@1", "entries": sum(published), "rows": sum(published), "complete": False,
                "disagreement": {}}  # fmt: skip

    writer.write_shard("a", rows(4), run=line)
    writer.write_shard("b", rows(3, start=4), run=line)
    # ... and the labeller dies here: no add_run.
    runs = read_manifest(tmp_path / "ds")["runs"]
    assert runs == [{"run": "killed@1", "entries": 7, "rows": 7, "complete": False, "disagreement": {}}]


def test_the_final_line_replaces_the_interim_one(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "teacher@1", LABELS)
    writer.add_run({"run": "earlier@0", "entries": 1, "rows": 1, "disagreement": {}})
    writer.write_shard(
        "a", rows(2), run=lambda c: {"run": "r@1", "rows": c.rows, "entries": 2, "disagreement": {}}
    )
    writer.add_run({"run": "r@1", "rows": 2, "entries": 2, "complete": True, "disagreement": {}})
    runs = read_manifest(tmp_path / "ds")["runs"]
    assert [(r["run"], r.get("complete")) for r in runs] == [("earlier@0", None), ("r@1", True)]
