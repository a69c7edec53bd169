"""A new label set reaches the real worker by hot reload, and every intent says which one it is."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

from worker_harness import WorkerProcess, consume, produce, utterance

from worker.dev.services import EmbeddedService, start_kafka
from worker.models.onnx import label_names_id
from worker.models.registry import Registry
from worker.schemas import Intent
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

NEW_SET = "routes@0123456789ab"


def _relabel(student: Path, out: Path, version: str, labels: list[str], label_set: str | None) -> Path:
    shutil.copytree(student, out)
    (out / "labels.json").write_text(json.dumps(labels))
    card = {**json.loads((out / "card.json").read_text()), "version": version, "labels": labels}
    if label_set is not None:
        card["label_set"] = label_set
    (out / "card.json").write_text(json.dumps(card))
    return out


def _intents(kafka: str, ids: list[str]) -> dict[str, Intent]:
    produce(kafka, UTTERANCES, (utterance(uid, f"buy a new kettle {uid}") for uid in ids))
    seen: dict[str, Intent] = {}

    def done(records: list) -> bool:  # type: ignore[type-arg]
        for record in records:
            intent = Intent.from_json_bytes(record.value)
            seen[intent.id] = intent
        return set(ids) <= set(seen)

    consume(kafka, [INTENTS], done, timeout_s=60)
    return {uid: seen[uid] for uid in ids}


def _wait_for(worker: WorkerProcess, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.wait_healthy().get("model_version") != version:
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)


def test_a_declared_label_set_is_hot_reloaded_and_carried_by_every_intent(
    tmp_path: Path, redis_service: EmbeddedService, student: Path, unique_name: str
) -> None:
    registry = Registry(tmp_path / "registry")
    extra = {"INTENT_REGISTRY_DIR": str(registry.root), "INTENT_MODEL_POLL_INTERVAL_S": "0.2"}
    shipped_set = label_names_id(json.loads((student / "labels.json").read_text()))
    with start_kafka(tmp_path / "tansu") as kafka:
        asyncio.run(create_topics(kafka.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=redis_service.url, run_dir=tmp_path / "run", group=unique_name,
            prefix=unique_name, student=student, partitions=2, extra=extra,
        )  # fmt: skip
        with worker:
            shipped = worker.wait_healthy()["model_version"]
            before = _intents(kafka.bootstrap, [f"a{i}" for i in range(50)])
            assert {(i.model_version, i.label_set) for i in before.values()} == {(shipped, shipped_set)}

            # An undeclared student with other names: the old safety check still refuses it.
            shipped_release = registry.add(student)
            registry.publish(shipped_release)
            bad = _relabel(student, tmp_path / "bad", "cnn-bad", ["Action", "Other", "Buy"], None)
            registry.publish(registry.add(bad))
            deadline = time.monotonic() + 30
            while worker.metrics().get('intent_worker_model_reloads_total{result="failed"}', 0) < 1:
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.2)
            assert "has labels" in worker.log()
            registry.publish(shipped_release)

            # A student whose card names a new label set is served, and says so in every intent.
            new = _relabel(student, tmp_path / "new", "cnn-routes", ["Action", "Other", "Purchase"], NEW_SET)
            registry.publish(registry.add(new))
            _wait_for(worker, "cnn-routes")
            after = _intents(kafka.bootstrap, [f"b{i}" for i in range(50)])
            assert {(i.model_version, i.label_set) for i in after.values()} == {("cnn-routes", NEW_SET)}
            assert all(set(i.scores) == {"Action", "Other", "Purchase"} for i in after.values())
            assert "label_set_changed" in worker.log()

            # Rolled back: the old label set again.
            assert registry.rollback()[1].version == shipped
            _wait_for(worker, shipped)
            back = _intents(kafka.bootstrap, [f"c{i}" for i in range(50)])
            assert {(i.model_version, i.label_set) for i in back.values()} == {(shipped, shipped_set)}
