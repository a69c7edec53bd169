"""Hot reload in the real worker: a promoted model is served from the next batch on, a broken one
is refused while the worker keeps serving, and a worker started later serves the promoted one."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

from worker_harness import WorkerProcess, consume, produce, utterance

from worker.dev.services import EmbeddedService, start_kafka
from worker.models.registry import Registry
from worker.schemas import Intent
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES


def _copy(student: Path, out: Path, version: str) -> Path:
    shutil.copytree(student, out)
    card = json.loads((out / "card.json").read_text())
    (out / "card.json").write_text(json.dumps({**card, "version": version}))
    return out


def _send_and_collect(kafka: str, ids: list[str], seen: dict[str, str]) -> None:
    produce(kafka, UTTERANCES, (utterance(uid, f"set an alarm number {uid}") for uid in ids))

    def done(records: list) -> bool:  # type: ignore[type-arg]
        for record in records:
            intent = Intent.from_json_bytes(record.value)
            seen[intent.id] = intent.model_version
        return set(ids) <= set(seen)

    consume(kafka, [INTENTS], done, timeout_s=60)


def _wait_for_version(worker: WorkerProcess, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.wait_healthy().get("model_version") == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"the worker did not switch to {version}:\n{worker.log()[-3000:]}")


def test_promoted_models_are_hot_reloaded_and_broken_ones_refused(
    tmp_path: Path, redis_service: EmbeddedService, student: Path, unique_name: str
) -> None:
    registry = Registry(tmp_path / "registry")
    extra = {"INTENT_REGISTRY_DIR": str(registry.root), "INTENT_MODEL_POLL_INTERVAL_S": "0.2"}
    with start_kafka(tmp_path / "tansu") as kafka:
        asyncio.run(create_topics(kafka.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=redis_service.url, run_dir=tmp_path / "run", group=unique_name,
            prefix=unique_name, student=student, partitions=2, extra=extra,
        )  # fmt: skip
        with worker:
            shipped = worker.wait_healthy()["model_version"]
            seen: dict[str, str] = {}
            _send_and_collect(kafka.bootstrap, [f"a{i}" for i in range(100)], seen)
            assert set(seen.values()) == {shipped}

            registry.publish(registry.add(_copy(student, tmp_path / "hot", "cnn-hot")))
            _wait_for_version(worker, "cnn-hot")
            _send_and_collect(kafka.bootstrap, [f"b{i}" for i in range(100)], seen)
            assert {seen[f"b{i}"] for i in range(100)} == {"cnn-hot"}

            broken = _copy(student, tmp_path / "broken", "cnn-broken")
            (broken / "model.onnx").write_bytes(b"not an onnx model")
            registry.publish(registry.add(broken))
            deadline = time.monotonic() + 30
            while worker.metrics().get('intent_worker_model_reloads_total{result="failed"}', 0) < 1:
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.2)
            _send_and_collect(kafka.bootstrap, [f"c{i}" for i in range(100)], seen)
            assert {seen[f"c{i}"] for i in range(100)} == {"cnn-hot"}  # still the last good one
            assert worker.metrics()['intent_worker_model_info{version="cnn-hot"}'] == 1

        later = WorkerProcess(
            kafka=kafka.bootstrap, redis=redis_service.url, run_dir=tmp_path / "run2", group=unique_name,
            prefix=unique_name, student=student, partitions=2, extra=extra,
        )  # fmt: skip
        with later:
            # The pointer names the broken model: a new worker starts on the last good one.
            assert later.wait_healthy()["model_version"] == "cnn-hot"
            old, now = registry.rollback()
            assert (old.version, now.version) == ("cnn-broken", "cnn-hot")


def test_a_reload_loads_the_model_once_where_it_runs(
    tmp_path: Path, redis_service: EmbeddedService, student: Path, unique_name: str
) -> None:
    """Start-up and each reload load the student once: in the inference child (the worker reads
    only the card and labels), or in the worker itself without the child."""
    registry = Registry(tmp_path / "registry")
    extra = {"INTENT_REGISTRY_DIR": str(registry.root), "INTENT_MODEL_POLL_INTERVAL_S": "0.2"}

    def loads(worker: WorkerProcess) -> dict[str, float]:
        metrics = worker.metrics()
        return {
            p: metrics[f'intent_worker_model_loads_total{{process="{p}"}}'] for p in ("worker", "inference")
        }

    with start_kafka(tmp_path / "tansu") as kafka:
        asyncio.run(create_topics(kafka.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        for where, in_process in (("inference", "true"), ("worker", "false")):
            worker = WorkerProcess(
                kafka=kafka.bootstrap, redis=redis_service.url, run_dir=tmp_path / where,
                group=f"{unique_name}-{where}", prefix=f"{unique_name}-{where}", student=student,
                partitions=2, extra={**extra, "INTENT_INFERENCE_PROCESS": in_process},
            )  # fmt: skip
            with worker:
                worker.wait_healthy()
                assert loads(worker) == {"worker": 0, "inference": 0, where: 1}
                version = f"cnn-once-{where}"
                registry.publish(registry.add(_copy(student, tmp_path / version, version)))
                _wait_for_version(worker, version)
                assert loads(worker) == {"worker": 0, "inference": 0, where: 2}
                started = [e for e in worker.log_events() if e.get("event") == "inference_process_started"]
                assert len(started) == (2 if where == "inference" else 0)
