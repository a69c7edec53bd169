"""The ``labeller_killed`` scenario of ``faults.py``: a labeller SIGKILLed mid-run, then another
one finishes the buffer. Counted in buffer entries and dataset rows (unique buffer entries,
duplicates, lost), plus whether the killed run's published rows have a run line in the manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from fault_tools import Ledger, Traffic
from redis import Redis
from streams import WORKER_TOPICS, cycled

from worker.config import REPO_ROOT
from worker.dev.harness import WorkerProcess, worker_env
from worker.dev.services import start_kafka, start_redis
from worker.stream.admin import create_topics
from worker.topics import buffer_key

SAMPLE_EVERYTHING = {
    "INTENT_SAMPLE_RATE": "1.0",
    "INTENT_SAMPLE_BUDGET_PER_S": "1000000",
    "INTENT_SAMPLE_DEDUP_WINDOW_S": "0",
}


def _labeller(redis_url: str, prefix: str, data: Path, consumer: str, log: Path) -> subprocess.Popen[bytes]:
    env = worker_env(
        {
            "INTENT_REDIS_URL": redis_url,
            "INTENT_REDIS_KEY_PREFIX": prefix,
            "INTENT_LABELLER_CLAIM_IDLE_S": "1",
            "INTENT_TEACHER_THREADS": "1",
        }
    )
    command = [sys.executable, "-m", "worker.cli", "--log-json", "label", "--once", "--shard-rows", "20",
               "--data", str(data), "--consumer", consumer]  # fmt: skip
    with log.open("ab") as handle:
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)


def _dataset(data: Path) -> tuple[list[str], list[dict[str, object]]]:
    """Buffer ids of every published row, and the manifest's run lines."""
    path = data / "manifest.json"
    if not path.exists():
        return [], []
    manifest = json.loads(path.read_text())
    ids: list[str] = []
    for shard in manifest["shards"]:
        ids += [
            str(b) for b in pq.read_table(data / shard["file"], columns=["buffer_id"]).column(0).to_pylist()
        ]
    return ids, list(manifest.get("runs", []))


def labeller_killed(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    n = args.buffer_entries
    prefix = f"faults-{time.time_ns()}"
    data = tmp / "labeller-dataset"
    with start_kafka(tmp / "tansu-labeller") as kafka, start_redis(tmp / "valkey-labeller") as redis:
        asyncio.run(create_topics(kafka.bootstrap, dict.fromkeys(WORKER_TOPICS, args.partitions)))
        client = Redis.from_url(redis.url)
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=redis.url, run_dir=tmp / "run-labeller", group="labeller",
            student=args.student, partitions=args.partitions, prefix=prefix, extra=SAMPLE_EVERYTHING,
        )  # fmt: skip
        with worker, Ledger(kafka.bootstrap) as ledger:
            worker.wait_healthy()
            traffic = Traffic(kafka.bootstrap, cycled(rows, n, "lab"), 200.0).start()
            sent = traffic.join()
            ledger.settle(len(sent.acked), timeout_s=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and int(client.xlen(buffer_key(prefix))) < n:
                time.sleep(0.5)
        buffered = int(client.xlen(buffer_key(prefix)))
        first = _labeller(redis.url, prefix, data, "killed", tmp / "labeller-killed.log")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(_dataset(data)[0]) < n // 3 and first.poll() is None:
            time.sleep(0.2)
        rows_at_kill = len(_dataset(data)[0])
        killed = first.poll() is None
        first.kill()
        first.wait()
        time.sleep(1.5)  # past INTENT_LABELLER_CLAIM_IDLE_S: the second one claims what the first held
        second = _labeller(redis.url, prefix, data, "finisher", tmp / "labeller-finisher.log")
        second.wait(timeout=600)
        ids, runs = _dataset(data)
        left = int(client.xlen(buffer_key(prefix)))
        client.close()
    unique = set(ids)
    killed_runs = [r for r in runs if str(r.get("run", "")).startswith("killed@")]
    return {
        "produced": len(sent.acked),
        "buffered": buffered,
        "killed_mid_run": killed,
        "rows_when_killed": rows_at_kill,
        "labelled": len(unique),
        "duplicates": len(ids) - len(unique),
        "lost": buffered - len(unique),
        "left_in_buffer": left,
        "finisher_exit_code": second.returncode,
        "manifest_runs": len(runs),
        "killed_run_line_rows": sum(int(r.get("rows", 0)) for r in killed_runs),
        "killed_run_has_line": bool(killed_runs),
    }
