"""The offset guard's decision, and the faust/aiokafka internals it and /health rely on (one
contract test each: an upgrade that changes them fails here, not in production)."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.commit import OffsetCommitRequest, OffsetFetchRequest
from aiokafka.structs import OffsetAndMetadata
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Worker as ModeWorker

from worker.stream import faust_adapter
from worker.stream.faust_adapter import (
    NO_TOPIC_ID,
    BoundedShutdownWorker,
    GroupCommit,
    Stamp,
    serve_only_our_views,
)
from worker.stream.offsets import (
    CommitVerdict,
    FoundCommit,
    LogIdentities,
    OffsetResetPolicy,
    PartitionOffsets,
    judge_commit,
    reset_target,
    stamp_group,
    stamp_number,
    stamp_of,
)


@pytest.mark.parametrize(
    ("offsets", "past"),
    [
        (PartitionOffsets(log_end=None, position=500, read=499, committed=500), False),  # no fetch yet
        (PartitionOffsets(log_end=500, position=500, read=499, committed=500), False),  # at the end
        (PartitionOffsets(log_end=3000, position=120, read=119, committed=100), False),  # behind: lag
        (PartitionOffsets(log_end=100, position=500, read=None, committed=None), True),  # Tansu restarted
        (
            PartitionOffsets(log_end=300, position=300, read=5999, committed=6000),
            True,
        ),  # Kafka reset silently
        (PartitionOffsets(log_end=None, position=0, read=1199, committed=1200), True),  # reset, no fetch yet
        (PartitionOffsets(log_end=2000, position=1500, read=1499, committed=1200), False),  # in flight
        (PartitionOffsets(log_end=2000, position=1200, read=1200, committed=1200), False),  # faust's seek
        (PartitionOffsets(log_end=0, position=0, read=None, committed=None), False),  # a new empty log
    ],
)
def test_past_the_end_means_the_log_was_replaced(offsets: PartitionOffsets, past: bool) -> None:
    assert offsets.past_the_end() is past


def test_the_policy_picks_the_start_or_the_end_of_the_new_log() -> None:
    assert reset_target(OffsetResetPolicy.EARLIEST, log_start=0, log_end=300) == 0
    assert reset_target(OffsetResetPolicy.LATEST, log_start=0, log_end=300) == 300


def on_new_app(check: Callable[[faust.App], None]) -> None:
    """Run ``check`` on a fresh, never started app, inside an event loop (as the worker does)."""

    async def run() -> None:
        app = faust.App("contract", broker="kafka://127.0.0.1:1", autodiscover=False)
        try:
            check(app)
        finally:
            if app._consumer is not None:  # made on first use; its thread's loop is never started
                app._consumer._thread.thread_loop.close()

    asyncio.run(run())


def test_faust_consumer_keeps_the_offsets_the_reset_clears() -> None:
    def check(app: faust.App) -> None:
        consumer = app.consumer
        for name in (
            "_read_offset",
            "_committed_offset",
            "_acked",
            "_acked_index",
            "_gap",
            "_unacked_messages",
        ):
            assert hasattr(consumer, name), name
        assert hasattr(consumer, "_thread") and hasattr(consumer._thread, "_consumer")
        assert inspect.iscoroutinefunction(consumer.seek)

    on_new_app(check)


def test_aiokafka_consumer_tells_when_a_partition_was_last_fetched() -> None:
    assert "partition" in inspect.signature(AIOKafkaConsumer.last_poll_timestamp).parameters
    assert callable(AIOKafkaConsumer.highwater)


def test_the_default_views_are_blueprints_we_can_drop() -> None:
    def check(app: faust.App) -> None:
        enabled = app.web.blueprints._enabled
        assert any(prefix == "/router" for prefix, _ in enabled)
        serve_only_our_views(app)
        assert app.web.blueprints._enabled == []

    on_new_app(check)


def test_mode_worker_has_the_signal_handlers_we_wrap() -> None:
    for name in ("_on_sigterm", "_on_sigint"):
        assert callable(getattr(ModeWorker, name))
        assert getattr(BoundedShutdownWorker, name) is not getattr(ModeWorker, name)


# -- issue 14: commits stamped with their log's topic id -------------------------------------------

OLD_LOG = uuid.UUID("01a22d8a-1d66-7421-9ef6-513c07f4f877")
NEW_LOG = uuid.UUID("01a22d9b-0000-7000-8000-000000000001")
TP0 = TP("utterances", 0)


def test_a_caught_up_worker_restarted_is_not_past_the_end() -> None:
    # faust's seek to the commit sets its read offset to the commit itself, not the last delivered.
    assert not PartitionOffsets(log_end=201, position=201, read=201, committed=201).past_the_end()
    assert PartitionOffsets(log_end=201, position=202, read=201, committed=201).past_the_end()


def test_a_stamp_is_a_committable_offset_that_names_the_topic_id() -> None:
    assert stamp_number(OLD_LOG) == stamp_number(uuid.UUID(str(OLD_LOG)))
    assert stamp_number(OLD_LOG) != stamp_number(NEW_LOG)
    assert all(0 <= stamp_number(uuid.uuid4()) < 2**62 for _ in range(100))
    assert stamp_of(OLD_LOG) == Stamp(f"topic_id={OLD_LOG}", stamp_number(OLD_LOG))
    assert stamp_of(NO_TOPIC_ID) == Stamp("", None)  # a broker without topic ids: nothing to stamp
    assert stamp_group("workers") == "workers.topic-ids"


@pytest.mark.parametrize(
    ("commit", "verdict"),
    [
        (FoundCommit(None), CommitVerdict.NONE),
        (FoundCommit(50), CommitVerdict.UNSTAMPED),  # a worker from before stamps: trusted
        (FoundCommit(50, "something else"), CommitVerdict.UNSTAMPED),
        (FoundCommit(50, f"topic_id={NEW_LOG}"), CommitVerdict.OWN),  # Kafka keeps the metadata
        (FoundCommit(50, "", stamp_number(NEW_LOG)), CommitVerdict.OWN),  # Tansu: the stamp group
        (FoundCommit(50, f"topic_id={OLD_LOG}"), CommitVerdict.FOREIGN),
        (FoundCommit(50, "", stamp_number(OLD_LOG)), CommitVerdict.FOREIGN),  # the 305-skip case
        (FoundCommit(50, f"topic_id={NEW_LOG}", stamp_number(OLD_LOG)), CommitVerdict.OWN),  # metadata first
        (FoundCommit(50, "topic_id=not-a-uuid", stamp_number(OLD_LOG)), CommitVerdict.FOREIGN),
    ],
)
def test_a_commit_stamped_with_another_topic_id_is_foreign(
    commit: FoundCommit, verdict: CommitVerdict
) -> None:
    assert judge_commit(commit, NEW_LOG) is verdict


def test_without_a_topic_id_to_compare_a_stamped_commit_is_trusted() -> None:
    assert judge_commit(FoundCommit(50, "", stamp_number(OLD_LOG)), NO_TOPIC_ID) is CommitVerdict.UNSTAMPED


def test_the_fence_lets_through_only_partitions_judged_on_the_log_the_broker_has() -> None:
    identities = LogIdentities("workers")
    tp1 = TP("utterances", 1)
    assert identities.unjudged([TP0, tp1]) == [TP0, tp1]
    assert identities.stamps({TP0: 10, tp1: 10}, {"utterances": NEW_LOG}) == {}  # nothing judged yet
    foreign = GroupCommit(50, "")
    assert (
        identities.judge(TP0, foreign, GroupCommit(stamp_number(OLD_LOG), ""), NEW_LOG)
        is CommitVerdict.FOREIGN
    )
    assert identities.judge(tp1, GroupCommit(7, ""), None, NEW_LOG) is CommitVerdict.UNSTAMPED
    assert identities.unjudged([TP0, tp1]) == [TP0]  # a foreign one waits for the guard's reset
    assert identities.stamps({TP0: 10, tp1: 10}, {"utterances": NEW_LOG}) == {tp1: stamp_of(NEW_LOG)}
    # The topic created again under the worker: its offsets are the old log's, held back.
    assert identities.stamps({tp1: 10}, {"utterances": OLD_LOG}) == {}
    assert identities.stamps({tp1: 10}, {}) == {}  # the broker did not tell (yet)
    identities.forget(tp1)
    assert identities.held() == set()


# The fence in the consumer's thread, against a broker stand-in that answers the requests it sends.


class StandInClient:
    """What the fence asks of aiokafka's client, answered from dicts (no network)."""

    def __init__(self, ids: dict[str, uuid.UUID], commits: dict[tuple[str, TP], tuple[int, str]]) -> None:
        self.ids = ids
        self.commits = commits  # (group, tp) -> (offset, metadata)

    def get_random_node(self) -> int:
        return 0

    async def coordinator_lookup(self, kind: object, group: str) -> int:
        return 0

    async def send(self, node: int, request: Any) -> Any:
        if isinstance(request, faust_adapter.wire._TopicIdsRequest):
            struct = request.prepare({3: (0, 12)})  # what a broker with topic ids negotiates
            assert struct.API_VERSION == 10
            topics = []
            for name in request.topics:
                topic_id = self.ids.get(name)
                code = 0 if topic_id is not None else 3
                value = (topic_id or NO_TOPIC_ID).int
                high, low = value >> 64, value & (2**64 - 1)
                signed = [h - 2**64 if h >= 2**63 else h for h in (high, low)]
                topics.append((code, name, *signed, False, [], -2147483648, {}))
            payload = faust_adapter.wire._MetadataResponse_v10(
                0, [], "c", 0, topics, -2147483648, {}
            ).encode()
            return faust_adapter.wire._MetadataResponse_v10.decode(payload)  # the wire format round trip
        if isinstance(request, OffsetFetchRequest):
            group, asked = request._consumer_group, request._partitions
            topics = []
            for topic, partitions in asked:
                rows = []
                for p in partitions:
                    offset, metadata = self.commits.get((group, TP(topic, p)), (-1, ""))
                    rows.append((p, offset, metadata, 0))
                topics.append((topic, rows))
            return SimpleNamespace(topics=topics, error_code=0)
        if isinstance(request, OffsetCommitRequest):
            group = request._consumer_group
            for topic, partitions in request._topics:
                for p, offset, metadata in partitions:
                    self.commits[(group, TP(topic, p))] = (offset, metadata)
            return SimpleNamespace(topics=[(t, [(p, 0) for p, *_ in ps]) for t, ps in request._topics])
        raise AssertionError(f"unexpected request {request!r}")


class StandInConsumer:
    def __init__(self, client: StandInClient, group: str) -> None:
        self._client = client
        self.group = group

    async def commit(self, offsets: dict[Any, OffsetAndMetadata]) -> None:
        for tp, commit in offsets.items():
            self._client.commits[(self.group, TP(tp.topic, tp.partition))] = (commit.offset, commit.metadata)


def fenced_commit(client: StandInClient, identities: LogIdentities, offsets: dict[TP, int]) -> bool:
    """One commit through the adapter's consumer thread, fenced by ``identities``."""
    result: list[bool] = []

    async def check(app: faust.App) -> None:
        faust_adapter.use_fetch_wait(app, 0.05)
        faust_adapter.fence_commits(app, identities)

        def ignore(*args: object) -> None:
            return None

        consumer = app.transport.Consumer(
            app.transport, callback=ignore, on_partitions_revoked=ignore, on_partitions_assigned=ignore
        )
        thread = consumer._thread  # type: ignore[attr-defined]
        try:
            assert isinstance(thread, faust_adapter._ConsumerThread)
            thread._ensure_consumer = lambda: StandInConsumer(client, identities.group)
            thread.assignment = lambda: set(offsets)
            result.append(await thread._commit(offsets))
        finally:
            thread.thread_loop.close()

    asyncio.run(check_on_app(check))
    return result[0]


async def check_on_app(check: Callable[[faust.App], Any]) -> None:
    app = faust.App("contract", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
    await check(app)


def test_the_first_commit_judges_then_commits_stamped_in_the_group_and_the_stamp_group() -> None:
    client = StandInClient({"utterances": NEW_LOG}, {})
    identities = LogIdentities("workers")
    assert fenced_commit(client, identities, {TP0: 12}) is True
    assert client.commits[("workers", TP0)] == (12, f"topic_id={NEW_LOG}")
    assert client.commits[("workers.topic-ids", TP0)] == (stamp_number(NEW_LOG), "")


def test_a_commit_of_a_replaced_log_is_held_back() -> None:
    # The worker judged the partition on the old log; the broker now holds a new one.
    client = StandInClient({"utterances": NEW_LOG}, {("workers", TP0): (3, "")})
    identities = LogIdentities("workers")
    identities.vouch(TP0, OLD_LOG)
    assert fenced_commit(client, identities, {TP0: 300}) is False
    assert client.commits == {("workers", TP0): (3, "")}  # untouched: no old offset in the new log


def test_a_foreign_commit_is_not_committed_over_before_the_guard_resets_it() -> None:
    stale = {("workers", TP0): (50, ""), ("workers.topic-ids", TP0): (stamp_number(OLD_LOG), "")}
    client = StandInClient({"utterances": NEW_LOG}, dict(stale))
    identities = LogIdentities("workers")
    assert fenced_commit(client, identities, {TP0: 120}) is False
    assert client.commits == stale and identities.unjudged([TP0]) == [TP0]


def test_a_broker_that_does_not_know_the_topic_yet_gets_no_commit() -> None:
    client = StandInClient({}, {})
    assert fenced_commit(client, LogIdentities("workers"), {TP0: 5}) is False
    assert client.commits == {}


def test_a_broker_without_metadata_v10_gets_unstamped_commits_as_before() -> None:
    class OldBroker(StandInClient):
        async def send(self, node: int, request: Any) -> Any:
            if isinstance(request, faust_adapter.wire._TopicIdsRequest):
                return request.prepare({3: (0, 9)})  # raises: no version with topic ids
            return await super().send(node, request)

    client = OldBroker({}, {})
    identities = LogIdentities("workers")
    assert fenced_commit(client, identities, {TP0: 5}) is True
    assert client.commits == {("workers", TP0): (5, "")}


def test_faust_commits_through_the_consumer_thread_we_replace() -> None:
    """faust's thread ``_commit(offsets)`` is what its ``commit`` calls, with ``crash`` beside it;
    aiokafka's client and request builders have what the fence uses."""
    assert inspect.iscoroutinefunction(faust_aiokafka.AIOKafkaConsumerThread._commit)
    assert list(inspect.signature(faust_aiokafka.AIOKafkaConsumerThread._commit).parameters) == [
        "self",
        "offsets",
    ]
    assert inspect.iscoroutinefunction(faust_aiokafka.AIOKafkaConsumerThread.crash)
    # Its commit calls _commit in the thread (tp_last_committed_at: the fenced commits above set it).
    assert "self._commit" in inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread.commit)
    for name in ("send", "coordinator_lookup", "get_random_node"):
        assert callable(getattr(AIOKafkaClient, name)), name
    assert list(inspect.signature(OffsetCommitRequest).parameters) == [
        "consumer_group",
        "consumer_group_generation_id",
        "consumer_id",
        "retention_time",
        "topics",
    ]
    assert list(inspect.signature(OffsetFetchRequest).parameters) == ["consumer_group", "partitions"]
