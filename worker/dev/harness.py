"""The real ``intent-worker run`` in a subprocess, for the tests, the benchmarks and the demos.

The worker gets its settings through ``INTENT_*`` variables, as in production; nothing of the
calling process's own ``INTENT_*`` environment leaks into it. Every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from prometheus_client.parser import text_string_to_metric_families

from worker.config import REPO_ROOT
from worker.dev.services import free_port


class HarnessError(RuntimeError):
    """The worker under test exited, or did not become healthy in time; the message ends with its log."""


def worker_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ``INTENT_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTENT_")}
    env.update(settings)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerProcess:
    """``python -m worker.cli --log-json run`` with its log in ``run_dir``; stopped on exit.

    ``extra`` settings override the class's ``settings``, which override the defaults set here
    (the services, the student, a free loopback web port, one inference thread).
    """

    #: Settings a subclass gives every worker it starts.
    settings: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        *,
        kafka: str,
        redis: str,
        run_dir: Path,
        group: str,
        student: Path,
        partitions: int = 2,
        prefix: str | None = None,
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
                "INTENT_REDIS_KEY_PREFIX": prefix or f"harness-{group}",
                "INTENT_WEB_PORT": str(self.port),
                "INTENT_INFERENCE_THREADS": "1",
                **self.settings,
                **(extra or {}),
            }
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / f"worker-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        #: Set when :meth:`terminate` had to kill a worker that ignored SIGTERM.
        self.killed_after_timeout = False

    def start(self) -> Self:
        command = [
            sys.executable,
            "-m",
            "worker.cli",
            "--log-json",
            "run",
            "--partitions",
            str(self.partitions),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
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
        if self.alive():
            self.terminate()

    @property
    def pid(self) -> int:
        assert self.process is not None, "the worker was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, limit: int = 4000) -> str:
        return self.log()[-limit:]

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.web + path, timeout=2) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), error.read()

    def health(self) -> tuple[int, dict[str, object]]:
        """``/health``'s status and body; ``(0, {})`` while nothing answers."""
        try:
            status, body = self.get("/health")
            return status, dict(json.loads(body))
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, timeout_s: float = 90.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.process.returncode if self.process else None
                raise HarnessError(f"the worker exited with {code}:\n{self.log_tail()}")
            status, body = self.health()
            if status == 200:
                return body
            time.sleep(0.2)
        raise HarnessError(f"the worker was not healthy within {timeout_s} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """Samples as ``name{label="value",...}`` → value (labels sorted)."""
        status, body = self.get("/metrics")
        if status != 200:
            raise HarnessError(f"/metrics answered {status}")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def kill(self) -> None:
        assert self.process is not None, "the worker was never started"
        self.process.kill()
        self.process.wait()

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then its exit code; a worker still running after ``timeout_s`` is killed (-9)."""
        assert self.process is not None, "the worker was never started"
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.killed_after_timeout = True
            self.kill()
            return -signal.SIGKILL


def metric_sum(metrics: Mapping[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (a counter over all its labels)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))
