"""Secrets stay secret: a Redis password and a SASL password are set, and no log line, no
``/health`` or ``/metrics`` answer and no file the worker, the labeller or a model card writer
writes holds either.
The embedded valkey of ``intent-worker run`` gets a generated password in a 0600 file, which
the clients read.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError
from worker_harness import WorkerProcess, consume, produce, utterance

from worker.config import REPO_ROOT
from worker.dev.harness import worker_env
from worker.dev.services import RunState, start_kafka, start_redis
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES, buffer_key

pytestmark = pytest.mark.integration

REDIS_SECRET = "redis-s3cret-7d1f0c"
SASL_SECRET = "sasl-s3cret-94be21"
SECRETS = (REDIS_SECRET, SASL_SECRET)


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def files_holding_secrets(directory: Path) -> list[str]:
    return [str(path) for path in directory.rglob("*") if path.is_file() and leaks(path.read_bytes())]


def test_no_secret_in_logs_health_metrics_or_files(tmp_path: Path, student: Path) -> None:
    import asyncio

    with (
        start_kafka(tmp_path / "tansu") as kafka,
        start_redis(tmp_path / "valkey", password=SecretStr(REDIS_SECRET)) as redis,
    ):
        asyncio.run(create_topics(kafka.bootstrap, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        with pytest.raises((AuthenticationError, ResponseError)):
            Redis.from_url(redis.url).ping()  # the password is required
        prefix = f"secrets-{time.time_ns()}"
        secrets = {
            "INTENT_REDIS_PASSWORD": REDIS_SECRET,
            "INTENT_KAFKA_SASL_USERNAME": "worker",
            "INTENT_KAFKA_SASL_PASSWORD": SASL_SECRET,
            "INTENT_SAMPLE_RATE": "1.0",
            "INTENT_SAMPLE_BUDGET_PER_S": "1000000",
        }
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=redis.url, run_dir=tmp_path / "run", group="secrets",
            prefix=prefix, student=student, partitions=2, extra=secrets,
        )  # fmt: skip
        with worker:
            worker.wait_healthy()
            sent = [utterance(f"secret-{i}", f"set an alarm for {i} am") for i in range(20)]
            produce(kafka.bootstrap, UTTERANCES, sent)
            consume(kafka.bootstrap, [INTENTS], lambda rs: len(rs) >= len(sent), timeout_s=60)
            authed = Redis.from_url(redis.url, password=REDIS_SECRET)
            deadline = time.monotonic() + 20
            while int(authed.xlen(buffer_key(prefix))) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert int(authed.xlen(buffer_key(prefix))) == len(sent)  # the worker authenticated
            health, metrics = worker.get("/health"), worker.get("/metrics")
            assert health[0] == 200 and metrics[0] == 200
            assert leaks(health[1]) == [] and leaks(metrics[1]) == []
            assert worker.terminate() == 0
        assert leaks(worker.log()) == []

        # The labeller: its banner names the Redis it reads, without the password.
        env = worker_env({**secrets, "INTENT_REDIS_URL": redis.url, "INTENT_REDIS_KEY_PREFIX": prefix})
        labelled = subprocess.run(
            [sys.executable, "-m", "worker.cli", "--log-json", "label", "--once", "--data", str(tmp_path / "ds")],
            env=env, cwd=REPO_ROOT, capture_output=True, timeout=300,
        )  # fmt: skip
        output = labelled.stdout + labelled.stderr
        assert labelled.returncode == 0, output.decode(errors="replace")[-3000:]
        assert redis.url.encode() in output  # it says where it reads, redacted
        assert leaks(output) == []
        authed.close()
        # A model card (here a cascade's, written with the secrets in the environment).
        carded = subprocess.run(
            [sys.executable, "-m", "worker.cli", "cascade", str(student), str(student),
             "--escalate-below", "0.1", "--out", str(tmp_path / "card-check")],
            env=env, cwd=REPO_ROOT, capture_output=True, timeout=120,
        )  # fmt: skip
        assert carded.returncode == 0, carded.stderr.decode(errors="replace")[-2000:]
        assert leaks(carded.stdout + carded.stderr) == []
        assert (tmp_path / "card-check" / "card.json").is_file()
    assert files_holding_secrets(tmp_path) == []


def test_the_embedded_valkey_gets_a_generated_password_in_a_private_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = worker_env({"INTENT_RUN_DIR": str(run_dir)})
    log = tmp_path / "run.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=env,
            cwd=REPO_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        state = None
        while state is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            state = RunState.read(run_dir)
        assert state is not None, f"intent-worker run wrote no run state:\n{log.read_text()[-3000:]}"
        secret_file = run_dir / "redis.password"
        mode = stat.S_IMODE(os.stat(secret_file).st_mode)
        assert mode == 0o600, oct(mode)
        password = secret_file.read_text().strip()
        assert len(password) >= 24
        assert password not in (run_dir / "services.json").read_text()
        assert json.loads((run_dir / "services.json").read_text())["redis_url"] == state.redis_url
        with pytest.raises((AuthenticationError, ResponseError)):
            Redis.from_url(state.redis_url).ping()
        assert Redis.from_url(state.redis_url, password=password).ping()
        # A client finds the password through the run directory, as it finds the addresses.
        probe = subprocess.run(
            [sys.executable, "-c", "from worker.config import Settings; from worker.dev.services import find_redis;"
             "from worker.connections import redis_client; print(redis_client(find_redis(Settings()), timeout_s=5).ping())"],
            env=env, cwd=REPO_ROOT, capture_output=True, timeout=60,
        )  # fmt: skip
        assert probe.stdout.strip() == b"True", probe.stderr.decode()[-2000:]
        assert password.encode() not in probe.stdout + probe.stderr
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert password.encode() not in log.read_bytes()
    assert not secret_file.exists()  # gone with the run
