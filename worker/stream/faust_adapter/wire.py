"""The Kafka wire calls behind the commit stamps (issue 14), which neither faust nor aiokafka makes.

Part of the one door to faust's and aiokafka's internals (see the package docstring): the topic
ids of Metadata v10, and a group's commits fetched and made as a member of none, built from
aiokafka's protocol classes and sent with the client under faust's consumer.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol, cast

from aiokafka import errors as kafka_errors
from aiokafka.client import CoordinationType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.commit import OffsetCommitRequest, OffsetFetchRequest
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from faust.types import TP

# -- Issue 14: the identity of a log (its topic id), stamped on every commit ---------------------

#: The topic id of a topic the broker keeps no id for (Kafka before 2.8): nothing to stamp with.
NO_TOPIC_ID = uuid.UUID(int=0)


class Stamp(NamedTuple):
    """What a commit of one partition carries to name its log."""

    metadata: str  # the commit's metadata string, kept by Kafka (Tansu 0.6 answers it empty)
    number: int | None  # committed as the partition's offset in the stamp group; None: nothing there


class GroupCommit(NamedTuple):
    """One partition's commit in a group, as the broker answers it."""

    offset: int
    metadata: str


class CommitFence(Protocol):
    """Which offsets may be committed, and how each is stamped (``worker.stream.offsets``)."""

    #: The consumer group, and the group in which each commit's stamp is also committed (for
    #: brokers that drop commit metadata).
    group: str
    stamp_group: str

    def unjudged(self, tps: Iterable[TP]) -> list[TP]:
        """Those of ``tps`` whose commit at the broker has not been judged yet."""
        ...

    def judge(
        self, tp: TP, commit: GroupCommit | None, stamp: GroupCommit | None, topic_id: uuid.UUID
    ) -> object:
        """Judge the group's commit and stamp of ``tp`` (None: none) against the topic's id now."""
        ...

    def stamps(self, offsets: Mapping[TP, int], topic_ids: Mapping[str, uuid.UUID]) -> Mapping[TP, Stamp]:
        """The partitions of ``offsets`` that may be committed now, each with its stamp."""
        ...

    def committed(self, offsets: Mapping[TP, int]) -> None:
        """The group's commit of ``offsets`` succeeded."""
        ...


# aiokafka's protocol classes are untyped (Any) to mypy.
class _MetadataResponse_v10(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 10
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id_high", Int64),  # a UUID is 16 bytes on the wire: two signed 64-bit halves
                ("topic_id_low", Int64),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _MetadataRequest_v10(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 10  # the first Metadata version that answers topic ids (KIP-516)
    RESPONSE_TYPE = _MetadataResponse_v10
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id_high", Int64),
                ("topic_id_low", Int64),
                ("name", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicIdsRequest(Request[_MetadataRequest_v10]):  # type: ignore[misc]
    API_KEY = 3

    def __init__(self, topics: Iterable[str]) -> None:
        self.topics = sorted(topics)

    def build(self, request_struct_class: type[_MetadataRequest_v10]) -> _MetadataRequest_v10:
        return request_struct_class([(0, 0, topic, {}) for topic in self.topics], False, False, False, {})


def _uuid(high: int, low: int) -> uuid.UUID:
    mask = (1 << 64) - 1
    return uuid.UUID(int=((high & mask) << 64) | (low & mask))


async def _topic_ids(client: Any, topics: Iterable[str]) -> dict[str, uuid.UUID]:
    """The topic id of each of ``topics`` the broker knows (:data:`NO_TOPIC_ID` for all of them on a
    broker that answers no Metadata v10); a topic it does not know (yet) is left out."""
    wanted = sorted(set(topics))
    if not wanted:
        return {}
    node = client.get_random_node()
    if node is None:  # no broker known (yet): as if none answered
        raise kafka_errors.NodeNotReadyError("no broker to ask for topic ids")
    try:
        response = await client.send(node, _TopicIdsRequest(wanted))
    except (kafka_errors.IncompatibleBrokerVersion, NotImplementedError):
        return dict.fromkeys(wanted, NO_TOPIC_ID)
    return {
        name: _uuid(high, low)
        for error_code, name, high, low, *_ in response.topics
        if error_code == 0 and name in wanted
    }


async def _coordinator(client: Any, group: str) -> int:
    return cast(int, await client.coordinator_lookup(CoordinationType.GROUP, group))


async def _group_commits(client: Any, group: str, tps: Iterable[TP]) -> dict[TP, GroupCommit]:
    """``group``'s commits of ``tps`` (offset and metadata); partitions it never committed left out."""
    by_topic: dict[str, list[int]] = defaultdict(list)
    for tp in tps:
        by_topic[tp.topic].append(tp.partition)
    if not by_topic:
        return {}
    request = OffsetFetchRequest(group, sorted(by_topic.items()))
    response = await client.send(await _coordinator(client, group), request)
    top_error = getattr(response, "error_code", 0)
    if top_error:
        raise kafka_errors.for_code(top_error)()
    found: dict[TP, GroupCommit] = {}
    for topic, partitions in response.topics:
        for partition, offset, metadata, error_code in partitions:
            if error_code == kafka_errors.UnknownTopicOrPartitionError.errno:
                continue
            if error_code:
                raise kafka_errors.for_code(error_code)()
            if offset >= 0:  # -1: nothing committed
                found[TP(topic, partition)] = GroupCommit(offset, metadata or "")
    return found


async def _commit_group(client: Any, group: str, offsets: Mapping[TP, GroupCommit]) -> None:
    """Commit ``offsets`` in ``group`` as a member of none (a group nobody joins)."""
    by_topic: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for tp, commit in offsets.items():
        by_topic[tp.topic].append((tp.partition, commit.offset, commit.metadata))
    request = OffsetCommitRequest(
        group,
        OffsetCommitRequest.DEFAULT_GENERATION_ID,
        "",
        OffsetCommitRequest.DEFAULT_RETENTION_TIME,
        sorted(by_topic.items()),
    )
    response = await client.send(await _coordinator(client, group), request)
    for _topic, partitions in response.topics:
        for _partition, error_code in partitions:
            if error_code:
                raise kafka_errors.for_code(error_code)()
