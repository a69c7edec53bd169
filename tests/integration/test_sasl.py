"""SASL end to end (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512): a worker whose Kafka lets no one in
without a username and password.

Tansu 0.6 has no SASL, so it listens on a port of its own behind `SaslGate`, a relay that plays
the broker's part of the SASL exchange (KIP-43/KIP-152: ``SaslHandshake`` then
``SaslAuthenticate``) and checks the credentials before it relays anything else; Tansu
advertises the gate's port, so every connection the worker makes is authenticated. The gate
adds the two SASL APIs to the broker's ``ApiVersions`` answer, as a broker with SASL enabled
does. A client with a wrong password, or none, gets no further than the gate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from pydantic import SecretStr
from relays import Relay
from worker_harness import WorkerProcess, produce, send_and_await_labels

from worker.connections import KafkaConnection, SaslMechanism, SecurityProtocol
from worker.dev.services import LOOPBACK, free_port, start_kafka, start_redis
from worker.stream.admin import create_topics
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES

pytestmark = pytest.mark.integration

USER, PASSWORD = "intent-worker", "sasl-plain-3f9c2a"
API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
SASL_AUTHENTICATION_FAILED = 58
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class SaslGate(Relay):
    """A relay to ``target`` that demands SASL (PLAIN or SCRAM, ``USER``/``PASSWORD``) first."""

    def __init__(self, port: int, target: int) -> None:
        super().__init__(port, target)
        self.authenticated = self.refused = 0

    async def admit(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> bool:
        """The broker's side of the exchange; True once the client has authenticated."""
        mechanism = ""
        scram: Scram | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation = struct.unpack_from(">hhi", frame)
            (client_id_length,) = struct.unpack_from(">h", frame, 8)
            body = frame[10 + max(client_id_length, 0) :]
            if api_key == API_VERSIONS:  # the broker answers, with the SASL APIs added
                upstream.write(struct.pack(">i", len(frame)) + frame)
                await upstream.drain()
                _write_frame(writer, _with_sasl_apis(await _read_frame(upstream_reader)))
            elif api_key == SASL_HANDSHAKE:
                (length,) = struct.unpack_from(">h", body)
                mechanism = body[2 : 2 + length].decode()
                error = 0 if mechanism in MECHANISMS else 33  # UNSUPPORTED_SASL_MECHANISM
                answer = struct.pack(">hi", error, len(MECHANISMS)) + b"".join(map(_string, MECHANISMS))
                _write_frame(writer, struct.pack(">i", correlation) + answer)
            elif api_key == SASL_AUTHENTICATE:
                (length,) = struct.unpack_from(">i", body)
                token = body[4 : 4 + length]
                if mechanism == "PLAIN":
                    _, user, password = token.split(b"\0")
                    done, good, reply = True, (user, password) == (USER.encode(), PASSWORD.encode()), b""
                elif scram is None:  # SCRAM's client-first message
                    scram = Scram(mechanism)
                    done, good, reply = False, True, scram.first(token)
                else:  # its client-final message
                    done, reply = True, scram.final(token)
                    good = reply is not None
                error = 0 if good else SASL_AUTHENTICATION_FAILED
                message = struct.pack(">h", -1) if good else _string("Authentication failed: bad credentials")
                answer = (
                    struct.pack(">h", error) + message + struct.pack(">i", len(reply or b"")) + (reply or b"")
                )
                if version >= 1:
                    answer += struct.pack(">q", 0)
                _write_frame(writer, struct.pack(">i", correlation) + answer)
                await writer.drain()
                if not good:
                    self.refused += 1
                    return False
                if done:
                    self.authenticated += 1
                    return True
            else:  # anything else before authenticating: a SASL broker closes the connection
                self.refused += 1
                return False
            await writer.drain()


class Scram:
    """The server's side of SCRAM (RFC 5802, RFC 7677) for ``USER``/``PASSWORD``."""

    ITERATIONS = 4096

    def __init__(self, mechanism: str) -> None:
        self.hash = hashlib.sha256 if mechanism == "SCRAM-SHA-256" else hashlib.sha512
        self.salt = os.urandom(16)
        self.nonce = base64.b64encode(os.urandom(18)).decode()

    def first(self, token: bytes) -> bytes:
        self.client_first_bare = token.decode().split(",", 2)[2]  # after the GS2 header "n,,"
        fields = dict(part.split("=", 1) for part in self.client_first_bare.split(","))
        self.user = fields["n"]
        self.combined_nonce = fields["r"] + self.nonce
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={self.combined_nonce},s={salt},i={self.ITERATIONS}"
        return self.server_first.encode()

    def final(self, token: bytes) -> bytes | None:
        """The server-final message, or None when the proof is wrong."""
        without_proof, proof = token.decode().rsplit(",p=", 1)
        if self.user != USER or f"r={self.combined_nonce}" not in without_proof.split(","):
            return None
        salted = hashlib.pbkdf2_hmac(self.hash().name, PASSWORD.encode(), self.salt, self.ITERATIONS)
        client_key = hmac.digest(salted, b"Client Key", self.hash)
        stored_key = self.hash(client_key).digest()
        message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, message, self.hash)
        recovered = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if not hmac.compare_digest(self.hash(recovered).digest(), stored_key):
            return None
        server_key = hmac.digest(salted, b"Server Key", self.hash)
        return b"v=" + base64.b64encode(hmac.digest(server_key, message, self.hash))


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def _write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(struct.pack(">i", len(payload)) + payload)


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">h", len(data)) + data


def _with_sasl_apis(response: bytes) -> bytes:
    """An ApiVersions v0-v2 response (correlation id first) that also lists SaslHandshake and
    SaslAuthenticate, versions 0-1."""
    correlation, error, count = struct.unpack_from(">ihi", response)
    entries = [struct.unpack_from(">hhh", response, 10 + 6 * i) for i in range(count)]
    tail = response[10 + 6 * count :]  # throttle_time_ms from v1 on
    entries = [e for e in entries if e[0] not in (SASL_HANDSHAKE, SASL_AUTHENTICATE)]
    entries += [(SASL_HANDSHAKE, 0, 1), (SASL_AUTHENTICATE, 0, 1)]
    packed = b"".join(struct.pack(">hhh", *entry) for entry in entries)
    return struct.pack(">ihi", correlation, error, len(entries)) + packed + tail


def sasl(port: int, mechanism: str, password: str = PASSWORD) -> KafkaConnection:
    return KafkaConnection(
        bootstrap=f"{LOOPBACK}:{port}",
        security_protocol=SecurityProtocol.SASL_PLAINTEXT,
        sasl_mechanism=SaslMechanism(mechanism),
        username=USER,
        password=SecretStr(password),
    )


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_worker_behind_sasl_labels_and_a_wrong_password_is_refused(
    tmp_path: Path, student: Path, mechanism: str
) -> None:
    gate_port = free_port()
    with (
        start_kafka(tmp_path / "tansu", advertised_port=gate_port) as kafka,
        SaslGate(gate_port, kafka.port) as gate,
        start_redis(tmp_path / "valkey") as redis,
    ):
        connection = sasl(gate_port, mechanism)
        asyncio.run(create_topics(connection, dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS), 2)))
        worker = WorkerProcess(
            kafka=connection.bootstrap, redis=redis.url, run_dir=tmp_path / "run", group="sasl",
            student=student, partitions=2,
            extra={
                "INTENT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "INTENT_KAFKA_SASL_MECHANISM": mechanism,
                "INTENT_KAFKA_SASL_USERNAME": USER,
                "INTENT_KAFKA_SASL_PASSWORD": PASSWORD,
            },
        )  # fmt: skip
        with worker:
            worker.wait_healthy()
            sent = send_and_await_labels(connection, worker, "sasl", "switch off the heating in room {i}")
            assert worker.terminate() == 0
        assert PASSWORD not in worker.log()
        authenticated = gate.authenticated
        assert authenticated >= 3  # the admin, the worker's consumer and producer, the test's clients

        refused = gate.refused
        with pytest.raises(KafkaError):
            produce(sasl(gate_port, mechanism, password="not-the-password"), UTTERANCES, sent[:1])
        with pytest.raises(KafkaError):
            produce(connection.bootstrap, UTTERANCES, sent[:1])
        assert gate.refused >= refused + 2 and gate.authenticated == authenticated
