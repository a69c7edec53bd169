"""Read the dead letters on ``utterances.dlq``, and send chosen ones back to ``utterances``.

A dead letter (``dead_letter.v1``) keeps the input's original bytes and key. ``redrive``
re-publishes exactly those bytes, so after a fix (a longer ``INTENT_MAX_TEXT_CHARS``, a
producer that now writes valid records elsewhere, a worker bug fixed) the worker sees the
input as it first arrived. A letter whose original was cut to fit (``original_truncated``)
cannot be sent back: its bytes are no longer the input's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker.connections import KafkaConnection
from worker.dev.client import Batches, BrokerWatch, follow, groupless_consumer
from worker.errors import BadInput, ServiceError
from worker.schemas import DeadLetter, Utterance
from worker.topics import DEAD_LETTERS, UTTERANCES

PREVIEW_CHARS = 80


@dataclass(frozen=True)
class StoredLetter:
    """One dead letter and where it lies in ``utterances.dlq``."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def position(self) -> str:
        """Where the *input* was read: ``topic:partition:offset``."""
        return f"{self.letter.topic}:{self.letter.partition}:{self.letter.offset}"

    @property
    def original_id(self) -> str | None:
        """The utterance id: the original record's ``id`` if it has one, else its key."""
        try:
            record = json.loads(self.letter.original())
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            return str(record["id"])
        key = self.letter.original_key()
        return None if key is None else key.decode("utf-8", errors="replace")

    @property
    def reason(self) -> str:
        """The short class of the failure (``text_missing``, ``not_json``...), as metrics count it.

        Letters written before the record carried ``reason`` get it by decoding the original
        again, which is what the worker did; a classify-stage failure is named by its error type.
        """
        if self.letter.reason:
            return self.letter.reason
        if self.letter.original_truncated:
            return "unknown"
        try:
            Utterance.from_json_bytes(self.letter.original())
        except BadInput as exc:
            return exc.reason
        return self.letter.error_type


def describe_letter(stored: StoredLetter) -> str:
    """One line of ``tail --dead-letters``: where it lies, where the input was read, stage,
    reason, utterance id, size, and a preview of the original bytes."""
    letter = stored.letter
    preview = letter.original().decode("utf-8", errors="replace")
    preview = preview.encode("unicode_escape").decode("ascii") if not preview.isprintable() else preview
    if len(preview) > PREVIEW_CHARS:
        preview = preview[: PREVIEW_CHARS - 1] + "…"
    size = f"{letter.original_size}B" + (" (truncated)" if letter.original_truncated else "")
    columns = [
        f"dlq:{stored.partition}:{stored.offset}",
        stored.position,
        letter.stage.value,
        stored.reason,
        stored.original_id or "-",
        size,
        preview,
    ]
    return "\t".join(columns)


@dataclass(frozen=True)
class Selection:
    """Which dead letters to send back: every given criterion must hold (any value within one)."""

    ids: frozenset[str] = frozenset()
    positions: frozenset[tuple[int, int]] = frozenset()  # the input's (partition, offset)
    reasons: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    everything: bool = False

    def __post_init__(self) -> None:
        if not (self.everything or self.ids or self.positions or self.reasons or self.stages):
            raise BadInput("choose dead letters to send back: --id, --offset, --reason, --stage or --all")

    def matches(self, stored: StoredLetter) -> bool:
        if self.ids and stored.original_id not in self.ids:
            return False
        if self.positions and (stored.letter.partition, stored.letter.offset) not in self.positions:
            return False
        if self.reasons and stored.reason not in self.reasons:
            return False
        return not self.stages or stored.letter.stage.value in self.stages


def parse_position(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` (or ``utterances:PARTITION:OFFSET``, as ``tail --dead-letters`` prints)."""
    parts = text.split(":")
    if len(parts) == 3 and parts[0] == UTTERANCES:
        parts = parts[1:]
    try:
        partition, offset = (int(part) for part in parts)
    except ValueError as exc:
        raise BadInput(f"not a position: {text!r} (PARTITION:OFFSET, e.g. 2:1534)") from exc
    return partition, offset


def _decode(partition: int, offset: int, raw: bytes | None) -> StoredLetter | None:
    try:
        return StoredLetter(partition, offset, DeadLetter.from_json_bytes(raw or b""))
    except BadInput:
        return None  # not a dead letter of ours: nothing to show or send back


async def follow_dead_letters(
    kafka: KafkaConnection,
    on_letter: Callable[[StoredLetter, bytes], None],
    *,
    from_beginning: bool = False,
    count: int | None = None,
    timeout_s: float | None = None,
    watch: BrokerWatch | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Call ``on_letter(stored, raw)`` for each dead letter until ``count``, ``timeout_s`` or ``stop``."""
    consumer = groupless_consumer(kafka, DEAD_LETTERS, from_beginning=from_beginning)

    def take(batches: Batches, room: int | None) -> int:
        taken = 0
        for partition, records in sorted(batches.items()):
            for record in records:
                stored = _decode(partition.partition, record.offset, record.value)
                if stored is None or (room is not None and taken >= room):
                    continue
                on_letter(stored, record.value or b"")
                taken += 1
        return taken

    source = f"{DEAD_LETTERS!r} from {kafka.describe()}"
    return await follow(
        consumer,
        take,
        source=source,
        count=count,
        timeout_s=timeout_s,
        max_records=500,
        watch=watch,
        stop=stop,
    )


async def read_all_dead_letters(kafka: KafkaConnection, *, idle_s: float = 10.0) -> list[StoredLetter]:
    """Every dead letter the topic holds now; letters written after the read began are left for
    the next run.

    The end offsets are only a lower bound: Tansu 0.6 answers ListOffsets(latest) with its last
    batch's base offset + 1. So the read goes on past them until a fetch brings nothing older
    than the read's start.
    """
    consumer = groupless_consumer(kafka, from_beginning=True)  # assigned below, not subscribed
    letters: list[StoredLetter] = []
    started_ms = time.time() * 1000
    try:
        await consumer.start()
        await consumer.topics()  # the cluster's metadata, so that the topic's partitions are known
        partitions = [
            TopicPartition(DEAD_LETTERS, p) for p in consumer.partitions_for_topic(DEAD_LETTERS) or ()
        ]
        if not partitions:
            raise ServiceError(f"{kafka.describe()} has no topic {DEAD_LETTERS!r}")
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        last_progress = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            older = 0
            for tp, records in batches.items():
                for record in records:
                    if record.timestamp > started_ms:
                        continue  # written after the read began
                    older += 1
                    stored = _decode(tp.partition, record.offset, record.value)
                    if stored is not None:
                        letters.append(stored)
            if batches:
                last_progress = time.monotonic()
            positions = [await consumer.position(tp) for tp in partitions]
            if older == 0 and all(pos >= ends[tp] for pos, tp in zip(positions, partitions, strict=True)):
                break
            if time.monotonic() - last_progress > idle_s:
                raise ServiceError(f"{DEAD_LETTERS!r} on {kafka.describe()} stopped answering before its end")
    except KafkaError as exc:
        raise ServiceError(f"cannot read {DEAD_LETTERS!r} from {kafka.describe()}: {exc!r}") from exc
    finally:
        await consumer.stop()
    return sorted(letters, key=lambda s: (s.partition, s.offset))


@dataclass
class RedriveReport:
    """What ``redrive`` did: letters sent back, and those it could not send (truncated originals)."""

    sent: list[StoredLetter] = field(default_factory=list)
    truncated: list[StoredLetter] = field(default_factory=list)


async def redrive(
    kafka: KafkaConnection, letters: Iterable[StoredLetter], *, topic: str = UTTERANCES, dry_run: bool = False
) -> RedriveReport:
    """Re-publish each letter's original value and key to ``topic``, awaiting the broker's acks."""
    report = RedriveReport()
    chosen: list[StoredLetter] = []
    for stored in letters:
        truncated = stored.letter.original_truncated or stored.letter.original_key_truncated
        (report.truncated if truncated else chosen).append(stored)
    if dry_run or not chosen:
        report.sent = chosen
        return report
    producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), acks="all", linger_ms=5)
    try:
        await producer.start()
        acks = [await producer.send(topic, s.letter.original(), key=s.letter.original_key()) for s in chosen]
        await asyncio.gather(*acks)
    except KafkaError as exc:
        raise ServiceError(f"cannot produce to {topic!r} on {kafka.describe()}: {exc!r}") from exc
    finally:
        await producer.stop()
    report.sent = chosen
    return report
