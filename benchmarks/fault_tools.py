"""Plumbing of the fault benchmark: a ledger of outputs that survives broker restarts, a producer
that records which sends the broker acknowledged, and the tally of one scenario.

Both run on a thread of their own (each with its own event loop), so a scenario can freeze,
kill and restart services from the main thread while traffic flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from streams import Text, utterance_bytes

from worker.errors import BadInput
from worker.schemas import DeadLetter
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES


class Ledger:
    """Every ``intents`` and ``utterances.dlq`` record seen, by key, across broker restarts.

    A consumer without a group follows both topics from the beginning. A memory-only broker
    that restarts comes back with short logs: a partition whose log end went back is read
    again from its beginning (counted in ``restarts_seen``).
    """

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.intents: Counter[bytes] = Counter()
        self.letters: dict[bytes, str] = {}
        #: Dead letters whose key was cut (INTENT_DLQ_MAX_KEY_BYTES): matched by prefix.
        self.cut_keys: list[bytes] = []
        self.letter_sizes: list[int] = []
        self.restarts_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> Ledger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def snapshot(self) -> tuple[Counter[bytes], dict[bytes, str]]:
        with self._lock:
            return Counter(self.intents), dict(self.letters)

    def settle(self, expected: int, timeout_s: float, quiet_s: float = 3.0) -> None:
        """Wait until ``expected`` keys have an output, or nothing new arrived for ``quiet_s``
        after the timeout began to matter (bounded by ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                seen = len(self.intents) + len(self.letters)
            if seen >= expected:
                time.sleep(quiet_s)  # let late duplicates land: they are counted, not hidden
                return
            if seen != last:
                last, last_change = seen, time.monotonic()
            elif time.monotonic() - last_change > max(quiet_s, 20.0):
                return
            time.sleep(0.5)

    def _run(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            INTENTS,
            DEAD_LETTERS,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
            metadata_max_age_ms=2000,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        highest: dict[object, int] = {}
        try:
            while not self._stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=300, max_records=5000)
                except KafkaError:
                    await asyncio.sleep(0.5)
                    continue
                with self._lock:
                    for tp, records in batches.items():
                        for record in records:
                            self._note(tp.topic, record.key or b"", record.value or b"")
                for tp in consumer.assignment():
                    end = consumer.highwater(tp)
                    if end is None:
                        continue
                    if end < highest.get(tp, 0):  # a log's end never goes back: a new, empty log
                        self.restarts_seen += 1
                        consumer.seek(tp, 0)
                    highest[tp] = end
        finally:
            await consumer.stop()

    def _note(self, topic: str, key: bytes, value: bytes) -> None:
        if topic == INTENTS:
            self.intents[key] += 1
            return
        try:
            letter = DeadLetter.from_json_bytes(value)
        except BadInput:
            self.letters[key] = "unreadable_dead_letter"
            return
        self.letter_sizes.append(len(key) + len(value))
        self.letters[key] = letter.error_type
        if letter.original_key_truncated:
            self.cut_keys.append(key)


@dataclass
class Sent:
    """What a producer was told: acknowledged keys (with the broker epoch they went to), failures."""

    acked: dict[bytes, int] = field(default_factory=dict)
    failed: int = 0
    epoch: int = 0  # bumped by the scenario when it restarts the broker


class Traffic:
    """Produce ``items`` (and ``extra`` raw records first) at ``rate`` per second on a thread."""

    def __init__(
        self,
        bootstrap: str,
        items: Sequence[Text],
        rate: float,
        *,
        extra: Iterable[tuple[bytes, bytes]] = (),
        request_timeout_s: float = 30.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.items = items
        self.rate = rate
        self.extra = list(extra)
        self.request_timeout_s = request_timeout_s
        self.sent = Sent()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._produce()), daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 300.0) -> Sent:
        self._thread.join(timeout=timeout_s)
        return self.sent

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=5,
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=int(self.request_timeout_s * 1000),
            metadata_max_age_ms=2000,
        )
        await producer.start()
        pending: set[asyncio.Future[object]] = set()

        def track(key: bytes, epoch: int, future: asyncio.Future[object]) -> None:
            pending.discard(future)
            if future.cancelled() or future.exception() is not None:
                self.sent.failed += 1
            else:
                self.sent.acked[key] = epoch

        async def send(key: bytes, value: bytes) -> None:
            epoch = self.sent.epoch
            try:
                future = await producer.send(UTTERANCES, value, key=key)
            except KafkaError:
                self.sent.failed += 1
                return
            pending.add(future)
            future.add_done_callback(lambda f: track(key, epoch, f))

        try:
            for key, value in self.extra:
                await send(key, value)
            started = time.monotonic()
            for index, item in enumerate(self.items):
                delay = started + index / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send(item.id.encode(), utterance_bytes(item, time.time()))
            if pending:
                await asyncio.wait(pending, timeout=self.request_timeout_s + 10)
        finally:
            with contextlib.suppress(KafkaError):
                await producer.stop()


def log_keys(bootstrap: str, topic: str = UTTERANCES, timeout_s: float = 60.0) -> set[bytes]:
    """The keys of every record ``topic``'s logs hold now, read from their beginnings to their ends."""

    async def read() -> set[bytes]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=200
        )
        await consumer.start()
        keys: set[bytes] = set()
        try:
            await consumer.topics()  # the cluster's metadata, so the topic's partitions are known
            partitions = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                positions = [await consumer.position(tp) for tp in partitions]
                if all(at >= ends[tp] for at, tp in zip(positions, partitions, strict=True)):
                    break
                for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                    keys.update(record.key or b"" for record in records)
        finally:
            await consumer.stop()
        return keys

    return asyncio.run(read())


def tally(
    sent: Mapping[bytes, int],
    ledger: Ledger,
    *,
    lost_epochs: frozenset[int] = frozenset(),
    in_log: set[bytes] | None = None,
) -> dict[str, int]:
    """Produced (acknowledged), labelled (unique keys), duplicates, dead-lettered and lost.

    Keys acknowledged in one of ``lost_epochs`` (by a memory-only broker that was then killed)
    and seen nowhere are counted apart, as ``lost_with_broker``: the broker lost them, not the
    worker, and nothing could have read them. With ``in_log`` (the keys the broker's
    ``utterances`` logs hold at the end), a key acknowledged in another epoch, seen nowhere and
    absent from the log is ``dropped_by_broker``: acknowledged, yet never in a log the worker
    could read. ``lost`` is then only what the worker could have read and did not label.
    """
    intents, letters = ledger.snapshot()
    cut = list(ledger.cut_keys)

    def dead_lettered(key: bytes) -> bool:
        return key in letters or any(key.startswith(prefix) for prefix in cut if len(key) > len(prefix))

    labelled = [key for key in sent if intents.get(key)]
    dead = [key for key in sent if dead_lettered(key)]
    missing = [key for key in sent if not intents.get(key) and not dead_lettered(key)]
    counts = {
        "produced": len(sent),
        "labelled": len(labelled),
        "duplicates": sum(intents[key] - 1 for key in labelled),
        "dead_lettered": len(dead),
        "lost": sum(sent[key] not in lost_epochs for key in missing),
        "lost_with_broker": sum(sent[key] in lost_epochs for key in missing),
    }
    if in_log is not None:
        dropped = sum(sent[key] not in lost_epochs and key not in in_log for key in missing)
        counts["dropped_by_broker"] = dropped
        counts["lost"] -= dropped
    return counts


def json_line(record: Mapping[str, object]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
