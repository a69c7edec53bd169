"""Topic administration: create the worker's topics with their partition counts."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from worker.connections import KafkaConnection, as_kafka
from worker.errors import ServiceError

log = structlog.get_logger(__name__)


async def create_topics(
    kafka: str | KafkaConnection,
    partitions: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 10.0,
) -> dict[str, int]:
    """Create each topic with its partition count; returns every topic's actual count.

    Brokers that auto-create topics (Tansu: 4 partitions) would otherwise pick the count for us.
    A topic that already exists is kept as it is, with a warning when its count differs.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    bootstrap = as_kafka(kafka).bootstrap
    admin = AIOKafkaAdminClient(**as_kafka(kafka).aiokafka_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, count, replication_factor) for name, count in partitions.items()],
            timeout_ms=int(timeout_s * 1000),
        )
        for topic, code, message in (error[:3] for error in response.topic_errors):
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS
                raise ServiceError(f"cannot create topic {topic!r} on {bootstrap}: error {code}: {message}")
        described = await admin.describe_topics(list(partitions))
    except KafkaError as exc:
        raise ServiceError(f"cannot create topics {sorted(partitions)} on {bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()
    actual = {str(entry["topic"]): len(entry["partitions"]) for entry in described}
    for name, wanted in partitions.items():
        if actual.get(name) != wanted:
            log.warning("topic_partitions_differ", topic=name, wanted=wanted, actual=actual.get(name))
    log.info("topics_ready", bootstrap=bootstrap, partitions=actual)
    return actual
