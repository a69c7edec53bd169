"""Is it up? Each embedded service is ready only once it answers its own protocol on its port.

Kafka: ApiVersions, then a Metadata that lists at least one broker. Redis: PING (after AUTH
when there is a password), and, given a pid, INFO naming that process: a port taken by another
server between our probe and the binary's bind is not mistaken for ours. Plain sockets, no
client library, so a probe never waits on a client's own retries.
"""

from __future__ import annotations

import socket
import struct

from pydantic import SecretStr


def listening(host: str, port: int) -> bool:
    """Whether anything accepts a connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- Kafka -----------------------------------------------------------------------------------------


def _kafka_call(sock: socket.socket, api_key: int, correlation_id: int, body: bytes) -> bytes:
    """One request (header v1, API version 0) and its response body."""
    client_id = b"intent-worker-probe"
    header = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    response = _recv_exactly(sock, size)
    (answered,) = struct.unpack_from(">i", response)
    if answered != correlation_id:
        raise ConnectionError(f"correlation id {answered} != {correlation_id}")
    return response[4:]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks += chunk
    return bytes(chunks)


def kafka_ready(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a Kafka broker answers ApiVersions and lists itself in Metadata."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            versions = _kafka_call(sock, 18, 1, b"")  # ApiVersions v0
            (error_code,) = struct.unpack_from(">h", versions)
            if error_code != 0:
                return False
            metadata = _kafka_call(sock, 3, 2, struct.pack(">i", 0))  # Metadata v0, all topics
            (brokers,) = struct.unpack_from(">i", metadata)
            return bool(brokers > 0)
    except (OSError, struct.error):
        return False


# -- Redis -----------------------------------------------------------------------------------------


def _redis_call(sock: socket.socket, *args: str) -> bytes:
    """One command in RESP; returns the reply's payload (simple string, error or bulk string)."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(arg)}\r\n{arg}\r\n" for arg in args)
    sock.sendall(request.encode())
    reply = b""
    while b"\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        reply += chunk
    head, _, rest = reply.partition(b"\r\n")
    if not head.startswith(b"$"):
        return head
    size = int(head[1:])
    while len(rest) < size:
        chunk = sock.recv(size - len(rest) + 2)
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        rest += chunk
    return rest[:size]


def redis_ready(
    host: str, port: int, timeout_s: float = 1.0, *, pid: int | None = None, password: SecretStr | None = None
) -> bool:
    """Whether a Redis server answers PING (and, given ``pid``, is that process).

    A server still loading its data answers ``-LOADING``: not ready yet.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if password is not None and _redis_call(sock, "AUTH", password.get_secret_value()) != b"+OK":
                return False
            if _redis_call(sock, "PING") != b"+PONG":
                return False
            if pid is None:
                return True
            info = _redis_call(sock, "INFO", "server").decode("utf-8", "replace")
            return f"process_id:{pid}\r\n" in info
    except (OSError, ValueError):
        return False
