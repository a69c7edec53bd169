"""A worker serving a cascade: the second student's answers come out, and the escalations are counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from constant_student import CONSTANT, constant_student
from worker_harness import WorkerProcess, consume, produce, utterance

from worker.cli import main
from worker.config import MODELS_DIR
from worker.dev.harness import metric_sum
from worker.dev.services import EmbeddedService
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

pytestmark = pytest.mark.integration


def test_a_worker_serving_a_cascade_answers_with_its_second_student_below_the_margin(
    tmp_path: Path, kafka_service: EmbeddedService, redis_service: EmbeddedService
) -> None:
    second = constant_student(tmp_path / "second", CONSTANT)
    cascade = tmp_path / "cascade"
    everything = ["cascade", str(MODELS_DIR / "student"), str(second), "--escalate-below", "1.01"]
    assert main([*everything, "--out", str(cascade)]) == 0
    labels = json.loads((MODELS_DIR / "student" / "labels.json").read_text())
    asyncio.run(create_topics(kafka_service.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
    worker = WorkerProcess(
        kafka=kafka_service.bootstrap, redis=redis_service.url, run_dir=tmp_path / "run",
        group="cascade", student=cascade, partitions=2,
    )  # fmt: skip
    with worker:
        worker.wait_healthy()
        sent = [
            utterance(f"cascade-{i}", text)
            for i, text in enumerate(["set an alarm for 7", "hi", "what did I buy"])
        ]
        produce(kafka_service.bootstrap, UTTERANCES, sent)
        keys = {key for key, _ in sent}
        found = consume(kafka_service.bootstrap, [INTENTS], lambda rs: keys <= {r.key for r in rs}, 60)
        intents = [json.loads(r.value or b"{}") for r in found if r.key in keys]
        assert {i["label"] for i in intents} == {labels[1]}, intents  # every one escalated
        assert {i["model_version"] for i in intents} == {
            json.loads((cascade / "card.json").read_text())["version"]
        }
        assert metric_sum(worker.metrics(), "intent_worker_escalations_total") >= len(sent)
        assert worker.terminate() == 0
