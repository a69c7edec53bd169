"""The labelling job measured on real valkey: throughput at 1 and 2 teacher threads, two labellers
on one buffer, and ``kill -9`` at random points (for ``benchmarks/flywheel.py``).

Each check copies the same buffer entries into a buffer of its own, so they can run in any order.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis
from streams import ROOT

from worker.topics import BUFFER_FIELD, buffer_key


def cli(
    args: list[str], env: dict[str, str], *, capture: bool = True, check: bool = True
) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
    )  # fmt: skip
    print(
        f"  intent-worker {' '.join(args)}  -> exit {done.returncode} in {time.perf_counter() - started:.1f}s",
        flush=True,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"intent-worker {' '.join(args)} failed:\n{(done.stderr or '')[-3000:]}")
    return done


def label_report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return _with_rates(json.loads(done.stdout))


def _with_rates(report: dict[str, Any]) -> dict[str, Any]:
    """A labelling run's line, plus samples per second and the share of time per stage."""
    span = max(report["finished"] - report["started"], 1e-9)
    report["samples_per_s"] = round(report["entries"] / span, 1)
    total = sum(report["seconds"].values()) or 1.0
    report["time_split"] = {k: round(v / total, 3) for k, v in report["seconds"].items()}
    return report


def copy_entries(client: redis.Redis, chosen: list[Any], prefix: str) -> list[str]:
    """``chosen`` buffer entries added again to the buffer of ``prefix``; their new entry ids."""
    client.delete(buffer_key(prefix))
    with client.pipeline(transaction=False) as pipe:
        for _, fields in chosen:
            pipe.xadd(buffer_key(prefix), {BUFFER_FIELD: fields[BUFFER_FIELD.encode()]})
        return [eid.decode() for eid in pipe.execute()]


def dataset_buffer_ids(location: Path) -> Counter[str]:
    """How often each buffer entry appears in the dataset's listed shards."""
    counts: Counter[str] = Counter()
    manifest = json.loads((location / "manifest.json").read_text())
    for shard in manifest["shards"]:
        counts.update(
            pq.read_table(location / shard["file"], columns=["buffer_id"]).column("buffer_id").to_pylist()
        )
    return counts


#: Shard size of the labellers killed or run side by side: small, so that each run of a few
#: thousand entries writes many shards and the two labellers (and the kills) interleave.
CHECK_SHARD_ROWS = 128


def label_process(
    env: dict[str, str], prefix: str, location: Path, consumer: str, threads: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--log-json", "label", "--once", "--data", str(location), "--consumer", consumer],
        env={**env, "INTENT_REDIS_KEY_PREFIX": prefix, "INTENT_TEACHER_THREADS": str(threads),
             "INTENT_LABELLER_CLAIM_IDLE_S": "2", "INTENT_LABELLER_SHARD_ROWS": str(CHECK_SHARD_ROWS)},
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def crash_test(
    client: redis.Redis, env: dict[str, str], work: Path, chosen: list[Any], kills: int
) -> dict[str, Any]:
    """Labellers (the embedded teacher) killed with SIGKILL at random points, then one that finishes."""
    ids = copy_entries(client, chosen, "crash")
    location = work / "crash"
    shutil.rmtree(location, ignore_errors=True)
    rng = random.Random(3)
    points = []
    for attempt in range(kills):
        proc = label_process(env, "crash", location, f"crash{attempt % 2}", threads=2)
        delay = rng.uniform(3.0, 7.0)  # loading the teacher takes ~2-3 s: most kills land mid-labelling
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.communicate()
        points.append(
            {
                "after_s": round(delay, 2),
                "killed": proc.returncode == -9,
                "rows_so_far": sum(dataset_buffer_ids(location).values())
                if (location / "manifest.json").exists()
                else 0,
            }
        )
    time.sleep(2.5)  # past the claim timeout: the last run also claims what the killed ones held
    final = label_process(env, "crash", location, "survivor", threads=2)
    final_report = json.loads(final.communicate(timeout=600)[0])
    counts = dataset_buffer_ids(location)
    return {
        "buffered": len(ids),
        "kills": sum(p["killed"] for p in points),
        "points": points,
        "rows": sum(counts.values()),
        "lost": len(set(ids) - set(counts)),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "final_run": {k: final_report[k] for k in ("entries", "rows", "duplicates", "claimed")},
        "buffer_left": int(client.xlen(buffer_key("crash"))),
    }


def parallel_labellers(
    client: redis.Redis, env: dict[str, str], work: Path, chosen: list[Any]
) -> dict[str, Any]:
    """Two labellers, one teacher thread each, on one buffer and one dataset at once."""
    ids = copy_entries(client, chosen, "pair")
    location = work / "pair"
    shutil.rmtree(location, ignore_errors=True)
    started = time.perf_counter()
    procs = [label_process(env, "pair", location, name, threads=1) for name in ("left", "right")]
    reports = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    elapsed = time.perf_counter() - started
    counts = dataset_buffer_ids(location)
    return {
        "buffered": len(ids),
        "rows_per_labeller": {r["run"].split("@")[0]: r["rows"] for r in reports},
        "rows": sum(counts.values()),
        "lost": len(set(ids) - set(counts)),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "samples_per_s_together": round(len(ids) / elapsed, 1),
    }


def labeller_throughput(
    client: redis.Redis, env: dict[str, str], work: Path, chosen: list[Any]
) -> dict[str, Any]:
    """The same buffer entries labelled at 1 and at 2 teacher threads, with the time split."""
    out: dict[str, Any] = {}
    for threads in (1, 2):
        prefix = f"throughput{threads}"
        copy_entries(client, chosen, prefix)
        scratch = work / f"throughput-{threads}"
        shutil.rmtree(scratch, ignore_errors=True)
        done = cli(
            ["--log-json", "label", "--once", "--data", str(scratch), "--consumer", f"bench{threads}"],
            {**env, "INTENT_REDIS_KEY_PREFIX": prefix, "INTENT_TEACHER_THREADS": str(threads)},
        )
        report = label_report(done)
        out[f"threads_{threads}"] = {
            k: report[k] for k in ("entries", "rows", "samples_per_s", "seconds", "time_split")
        }
    out["speedup_2_vs_1"] = round(out["threads_2"]["samples_per_s"] / out["threads_1"]["samples_per_s"], 2)
    return out
