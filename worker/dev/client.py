"""Small Kafka clients for a person trying the worker: send, replay and tail utterances.

Input lines are JSONL (one ``utterance.v1``-like object per line, extra fields kept) or
plain text (one utterance per line). Objects are forwarded as they are, so a deliberately
bad record reaches the worker's dead-letter path; only a missing ``id`` (and ``locale``,
when one is given) is filled in.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from worker.connections import KafkaConnection, as_kafka
from worker.errors import BadInput, ServiceError
from worker.schemas import Intent, Utterance
from worker.topics import INTENTS, UTTERANCES

MAX_PENDING_ACKS = 10_000  # sends awaited in groups: bounded memory at any rate
KNOWN_TEXTS = 100_000  # ids whose text `tail` remembers


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for the ``utterances`` topic."""

    key: bytes
    value: bytes


def new_id() -> str:
    return f"cli-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True, slots=True)
class InputLine:
    """One line of input and where it came from (``argument 2``, ``stdin line 7``), for errors."""

    where: str
    text: str


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"{where} is not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}): utterances are "
            "UTF-8 text; convert it first (e.g. iconv -f latin1 -t utf-8)",
            reason="not_utf8",
        ) from exc


def argument_lines(texts: Iterable[str]) -> list[InputLine]:
    """Command-line texts, one utterance each. Python hands over undecodable bytes as lone
    surrogates (surrogateescape); they are named here instead of failing later in the encoder."""
    lines = []
    for number, text in enumerate(texts, 1):
        where = f"argument {number}"
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise BadInput(f"{where} holds an unpaired surrogate at character {exc.start + 1}") from exc
        decoded = _utf8(raw, where)
        if not decoded.strip():
            raise BadInput(
                f"{where} is {'empty' if not decoded else 'whitespace only'}: an utterance needs a text "
                "(utterance.v1 refuses an empty one, and the worker would dead-letter it as "
                "text_empty). To see that happen, send the record itself: "
                """echo '{"text": ""}' | intent-worker send""",
                reason="text_empty",
            )
        lines.append(InputLine(where, decoded))
    return lines


def read_lines(raw: bytes, source: str) -> list[InputLine]:
    """The lines of a file or of stdin, strictly UTF-8; a line that is not names itself."""
    return [
        InputLine(f"{source} line {number}", _utf8(line, f"{source} line {number}"))
        for number, line in enumerate(raw.splitlines(), 1)
    ]


def _record_bytes(record: dict[str, object]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: keep the escape, let the worker judge
        return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def outgoing_from_lines(
    lines: Iterable[InputLine | str], *, locale: str | None = None, suffix: str = ""
) -> Iterator[Outgoing]:
    """One message per non-blank line: JSON objects as they are (plus an id), other lines as text.

    A line that starts with ``{`` is a JSON object or an error naming the line: a broken JSONL
    line is never sent as if it were an utterance's text.
    """
    for number, line in enumerate(lines, 1):
        where, text = (line.where, line.text) if isinstance(line, InputLine) else (f"line {number}", line)
        stripped = text.strip()
        if not stripped:
            continue
        if not stripped.startswith("{"):
            utterance = Utterance(id=new_id(), text=stripped, locale=locale, timestamp=time.time())
            yield Outgoing(utterance.id.encode("utf-8"), utterance.to_json_bytes())
            continue
        try:
            record = json.loads(stripped)
        except ValueError as exc:
            detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise BadInput(
                f"{where} starts with '{{' but is not a JSON object ({detail}); fix the line, or give "
                'a text that starts with a brace as JSON: {"text": "{...}"}',
                reason="not_json",
            ) from exc
        if not isinstance(record.get("id"), str) or not record["id"]:
            record["id"] = new_id()
        record["id"] = f"{record['id']}{suffix}"
        if locale is not None and not record.get("locale"):
            record["locale"] = locale
        yield Outgoing(str(record["id"]).encode("utf-8", errors="replace"), _record_bytes(record))


def producer(kafka: str | KafkaConnection) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **as_kafka(kafka).aiokafka_kwargs(),
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=2 * 1024 * 1024,
    )


async def send_all(
    kafka: str | KafkaConnection,
    messages: Iterable[Outgoing],
    *,
    rate: float = 0.0,
    topic: str = UTTERANCES,
    on_sent: Callable[[Outgoing], None] | None = None,
) -> int:
    """Produce ``messages`` at ``rate`` per second (0: as fast as the broker takes them).

    Returns how many the broker acknowledged; raises :class:`ServiceError` if it cannot.
    """
    client = producer(kafka)
    bootstrap = as_kafka(kafka).bootstrap
    sent = 0
    try:
        await client.start()
        pending: list[Awaitable[object]] = []
        started = time.monotonic()
        for index, message in enumerate(messages):
            if rate > 0:
                due = started + index / rate
                delay = due - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            pending.append(await client.send(topic, message.value, key=message.key))
            if on_sent is not None:
                on_sent(message)
            if len(pending) >= MAX_PENDING_ACKS:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        sent += len(pending)
    except KafkaError as exc:
        raise ServiceError(f"cannot produce to {topic!r} on {bootstrap}: {exc!r}") from exc
    finally:
        await client.stop()
    return sent


class BrokerWatch:
    """Says once that the broker stopped answering, and once that it is back.

    aiokafka retries a lost broker by itself and logs every failed attempt (about 250 lines in
    30 s); a reader like ``tail`` silences those and reports the state change instead. Checked
    after each empty fetch: a TCP connection to a bootstrap address, at most every ``every_s``.
    """

    def __init__(self, bootstrap: str, report: Callable[[str], None], *, every_s: float = 2.0) -> None:
        self.addresses = [a.strip().rpartition(":") for a in bootstrap.split(",") if a.strip()]
        self.bootstrap = bootstrap
        self.report = report
        self.every_s = every_s
        self.down = False
        self._checked = 0.0

    async def check(self, *, got_records: bool = False) -> None:
        now = time.monotonic()
        if got_records:
            reachable = True
        elif now - self._checked < self.every_s:
            return
        else:
            self._checked = now
            reachable = await self._reachable()
        if reachable == (not self.down):
            return
        self.down = not reachable
        if self.down:
            self.report(
                f"the broker at {self.bootstrap} is not answering (did the worker's `intent-worker run` "
                "stop?); waiting for it quietly, Ctrl-C stops"
            )
        else:
            self.report(f"the broker at {self.bootstrap} answers again")

    async def _reachable(self) -> bool:
        for host, _, port in self.addresses:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 1.0)
            except (OSError, TimeoutError, ValueError):
                continue
            writer.close()
            return True
        return False


def groupless_consumer(kafka: KafkaConnection, *topics: str, from_beginning: bool) -> AIOKafkaConsumer:
    """A consumer in no group: reading commits nothing and disturbs no worker's group."""
    return AIOKafkaConsumer(
        *topics,
        **kafka.aiokafka_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )


Batches = dict[TopicPartition, list[ConsumerRecord]]


async def follow(
    consumer: AIOKafkaConsumer,
    take: Callable[[Batches, int | None], int],
    *,
    source: str,
    count: int | None,
    timeout_s: float | None,
    max_records: int,
    watch: BrokerWatch | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Start ``consumer`` and hand each fetch to ``take(batches, room)`` until ``count`` records are
    taken, ``timeout_s`` passes or ``stop`` is set; the records taken.

    ``take`` returns how many it took, at most ``room`` (``None``: no limit). Fetches are at most
    1 s apart and ``watch`` hears of every one, empty or not. A Kafka error is a `ServiceError`
    naming ``source`` (what was read, from where); the consumer is stopped in any case.
    ``stop`` is how a signal ends the loop: unlike a cancellation, which Python 3.11's
    ``asyncio.wait_for`` can swallow (inside aiokafka, or `BrokerWatch`'s probe of a dead broker),
    a set flag is still set at the next fetch.
    """
    seen = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        await consumer.start()
        while (count is None or seen < count) and not (stop is not None and stop.is_set()):
            wait_ms = 1000 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if deadline is not None and wait_ms <= 0:
                break
            batches = await consumer.getmany(timeout_ms=min(wait_ms, 1000), max_records=max_records)
            if watch is not None:
                await watch.check(got_records=bool(batches))
            seen += take(batches, None if count is None else count - seen)
    except KafkaError as exc:
        raise ServiceError(f"cannot read {source}: {exc!r}") from exc
    finally:
        await _stop_consumer(consumer)
    return seen


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, without the CancelledError of aiokafka's own fetch tasks.

    Its fetcher cancels the fetches in flight and awaits them, so with a fetch to a dead broker
    pending, their CancelledError comes out of ``stop()``. A cancellation of this task itself is
    still raised.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def describe(intent: Intent, text: str | None) -> str:
    """One line of ``tail``: id, label, top score, locale, model version, text (if known)."""
    top = intent.scores.get(intent.label, 0.0)
    columns = [intent.id, intent.label, f"{top:.3f}", intent.locale or "-", intent.model_version]
    if text is not None:
        columns.append(text if len(text) <= 200 else text[:199] + "…")
    return "\t".join(columns)


async def follow_intents(
    kafka: str | KafkaConnection,
    on_intent: Callable[[Intent, str | None, bytes], None],
    *,
    from_beginning: bool = False,
    count: int | None = None,
    timeout_s: float | None = None,
    watch: BrokerWatch | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Call ``on_intent(intent, text, raw)`` for each label on ``intents`` until ``count``,
    ``timeout_s`` or ``stop``.

    It also reads ``utterances`` to show each label's text, when the utterance was seen first.
    No consumer group: nothing is committed, and a worker's group is never disturbed.

    Not ``from_beginning``, it shows only labels produced after it started. "latest" alone is not
    enough on Tansu 0.6, which answers ListOffsets(latest) with its last batch's base offset + 1:
    the rest of that batch would come first. Those records lie below the first fetch's high
    watermark and carry older timestamps; on a broker that answers correctly there are none.
    """
    consumer = groupless_consumer(as_kafka(kafka), INTENTS, UTTERANCES, from_beginning=from_beginning)
    texts: OrderedDict[str, str] = OrderedDict()
    started_ms = time.time() * 1000
    first_highwater: dict[TopicPartition, int] = {}

    def take(batches: Batches, room: int | None) -> int:
        taken = 0
        # Utterances first, so that a label fetched together with its utterance shows the text.
        for partition, records in sorted(batches.items(), key=lambda item: item[0].topic != UTTERANCES):
            for record in records:
                if room is not None and taken >= room:
                    break
                if partition.topic == UTTERANCES:
                    _remember_text(texts, record.value)
                    continue
                if not from_beginning:
                    end = first_highwater.setdefault(partition, consumer.highwater(partition) or 0)
                    if record.offset < end and record.timestamp < started_ms:
                        continue  # there before tail started (see follow_intents' docstring)
                try:
                    intent = Intent.from_json_bytes(record.value)
                except BadInput:
                    continue  # not ours to judge: tail shows labels, not errors
                on_intent(intent, texts.get(intent.id), record.value)
                taken += 1
        return taken

    source = f"{INTENTS!r} from {as_kafka(kafka).bootstrap}"
    return await follow(
        consumer,
        take,
        source=source,
        count=count,
        timeout_s=timeout_s,
        max_records=1000,
        watch=watch,
        stop=stop,
    )


def _remember_text(texts: OrderedDict[str, str], raw: bytes | None) -> None:
    try:
        record = json.loads(raw or b"")
    except ValueError:
        return
    if isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("text"), str):
        texts[record["id"]] = record["text"]
        if len(texts) > KNOWN_TEXTS:
            texts.popitem(last=False)
