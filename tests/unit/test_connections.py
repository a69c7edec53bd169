"""The one Kafka connection config and the one Redis client factory: SASL, TLS, secrets kept secret.

Tansu 0.6 offers no usable SASL or TLS listener here, so what the configs build is checked here:
the keyword arguments every aiokafka client gets, the TLS contexts (with the test-only CA and
client certificate under ``tests/data/tls``), and what a person could see (repr, str, URLs).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import SecretStr

from worker.config import Settings
from worker.connections import (
    KafkaConnection,
    RedisConnection,
    SaslMechanism,
    SecurityProtocol,
    async_redis_client,
    redact_url,
    redis_client,
)
from worker.errors import ServiceError

TLS = Path(__file__).resolve().parent.parent / "data" / "tls"
KEY_PASSWORD = "test-only-key-password"  # tests/data/tls/client.key is encrypted with it


def test_plaintext_is_the_default_and_carries_no_credentials() -> None:
    kwargs = KafkaConnection.from_settings(Settings(kafka_bootstrap="k1:9092,k2:9092")).aiokafka_kwargs()
    assert kwargs == {"bootstrap_servers": "k1:9092,k2:9092", "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_passes_the_mechanism_and_the_credentials(mechanism: str) -> None:
    settings = Settings(
        kafka_bootstrap="broker:9093",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="worker",
        kafka_sasl_password=SecretStr("sasl-s3cret"),
    )
    connection = KafkaConnection.from_settings(settings)
    kwargs = connection.aiokafka_kwargs()
    assert kwargs == {
        "bootstrap_servers": "broker:9093",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "worker",
        "sasl_plain_password": "sasl-s3cret",
    }
    assert connection.sasl_mechanism is SaslMechanism(mechanism)
    for shown in (repr(connection), str(connection), connection.describe(), repr(settings)):
        assert "sasl-s3cret" not in shown


def test_sasl_ssl_verifies_the_broker_against_the_ca_file() -> None:
    connection = KafkaConnection(
        "broker:9094",
        security_protocol=SecurityProtocol.SASL_SSL,
        sasl_mechanism=SaslMechanism.SCRAM_SHA_512,
        username="worker",
        password=SecretStr("sasl-s3cret"),
        ssl_cafile=TLS / "ca.pem",
    )
    kwargs = connection.aiokafka_kwargs()
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "intent-worker test CA"),),)]
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"


def test_ssl_presents_a_client_certificate_whose_key_has_a_password() -> None:
    connection = KafkaConnection(
        "broker:9094",
        security_protocol=SecurityProtocol.SSL,
        ssl_cafile=TLS / "ca.pem",
        ssl_certfile=TLS / "client.pem",
        ssl_keyfile=TLS / "client.key",
        ssl_key_password=SecretStr(KEY_PASSWORD),
    )
    assert isinstance(connection.ssl_context(), ssl.SSLContext)  # the key decrypted: the password was passed
    assert KEY_PASSWORD not in repr(connection)
    wrong = KafkaConnection(
        "broker:9094",
        security_protocol=SecurityProtocol.SSL,
        ssl_certfile=TLS / "client.pem",
        ssl_keyfile=TLS / "client.key",
        ssl_key_password=SecretStr("wrong"),
    )
    with pytest.raises(ssl.SSLError):
        wrong.ssl_context()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": SecurityProtocol.SASL_SSL}, "needs a SASL username and password"),
        ({"ssl_cafile": TLS / "ca.pem"}, "TLS files are set but the security protocol is PLAINTEXT"),
        ({"bootstrap": " "}, "bootstrap servers are empty"),
    ],
)
def test_an_incomplete_kafka_config_is_refused_with_the_setting_to_fix(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ServiceError, match=message):
        KafkaConnection(**{"bootstrap": "broker:9092", **fields})  # type: ignore[arg-type]


def test_a_missing_tls_file_is_named() -> None:
    connection = KafkaConnection("b:1", security_protocol=SecurityProtocol.SSL, ssl_cafile=TLS / "nope.pem")
    with pytest.raises(ServiceError, match=r"nope\.pem does not exist"):
        connection.ssl_context()


def test_redis_password_and_tls_options_reach_the_client() -> None:
    connection = RedisConnection(
        "rediss://cache.internal:6380/2",
        password=SecretStr("redis-s3cret"),
        ssl_ca_certs=TLS / "ca.pem",
        ssl_certfile=TLS / "client.pem",
        ssl_keyfile=TLS / "client.key",
    )
    kwargs = connection.client_kwargs(timeout_s=0.1, connect_timeout_s=0.5)
    assert kwargs["password"] == "redis-s3cret"
    assert kwargs["ssl_ca_certs"] == str(TLS / "ca.pem") and kwargs["ssl_cert_reqs"] == "required"
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.1, 0.5)
    client = redis_client(connection, timeout_s=30)
    pool = client.connection_pool.connection_kwargs
    assert pool["password"] == "redis-s3cret" and pool["ssl_ca_certs"] == str(TLS / "ca.pem")
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    fast = async_redis_client(connection, timeout_s=0.1)
    assert fast.connection_pool.connection_kwargs["socket_timeout"] == 0.1
    for shown in (repr(connection), connection.describe(), repr(client), repr(fast)):
        assert "redis-s3cret" not in shown


def test_a_password_in_the_redis_url_moves_out_of_it() -> None:
    connection = RedisConnection("redis://:s3cret@127.0.0.1:6379/0")
    assert connection.url == "redis://127.0.0.1:6379/0"
    assert connection.password is not None and connection.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(connection) and "s3cret" not in connection.describe()
    explicit = RedisConnection("redis://user:in-url@host:1/0", password=SecretStr("explicit"))
    assert explicit.url == "redis://user@host:1/0" and explicit.password == SecretStr("explicit")


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("protocol", "fields"),
    [
        ("SASL_PLAINTEXT", {"username": "worker", "password": SecretStr("sasl-s3cret")}),
        (
            "SASL_SSL",
            {"username": "worker", "password": SecretStr("sasl-s3cret"), "ssl_cafile": TLS / "ca.pem"},
        ),
        ("SSL", {"ssl_cafile": TLS / "ca.pem"}),
        ("PLAINTEXT", {}),
    ],
)
def test_the_worker_gives_faust_the_same_connection_as_every_other_client(
    protocol: str, fields: dict[str, object]
) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from worker.stream.app import faust_credentials

    connection = KafkaConnection(
        "broker:9093",
        security_protocol=SecurityProtocol(protocol),
        sasl_mechanism=SaslMechanism.SCRAM_SHA_256,
        **fields,  # type: ignore[arg-type]
    )
    credentials = faust_credentials(connection)
    faust_kwargs = dict(credentials_to_aiokafka_auth(credentials))
    ours = connection.aiokafka_kwargs()
    del ours["bootstrap_servers"]
    assert faust_kwargs.keys() >= ours.keys()
    for key, value in ours.items():
        if key == "ssl_context":
            assert isinstance(faust_kwargs[key], ssl.SSLContext)
        else:
            assert faust_kwargs[key] == value, key
    assert "sasl-s3cret" not in repr(credentials)
