"""Run the real ``intent-worker run`` as a subprocess against test services, and talk to Kafka.

The worker gets its settings through ``INTENT_*`` variables, as in production; nothing of the
test process's own environment that starts with ``INTENT_`` leaks into it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from prometheus_client.parser import text_string_to_metric_families

from worker.config import MODELS_DIR, REPO_ROOT
from worker.services import free_port


def student_dir() -> Path:
    """The shipped student in models/student; its absence fails the test."""
    candidate = MODELS_DIR / "student"
    if not (candidate / "model.onnx").is_file():
        pytest.fail(f"no student to serve: {candidate} holds no model.onnx")
    return candidate


def worker_env(settings: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTENT_")}
    env.update(settings)
    return env


class WorkerProcess:
    """``python -m worker.cli --log-json run`` with its log in a file; stopped on exit."""

    def __init__(
        self,
        *,
        kafka: str,
        redis: str,
        run_dir: Path,
        group: str,
        prefix: str,
        student: Path,
        partitions: int = 2,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.kafka = kafka
        self.run_dir = run_dir
        self.port = free_port()
        self.web = f"http://127.0.0.1:{self.port}"
        self.partitions = partitions
        self.env = worker_env(
            {
                "INTENT_KAFKA_BOOTSTRAP": kafka,
                "INTENT_REDIS_URL": redis,
                "INTENT_STUDENT_DIR": str(student),
                "INTENT_RUN_DIR": str(run_dir),
                "INTENT_CONSUMER_GROUP": group,
                "INTENT_REDIS_KEY_PREFIX": prefix,
                "INTENT_WEB_PORT": str(self.port),
                # Short sessions: a worker joins in about 2 s, a stopped one's partitions move in ~4 s.
                "INTENT_BROKER_SESSION_TIMEOUT_S": "3.0",
                "INTENT_BROKER_HEARTBEAT_INTERVAL_S": "0.8",
                "INTENT_COMMIT_INTERVAL_S": "0.5",
                **(extra or {}),
            }
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / f"worker-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "--log-json",
                    "run",
                    "--partitions",
                    str(self.partitions),
                ],
                env=self.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def __enter__(self) -> Self:
        return self if self.process is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.web + path, timeout=2) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), error.read()

    def wait_healthy(self, timeout_s: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                pytest.fail(
                    f"the worker exited with {self.process and self.process.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                status, body = self.get("/health")
            except OSError:
                status, body = 0, b""
            if status == 200:
                return dict(json.loads(body))
            time.sleep(0.2)
        pytest.fail(f"the worker was not healthy within {timeout_s} s:\n{self.log()[-4000:]}")

    def metrics(self) -> dict[str, float]:
        """Samples as ``name{label="value",...}`` → value (labels sorted)."""
        status, body = self.get("/metrics")
        assert status == 200
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within {timeout_s} s of SIGTERM:\n{self.log()[-4000:]}")


# -- Kafka helpers -----------------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    async def run() -> int:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024
        )
        await producer.start()
        try:
            acks = [await producer.send(topic, value, key=key) for key, value in messages]
            await asyncio.gather(*acks)
            return len(acks)
        finally:
            await producer.stop()

    return asyncio.run(run())


def consume(
    bootstrap: str,
    topics: Sequence[str],
    until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    timeout_s: float = 60.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topics`` from the start, until ``until(records)`` or the timeout."""

    async def run() -> list[ConsumerRecord[bytes, bytes]]:
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not until(records):
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
        finally:
            await consumer.stop()
        return records

    return asyncio.run(run())


def utterance(uid: str, text: str, locale: str | None = "en") -> tuple[bytes, bytes]:
    record: dict[str, object] = {"id": uid, "text": text}
    if locale is not None:
        record["locale"] = locale
    return uid.encode(), json.dumps(record).encode()
