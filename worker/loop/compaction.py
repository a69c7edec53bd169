"""Dataset maintenance: what ``intent-worker dataset stats`` prints and ``dataset compact`` does.

Compaction writes the merged shards first, then swaps the manifest in one atomic write, and
only then deletes old files: a crash at any point leaves a consistent dataset.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from worker.loop.dataset import (
    ORPHAN_GRACE_S,
    Lock,
    _both,
    _parse_manifest,
    _read_shard,
    _shard_file,
    _table_bytes,
    _write_manifest,
)
from worker.loop.store import Store, sha256_bytes


def orphans(store: Store, manifest: dict[str, Any]) -> dict[str, float]:
    """Shard and temporary files no manifest lists, with their age in seconds."""
    listed = {s["file"] for s in manifest["shards"]} | {r["file"] for r in manifest.get("retired", [])}
    now = time.time()
    return {
        name: now - mtime
        for name, mtime in store.files().items()
        if name not in listed and (name.startswith("shard-") or name.startswith(".shard-"))
    }


def stats(location: str | Path) -> dict[str, Any]:
    """What ``intent-worker dataset stats`` prints: sizes, counts, time range, drift, orphans."""
    store = Store(location)
    manifest = _parse_manifest(store)
    counts: dict[str, dict[str, int]] = manifest["counts"]
    labels: list[str] = manifest["teacher"]["labels"]
    totals = {label: sum(c.get(label, 0) for c in counts.values()) for label in labels}
    return {
        "location": store.location,
        "dataset_version": manifest["dataset_version"],
        "teacher": manifest["teacher"],
        "rows": sum(int(s["rows"]) for s in manifest["shards"]),
        "shards": len(manifest["shards"]),
        "time_range": manifest["time_range"],
        "per_label": totals,
        "per_locale": {locale: dict(sorted(c.items())) for locale, c in sorted(counts.items())},
        "runs": manifest["runs"][-5:],
        "orphans": sorted(orphans(store, manifest)),
    }


def compact(
    location: str | Path,
    *,
    target_rows: int = 100_000,
    lock: Lock | None = None,
    grace_s: float = ORPHAN_GRACE_S,
) -> dict[str, int]:
    """Merge runs of small shards into shards of about ``target_rows``; drop old orphans.

    The new shards are written first, then the manifest is swapped in one atomic write, and only
    then are the old files deleted: a crash at any point leaves a consistent dataset.
    """
    store = Store(location)
    with (store.default_lock if lock is None else partial(_both, lock, store.default_lock))():
        manifest = _parse_manifest(store)
        groups: list[list[dict[str, Any]]] = [[]]
        for shard in manifest["shards"]:
            if groups[-1] and sum(s["rows"] for s in groups[-1]) + shard["rows"] > target_rows:
                groups.append([])
            groups[-1].append(shard)
        merged: list[dict[str, Any]] = []
        retired: list[str] = []
        for group in groups:
            if len(group) < 2:
                merged.extend(group)
                continue
            table = pa.concat_tables([_read_shard(store, shard) for shard in group])
            name = sha256_bytes(":".join(s["name"] for s in group).encode())[:20]
            payload = _table_bytes(table)
            file = _shard_file(name)
            store.write_atomic(file, payload)
            merged.append(
                {
                    "name": name,
                    "file": file,
                    "rows": table.num_rows,
                    "sha256": sha256_bytes(payload),
                    "written_at": time.time(),
                    "compacted_from": [s["name"] for s in group],
                }
            )
            retired.extend(s["file"] for s in group)
        before = len(manifest["shards"])
        now = time.time()
        # Retired shards stay a grace period: a reader that read the old manifest may still open them.
        manifest["retired"] = [r for r in manifest["retired"] if now - r["at"] < grace_s] + [
            {"file": f, "at": now} for f in retired
        ]
        manifest["shards"] = merged
        manifest["dataset_version"] += 1
        _write_manifest(store, manifest)
        stale = [name for name, age in orphans(store, manifest).items() if age >= grace_s]
        for name in stale:
            store.delete(name)
    return {"shards_before": before, "shards_after": len(merged), "orphans_removed": len(stale)}
