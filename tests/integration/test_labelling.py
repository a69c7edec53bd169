"""The labelling job on a real valkey-server: consumer group, crash safety, shared work, dead letters.

The teacher here is a user ONNX teacher (``OnnxTeacher``) built from the shipped student's
directory: a real model, fast enough to label thousands of entries in a test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from worker.dev.harness import worker_env
from worker.dev.services import EmbeddedService
from worker.loop.dataset import DatasetWriter, read_manifest
from worker.loop.labelling import BufferLabeller, LabellerOptions
from worker.schemas import BufferSample, SampleReason
from worker.teacher import OnnxTeacher
from worker.topics import BUFFER_FIELD, buffer_dead_key, buffer_key

LOCALES = ("en", "de", "fr", "ja", "ko")


def _sample(i: int) -> BufferSample:
    label = ("Action", "Other", "Recall")[i % 3]
    return BufferSample(
        id=f"u{i}",
        text=f"utterance number {i} please {'remind me' if i % 2 else 'play music'}",
        locale=LOCALES[i % len(LOCALES)],
        label=label,
        logits=(0.1, 0.2, 0.3),
        scores={"Action": 0.3, "Other": 0.3, "Recall": 0.4},
        margin=0.1,
        model_version="cnn-test",
        stratum=f"{LOCALES[i % len(LOCALES)]}|{label}",
        reason=SampleReason.STRATUM,
        sampling_probability=0.5,
        weight=2.0,
        timestamp=1_700_000_000.0 + i,
    )


def _fill(client: redis.Redis, prefix: str, n: int) -> list[str]:
    ids = []
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(buffer_key(prefix), {BUFFER_FIELD: _sample(i).to_json_bytes()})
        ids = [eid.decode() for eid in pipe.execute()]
    return ids


def _dataset_rows(location: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for shard in read_manifest(location)["shards"]:
        rows += pq.read_table(location / shard["file"]).to_pylist()
    return rows


@pytest.fixture
def client(redis_service: EmbeddedService) -> redis.Redis:
    return redis.Redis.from_url(redis_service.url)


@pytest.fixture(scope="module")
def teacher(student: Path) -> OnnxTeacher:
    return OnnxTeacher.from_directory(student)


def _labeller(
    client: redis.Redis, teacher: OnnxTeacher, location: Path, prefix: str, consumer: str, **options: object
) -> BufferLabeller:
    writer = DatasetWriter(
        location,
        teacher.identity,
        teacher.labels,
        lock=BufferLabeller.redis_lock(client, prefix, str(location)),
    )
    return BufferLabeller(
        client, teacher, writer, LabellerOptions(prefix=prefix, consumer=consumer, **options)
    )  # type: ignore[arg-type]


def test_a_run_labels_every_entry_acknowledges_it_and_records_drift(
    client: redis.Redis, teacher: OnnxTeacher, tmp_path: Path, unique_name: str
) -> None:
    ids = _fill(client, unique_name, 300)
    client.xadd(buffer_key(unique_name), {BUFFER_FIELD: b"\xff not json"})
    client.xadd(
        buffer_key(unique_name), {BUFFER_FIELD: json.dumps({"schema_version": 1, "id": "x"}).encode()}
    )
    labeller = _labeller(client, teacher, tmp_path / "ds", unique_name, "one", shard_rows=64)

    report = labeller.run_once()

    assert (report.entries, report.rows, report.bad, report.duplicates) == (302, 300, 2, 0)
    rows = _dataset_rows(tmp_path / "ds")
    assert sorted(r["buffer_id"] for r in rows) == sorted(ids)
    first = next(r for r in rows if r["id"] == "u0")
    assert first["model_version"] == "cnn-test" and first["weight"] == 2.0 and first["stratum"] == "en|Action"
    assert first["teacher_label"] in teacher.labels and len(first["teacher_logits"]) == 3  # type: ignore[arg-type]
    assert first["sampled_at"] == 1_700_000_000.0 and first["student_logits"] == pytest.approx(
        [0.1, 0.2, 0.3]
    )
    assert client.xlen(buffer_key(unique_name)) == 0  # acknowledged entries are deleted
    dead = client.xrange(buffer_dead_key(unique_name))
    assert [d[1][b"original"] for d in dead] == [
        b"\xff not json",
        json.dumps({"schema_version": 1, "id": "x"}).encode(),
    ]
    assert [d[1][b"reason"] for d in dead] == [b"not_utf8", b"text_missing"]
    manifest = read_manifest(tmp_path / "ds")
    (run,) = manifest["runs"]
    assert set(run["disagreement"]) == {*LOCALES, "*"}
    assert run["disagreement"]["*"]["n"] == 300
    assert 0.0 <= run["disagreement"]["en"]["rate"] <= 1.0
    assert manifest["teacher"]["id"] == teacher.identity and manifest["teacher"]["hash"]
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 300
    assert manifest["time_range"] == [1_700_000_000.0, 1_700_000_299.0]
    assert labeller.run_once().entries == 0  # nothing left


def test_entries_of_a_labeller_that_died_are_claimed_after_the_idle_timeout(
    client: redis.Redis, teacher: OnnxTeacher, tmp_path: Path, unique_name: str
) -> None:
    ids = _fill(client, unique_name, 50)
    dead = _labeller(client, teacher, tmp_path / "ds", unique_name, "dead", shard_rows=20)
    entries, _ = dead.next_entries()  # read, never acknowledged: it "dies" here
    assert len(entries) == 20
    survivor = _labeller(client, teacher, tmp_path / "ds", unique_name, "survivor", claim_idle_s=0.3)
    assert survivor.run_once().rows == 30  # the dead one's entries are not idle long enough yet
    time.sleep(0.4)
    report = survivor.run_once()
    assert (report.rows, report.claimed) == (20, 20)
    assert sorted(r["buffer_id"] for r in _dataset_rows(tmp_path / "ds")) == sorted(ids)


def _label_process(
    redis_url: str,
    prefix: str,
    location: Path,
    student: Path,
    consumer: str,
    claim_idle_s: float,
    capture: bool = False,
) -> subprocess.Popen[bytes]:
    env = worker_env(
        {
            "INTENT_REDIS_URL": redis_url,
            "INTENT_REDIS_KEY_PREFIX": prefix,
            "INTENT_TEACHER_DIR": str(student),
            "INTENT_LABELLER_CLAIM_IDLE_S": str(claim_idle_s),
            "INTENT_TEACHER_THREADS": "1",
            "RAYON_NUM_THREADS": "1",
        }
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "--log-json",
            "label",
            "--once",
            "--data",
            str(location),
            "--consumer",
            consumer,
            "--shard-rows",
            "20",
        ],
        env=env,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_kill_9_at_random_points_loses_no_sample_and_duplicates_none(
    client: redis.Redis, redis_service: EmbeddedService, student: Path, tmp_path: Path, unique_name: str
) -> None:
    ids = _fill(client, unique_name, 3000)
    location = tmp_path / "ds"
    rng = random.Random(7)
    kills = attempt = 0
    while kills < 6 and attempt < 40:  # until six labellers died mid-run, however fast the machine
        if client.xlen(buffer_key(unique_name)) == 0:
            ids += _fill(client, unique_name, 3000)
        # Half the restarts reuse a consumer name (own pending entries), half are new (claims).
        consumer = f"c{attempt % 3}" if attempt % 2 else f"fresh{attempt}"
        attempt += 1
        proc = _label_process(redis_service.url, unique_name, location, student, consumer, claim_idle_s=0.2)
        try:
            proc.wait(timeout=rng.uniform(0.6, 2.0))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
    time.sleep(0.3)
    final = _label_process(redis_service.url, unique_name, location, student, "final", claim_idle_s=0.2)
    assert final.wait(timeout=120) == 0
    rows = _dataset_rows(location)
    counts = Counter(r["buffer_id"] for r in rows)
    assert kills >= 6, "the test must actually kill labellers mid-run"
    assert sorted(counts) == sorted(ids), "every buffered sample is in the dataset"
    assert max(counts.values()) == 1, "no sample is in the dataset twice"
    assert client.xlen(buffer_key(unique_name)) == 0
    assert sum(s["rows"] for s in read_manifest(location)["shards"]) == len(ids)


def test_two_labellers_in_parallel_share_the_work_without_duplicates(
    client: redis.Redis, redis_service: EmbeddedService, student: Path, tmp_path: Path, unique_name: str
) -> None:
    ids = _fill(client, unique_name, 3000)
    location = tmp_path / "ds"
    procs = [
        _label_process(redis_service.url, unique_name, location, student, name, claim_idle_s=60, capture=True)
        for name in ("left", "right")
    ]
    reports = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(r["rows"] > 0 for r in reports), reports
    assert sum(r["rows"] for r in reports) == len(ids)
    rows = _dataset_rows(location)
    assert sorted(r["buffer_id"] for r in rows) == sorted(ids)


def test_the_periodic_job_runs_once_enough_samples_wait(
    client: redis.Redis, teacher: OnnxTeacher, tmp_path: Path, unique_name: str
) -> None:
    import threading

    labeller = _labeller(client, teacher, tmp_path / "ds", unique_name, "periodic")
    runs: list[int] = []
    original = labeller.run_once

    def counted(**kwargs: object) -> object:
        report = original(**kwargs)  # type: ignore[arg-type]
        runs.append(report.rows)
        return report

    labeller.run_once = counted  # type: ignore[method-assign]
    deadline = time.monotonic() + 30
    job = threading.Thread(
        target=labeller.run_forever,
        kwargs={
            "every_s": 3600.0,
            "min_samples": 50,
            "poll_s": 0.05,
            "should_stop": lambda: bool(runs[1:]) or time.monotonic() > deadline,
        },
    )
    _fill(client, unique_name, 30)
    job.start()
    time.sleep(0.5)
    assert runs == [30]  # the first run is due at once (--every); then it waits for 50 samples
    _fill(client, unique_name, 49)
    time.sleep(0.5)
    assert runs == [30]
    client.xadd(buffer_key(unique_name), {BUFFER_FIELD: _sample(999).to_json_bytes()})
    job.join(timeout=30)
    assert runs == [30, 50]


def test_an_entry_that_keeps_failing_is_dead_lettered_not_retried_forever(
    client: redis.Redis, teacher: OnnxTeacher, tmp_path: Path, unique_name: str
) -> None:
    (entry_id,) = _fill(client, unique_name, 1)
    labeller = _labeller(client, teacher, tmp_path / "ds", unique_name, "crashy", max_deliveries=2)
    for delivery in (1, 2):  # read, then "crash" before acknowledging
        entries, _ = labeller.next_entries()
        assert [e.id for e in entries] == [entry_id], delivery
    entries, _ = labeller.next_entries()  # the third delivery
    assert entries == []
    (dead,) = client.xrange(buffer_dead_key(unique_name))
    assert dead[1][b"reason"] == b"poison" and dead[1][b"entry"] == entry_id.encode()
    assert client.xlen(buffer_key(unique_name)) == 0
