"""The embedded services: Tansu and valkey-server start, answer, and stop; configured ones are used."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.config import Settings
from worker.dev.probes import kafka_ready, redis_ready
from worker.dev.services import (
    EmbeddedService,
    ensure_services,
    free_port,
    redact_url,
    start_redis,
)
from worker.errors import ServiceError
from worker.stream.admin import create_topics

pytestmark = pytest.mark.integration


def test_tansu_creates_topics_with_the_partitions_asked_and_round_trips_a_message(
    kafka_service: EmbeddedService, unique_name: str
) -> None:
    async def scenario() -> tuple[dict[str, int], dict[str, int], list[tuple[bytes | None, bytes | None]]]:
        created = await create_topics(kafka_service.bootstrap, {unique_name: 3})
        again = await create_topics(kafka_service.bootstrap, {unique_name: 3})  # exists: kept as it is
        producer = AIOKafkaProducer(bootstrap_servers=kafka_service.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(unique_name, b'{"id": "1", "text": "hi"}', key=b"1", partition=2)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_service.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(unique_name, p) for p in range(3)])
            batches = await consumer.getmany(timeout_ms=5_000)
        finally:
            await consumer.stop()
        records = [
            (m.key, m.value) for tp, messages in batches.items() for m in messages if tp.partition == 2
        ]
        return created, again, records

    created, again, records = asyncio.run(scenario())
    assert created == again == {unique_name: 3}
    assert records == [(b"1", b'{"id": "1", "text": "hi"}')]


def test_readiness_probes_speak_each_protocol(
    kafka_service: EmbeddedService, redis_service: EmbeddedService
) -> None:
    assert kafka_ready(kafka_service.host, kafka_service.port)
    assert redis_ready(redis_service.host, redis_service.port)
    assert redis_ready(redis_service.host, redis_service.port, pid=redis_service.pid)
    assert not redis_ready(redis_service.host, redis_service.port, pid=redis_service.pid + 1)
    assert not kafka_ready(redis_service.host, redis_service.port, timeout_s=0.2)  # Redis is not Kafka
    assert not redis_ready(kafka_service.host, kafka_service.port, timeout_s=0.2)
    assert not kafka_ready("127.0.0.1", free_port())
    assert not redis_ready("127.0.0.1", free_port())


def test_configured_services_are_used_and_nothing_is_started(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap="kafka.example:9092", redis_url="redis://cache.example:6379/2")
    with ensure_services(settings, tmp_path) as services:
        assert (services.kafka_bootstrap, services.redis_url) == (
            "kafka.example:9092",
            "redis://cache.example:6379/2",
        )
        assert services.embedded == []
    assert list(tmp_path.iterdir()) == []


def test_unset_services_are_started_on_loopback_and_stopped(tmp_path: Path) -> None:
    with ensure_services(Settings(), tmp_path) as services:
        kafka, redis = services.embedded
        assert services.kafka_bootstrap == kafka.bootstrap and kafka.bootstrap.startswith("127.0.0.1:")
        assert services.redis_url == redis.url and redis.url.startswith("redis://127.0.0.1:")
        assert kafka_ready(kafka.host, kafka.port)
        # The embedded valkey has a generated password: without it, it does not answer.
        assert services.redis_password is not None and len(services.redis_password.get_secret_value()) >= 24
        assert redis_ready(redis.host, redis.port, password=services.redis_password)
        assert not redis_ready(redis.host, redis.port)
        password = services.redis_password.get_secret_value()
        assert password not in " ".join(redis.process.args)  # type: ignore[arg-type]  # not on its command line
    assert password not in (tmp_path / "valkey.log").read_text()
    assert not kafka.running() and not redis.running()
    assert kafka.process.returncode == 0 and redis.process.returncode == 0  # SIGTERM was enough
    assert "listening on" in (tmp_path / "tansu.log").read_text()
    assert "Ready to accept connections" in (tmp_path / "valkey.log").read_text()


def test_a_service_that_cannot_start_fails_with_its_log(
    redis_service: EmbeddedService, tmp_path: Path
) -> None:
    with pytest.raises(ServiceError, match=f"valkey on 127.0.0.1 cannot listen on port {redis_service.port}"):
        start_redis(tmp_path, port=redis_service.port)


def test_a_binary_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "valkey-data").mkdir()
    (tmp_path / "valkey-data" / "appendonlydir").write_text("a file where valkey needs a directory")
    with pytest.raises(
        ServiceError,
        match=r"(?s)valkey on 127\.0\.0\.1 exited with status 1; last lines of .*valkey\.log:\n.*appendonly",
    ):
        start_redis(tmp_path, appendonly=True)


def test_appendonly_redis_keeps_acknowledged_writes_across_a_restart(tmp_path: Path) -> None:
    import redis

    with start_redis(tmp_path, appendonly=True) as first:
        client = redis.Redis(host=first.host, port=first.port)
        client.xadd("kept", {"sample": b"1"})
        client.close()
        port = first.port
    with start_redis(tmp_path, appendonly=True, port=port) as second:
        client = redis.Redis(host=second.host, port=second.port)
        assert client.xlen("kept") == 1
        client.close()


def test_passwords_are_redacted_from_logged_urls() -> None:
    assert redact_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("redis://user:s3cret@cache/0") == "redis://user:***@cache/0"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
