"""Kafka topic names and the Redis key layout: the one place they are spelled out."""

from __future__ import annotations

import hashlib

#: Input: ``utterance.v1`` records, produced by clients, keyed by utterance id (or not at all).
UTTERANCES = "utterances"
#: Output: ``intent.v1`` records, keyed by utterance id.
INTENTS = "intents"
#: Inputs that could not be processed, as ``dead_letter.v1`` records.
DEAD_LETTERS = "utterances.dlq"

#: Default namespace of every Redis key the worker writes (``INTENT_REDIS_KEY_PREFIX``).
DEFAULT_REDIS_PREFIX = "intent-worker"
#: Suffix of the Redis Stream holding ``buffer_sample.v1`` records, one field ``sample`` per entry.
BUFFER_SUFFIX = "buffer"
#: Suffix of the per-text keys (``SET NX EX``) that suppress duplicate samples across workers.
DEDUP_SUFFIX = "dedup"
#: The one field of each buffer stream entry; its value is the ``buffer_sample.v1`` JSON.
BUFFER_FIELD = "sample"


def buffer_key(prefix: str) -> str:
    """The Redis Stream of sampled utterances."""
    return f"{prefix}:{BUFFER_SUFFIX}"


def dedup_key(prefix: str, digest: str) -> str:
    """The Redis key marking a normalised text (by ``digest``) as recently sampled."""
    return f"{prefix}:{DEDUP_SUFFIX}:{digest}"


#: Suffix of the Redis Stream of buffer entries the labelling job could not read (original bytes kept).
BUFFER_DEAD_SUFFIX = "buffer:dead"
#: Default consumer group of the labelling jobs on the buffer stream.
LABELLER_GROUP = "labellers"


def buffer_dead_key(prefix: str) -> str:
    """The Redis Stream of unreadable buffer entries: ``entry``, ``reason``, ``error``, ``original``."""
    return f"{prefix}:{BUFFER_DEAD_SUFFIX}"


def dataset_lock_key(prefix: str, location: str) -> str:
    """The Redis lock that serialises manifest updates of one dataset across hosts."""
    return f"{prefix}:dataset-lock:{hashlib.sha256(location.encode()).hexdigest()[:16]}"
