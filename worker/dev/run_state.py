"""The run state: how ``send``, ``tail``, ``replay`` and ``label`` find what ``run`` started.

``intent-worker run`` writes ``<run dir>/services.json`` (addresses and its pid, no secret) and,
when it started the embedded valkey, that server's generated password in
``<run dir>/redis.password``, created with mode 0600 so only its owner can read it. Both go
when the run stops (or are ignored once its process is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from worker.config import Settings
from worker.connections import KafkaConnection, RedisConnection
from worker.errors import ServiceError

STATE_FILE = "services.json"
PASSWORD_FILE = "redis.password"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the first byte)."""
    partial = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    partial.replace(path)


@dataclass(frozen=True)
class RunState:
    """Where a running ``intent-worker run`` put its broker, Redis and web server."""

    kafka_bootstrap: str
    redis_url: str
    web_url: str
    pid: int

    def write(self, run_dir: Path, *, redis_password: SecretStr | None = None) -> Path:
        """Write the state; ``redis_password`` (the embedded valkey's) goes to its own 0600 file."""
        run_dir.mkdir(parents=True, exist_ok=True)
        if redis_password is not None:
            write_private(run_dir / PASSWORD_FILE, redis_password.get_secret_value() + "\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / PASSWORD_FILE).unlink()
        path = run_dir / STATE_FILE
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        partial.replace(path)
        return path

    @classmethod
    def read(cls, run_dir: Path) -> RunState | None:
        """The state of a live ``run`` in ``run_dir``, or None (no file, or its process is gone)."""
        try:
            fields = json.loads((run_dir / STATE_FILE).read_text())
            state = cls(
                kafka_bootstrap=str(fields["kafka_bootstrap"]),
                redis_url=str(fields["redis_url"]),
                web_url=str(fields["web_url"]),
                pid=int(fields["pid"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state if _alive(state.pid) else None

    @staticmethod
    def redis_password(run_dir: Path) -> SecretStr | None:
        """The embedded valkey's password, if the run started one."""
        try:
            text = (run_dir / PASSWORD_FILE).read_text().strip()
        except OSError:
            return None
        return SecretStr(text) if text else None

    def clear(self, run_dir: Path) -> None:
        """Remove the files if they are still ours (a later ``run`` may have replaced them)."""
        current = run_dir / STATE_FILE
        with contextlib.suppress(OSError, ValueError):
            if json.loads(current.read_text()).get("pid") == self.pid:
                current.unlink()
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / PASSWORD_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _running(settings: Settings, service: str, variable: str) -> RunState:
    state = RunState.read(settings.run_dir)
    if state is None:
        raise ServiceError(
            f"no {service} to talk to: {variable} is unset and no `intent-worker run` is running "
            f"with run directory {settings.run_dir}; start one (`make run`) or set {variable}"
        )
    return state


def find_kafka(settings: Settings) -> str:
    """The configured bootstrap, else that of the ``intent-worker run`` using ``settings.run_dir``."""
    return settings.kafka_bootstrap or _running(settings, "Kafka", "INTENT_KAFKA_BOOTSTRAP").kafka_bootstrap


def find_kafka_connection(settings: Settings) -> KafkaConnection:
    """The Kafka connection of the settings (SASL, TLS), at :func:`find_kafka`'s address."""
    return KafkaConnection.from_settings(settings, find_kafka(settings))


def find_redis(settings: Settings) -> RedisConnection:
    """The configured Redis, else that of the ``intent-worker run`` using ``settings.run_dir``,
    with the password of its embedded valkey."""
    if settings.redis_url:
        return RedisConnection.from_settings(settings)
    state = _running(settings, "Redis", "INTENT_REDIS_URL")
    return RedisConnection.from_settings(
        settings, state.redis_url, password=RunState.redis_password(settings.run_dir)
    )
