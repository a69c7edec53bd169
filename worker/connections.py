"""Typed connections to Kafka and Redis: one config each, one way to build every client.

:class:`KafkaConnection` (bootstrap, security protocol, SASL, TLS) feeds the worker's faust app,
the labeller, the clients (send, tail, replay) and topic administration alike, through
:meth:`KafkaConnection.aiokafka_kwargs` (aiokafka clients) and
:meth:`KafkaConnection.ssl_context` / the SASL fields (faust's ``broker_credentials``).
:class:`RedisConnection` (URL, password, TLS for ``rediss://``) builds every Redis client through
:func:`redis_client` and :func:`async_redis_client`, with timeouts given by the caller.

Secrets are :class:`~pydantic.SecretStr` from the settings to the client call: ``repr`` and
``str`` of these objects never show them, and :func:`redact_url` strips a password from a URL.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from worker.errors import ServiceError

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from worker.config import Settings


class SecurityProtocol(StrEnum):
    """How a Kafka client talks to the brokers (Kafka's ``security.protocol``)."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    """The SASL mechanisms supported (Kafka's ``sasl.mechanism``)."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://:***@host:port/0``), for logs and files."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _tls_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, key_password: SecretStr | None
) -> ssl.SSLContext:
    """A client TLS context: verify the server (against ``cafile``, else the system's CAs), and
    present a client certificate when one is given."""
    for name, path in (("CA file", cafile), ("certificate", certfile), ("key", keyfile)):
        if path is not None and not path.is_file():
            raise ServiceError(f"TLS {name} {path} does not exist")
    if keyfile is not None and certfile is None:
        raise ServiceError("a TLS client key needs its certificate (the certificate file setting)")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None)
    if certfile is not None:
        context.load_cert_chain(
            str(certfile), str(keyfile) if keyfile else None, password=_secret(key_password)
        )
    return context


@dataclass(frozen=True)
class KafkaConnection:
    """Where the brokers are and how to authenticate: the one Kafka connection config."""

    bootstrap: str
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: SaslMechanism = SaslMechanism.PLAIN
    username: str | None = None
    password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap.strip():
            raise ServiceError("Kafka bootstrap servers are empty")
        if self.uses_sasl and (not self.username or self.password is None):
            raise ServiceError(
                f"security protocol {self.security_protocol.value} needs a SASL username and password "
                "(INTENT_KAFKA_SASL_USERNAME, INTENT_KAFKA_SASL_PASSWORD)"
            )
        tls_files = (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)
        if not self.uses_tls and any(path is not None for path in tls_files):
            raise ServiceError(
                f"TLS files are set but the security protocol is {self.security_protocol.value}; "
                "use SSL or SASL_SSL"
            )

    @classmethod
    def from_settings(cls, settings: Settings, bootstrap: str | None = None) -> KafkaConnection:
        """The connection the settings describe; ``bootstrap`` overrides theirs (an embedded broker)."""
        address = bootstrap or settings.kafka_bootstrap
        if not address:
            raise ServiceError("no Kafka bootstrap servers (INTENT_KAFKA_BOOTSTRAP)")
        return cls(
            bootstrap=address,
            security_protocol=SecurityProtocol(settings.kafka_security_protocol),
            sasl_mechanism=SaslMechanism(settings.kafka_sasl_mechanism),
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            ssl_cafile=settings.kafka_ssl_cafile,
            ssl_certfile=settings.kafka_ssl_certfile,
            ssl_keyfile=settings.kafka_ssl_keyfile,
            ssl_key_password=settings.kafka_ssl_key_password,
        )

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for SSL and SASL_SSL, else None."""
        if not self.uses_tls:
            return None
        return _tls_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_key_password)

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol.value,
        }
        context = self.ssl_context()
        if context is not None:
            kwargs["ssl_context"] = context
        if self.uses_sasl:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism.value,
                sasl_plain_username=self.username,
                sasl_plain_password=_secret(self.password),
            )
        return kwargs

    def broker_urls(self) -> list[str]:
        """``host:port,host:port`` as faust broker URLs."""
        return [f"kafka://{host.strip()}" for host in self.bootstrap.split(",") if host.strip()]

    def describe(self) -> str:
        """For logs: the address and the protocol, never a secret."""
        user = f", user {self.username}" if self.uses_sasl else ""
        return f"{self.bootstrap} ({self.security_protocol.value}{user})"


def as_kafka(kafka: str | KafkaConnection) -> KafkaConnection:
    """A connection for ``kafka``; a plain ``host:port,...`` string means PLAINTEXT."""
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)


@dataclass(frozen=True)
class RedisConnection:
    """A Redis server and how to authenticate: the one Redis connection config.

    The password is ``password`` (``INTENT_REDIS_PASSWORD``); one given in the URL is moved out
    of it (an explicit ``password`` wins), so the URL can be printed. ``rediss://`` means TLS,
    verified against ``ssl_ca_certs`` (else the system's CAs), with an optional client certificate.
    """

    url: str
    password: SecretStr | None = None
    ssl_ca_certs: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ServiceError(f"not a Redis URL: {redact_url(self.url)} (redis://, rediss:// or unix://)")
        if parts.password is not None:
            # A password in the URL moves out of it, so that printing the URL can never show it.
            user = f"{parts.username}@" if parts.username else ""
            host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
            object.__setattr__(self, "url", urlunsplit(parts._replace(netloc=user + host)))
            if self.password is None:
                object.__setattr__(self, "password", SecretStr(parts.password))
        if not self.uses_tls and any(p is not None for p in (self.ssl_ca_certs, self.ssl_certfile)):
            raise ServiceError("Redis TLS files are set but the URL is not rediss://")

    @classmethod
    def from_settings(
        cls, settings: Settings, url: str | None = None, *, password: SecretStr | None = None
    ) -> RedisConnection:
        """The connection the settings describe; ``url`` and ``password`` override theirs (embedded)."""
        address = url or settings.redis_url
        if not address:
            raise ServiceError("no Redis URL (INTENT_REDIS_URL)")
        return cls(
            url=address,
            password=password if password is not None else settings.redis_password,
            ssl_ca_certs=settings.redis_ssl_ca_certs,
            ssl_certfile=settings.redis_ssl_certfile,
            ssl_keyfile=settings.redis_ssl_keyfile,
        )

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def client_kwargs(self, *, timeout_s: float | None, connect_timeout_s: float | None) -> dict[str, Any]:
        """Keyword arguments of ``Redis.from_url`` (sync and asyncio alike)."""
        kwargs: dict[str, Any] = {
            "password": _secret(self.password),
            "socket_timeout": timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        }
        if self.uses_tls:
            kwargs.update(ssl_cert_reqs="required", ssl_check_hostname=True)
            if self.ssl_ca_certs is not None:
                kwargs["ssl_ca_certs"] = str(self.ssl_ca_certs)
            if self.ssl_certfile is not None:
                kwargs["ssl_certfile"] = str(self.ssl_certfile)
                kwargs["ssl_keyfile"] = str(self.ssl_keyfile) if self.ssl_keyfile else None
        return kwargs

    def describe(self) -> str:
        auth = ", password set" if self.password is not None else ""
        return f"{redact_url(self.url)}{auth}"


def redis_client(
    connection: RedisConnection, *, timeout_s: float | None, connect_timeout_s: float | None = 5.0
) -> redis.Redis:
    """A blocking client (the labeller, the CLI). ``timeout_s`` bounds each reply (None: wait)."""
    import redis

    return redis.Redis.from_url(
        connection.url, **connection.client_kwargs(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    )


def async_redis_client(
    connection: RedisConnection, *, timeout_s: float, fail_fast: bool = True
) -> redis.asyncio.Redis:
    """An asyncio client (the worker's buffer). ``fail_fast``: no retries and no health checks,
    so a slow or absent Redis costs at most ``timeout_s`` (the caller's circuit breaker decides)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    kwargs = connection.client_kwargs(timeout_s=timeout_s, connect_timeout_s=timeout_s)
    if fail_fast:
        kwargs.update(retry=Retry(NoBackoff(), 0), health_check_interval=0)
    return Redis.from_url(connection.url, **kwargs)
