"""The buffer edge: where samples are stored (a bounded Redis Stream), and its in-memory twin.

A write is one round trip per micro-batch, bounded by a short timeout. Redis being down or
slow costs the caller at most that timeout: the samples are dropped and counted, and a
circuit breaker stops trying for a cool-down after repeated failures. Classification never
waits on Redis for longer, and never fails because of it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from worker.config import Settings
from worker.connections import RedisConnection, async_redis_client
from worker.schemas import BufferSample
from worker.stream.sampling import BufferCounters, DropReason, text_digest
from worker.topics import BUFFER_FIELD, buffer_key, dedup_key

log = structlog.get_logger(__name__)

# KEYS: the stream, then one dedup key per sample. ARGV: maxlen, ttl, field, then one payload per sample.
# A sample is added only if its dedup key was absent (SET NX), so workers never store a text twice
# within the window. Returns {kept, stream length}.
_ADD_UNSEEN = """
local kept = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[3], ARGV[i + 2])
    kept = kept + 1
  end
end
return {kept, redis.call('XLEN', KEYS[1])}
"""


class BufferSink(Protocol):
    """Where selected samples go. ``write`` never raises for an unavailable store: it counts."""

    counters: BufferCounters

    async def write(self, samples: Sequence[BufferSample]) -> int:
        """Store ``samples``; returns how many were stored."""
        ...

    async def close(self) -> None: ...


class CircuitBreaker:
    """Closed until ``failures`` consecutive failures; then open (refusing) for ``cooldown_s``.

    After the cool-down one call is let through: success closes the breaker, failure re-opens it.
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.open_until = -math.inf

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold and self.clock() < self.open_until

    def allow(self) -> bool:
        return not self.is_open

    def success(self) -> None:
        self.failures = 0
        self.open_until = -math.inf

    def failure(self) -> bool:
        """Record a failure; True when this one opens the breaker."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.cooldown_s
            return True
        return False


def connect_redis(url: str, *, timeout_s: float, password: str | None = None) -> Redis:
    """A client that fails fast (short timeouts, no retries: the breaker decides), for ``url``."""
    secret = None if password is None else SecretStr(password)
    return async_redis_client(RedisConnection(url, password=secret), timeout_s=timeout_s)


class RedisBufferSink:
    """Samples into a Redis Stream capped at about ``maxlen`` entries (``XADD MAXLEN ~``).

    Each entry has one field, ``sample``, holding the ``buffer_sample.v1`` JSON. With
    ``dedup_window_s`` > 0, a Lua script also suppresses texts any worker stored within the
    window (keys ``<prefix>:dedup:<digest>`` with a TTL); otherwise the batch is a pipeline.
    Either way, one round trip per batch.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        maxlen: int,
        timeout_s: float,
        breaker: CircuitBreaker,
        dedup_window_s: float = 0.0,
        counters: BufferCounters | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.stream = buffer_key(prefix)
        self.maxlen = maxlen
        self.timeout_s = timeout_s
        self.breaker = breaker
        self.dedup_ttl_s = math.ceil(dedup_window_s) if dedup_window_s > 0 else 0
        self.counters = counters if counters is not None else BufferCounters()
        self.length: int | None = None  # the stream's length after the last successful write
        self._add_unseen = client.register_script(_ADD_UNSEEN)

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: str | RedisConnection, *, counters: BufferCounters | None = None
    ) -> RedisBufferSink:
        """The sink on ``redis`` (a connection, or a URL completed by the settings' password and TLS)."""
        connection = (
            redis if isinstance(redis, RedisConnection) else RedisConnection.from_settings(settings, redis)
        )
        return cls(
            async_redis_client(connection, timeout_s=settings.redis_timeout_s),
            prefix=settings.redis_key_prefix,
            maxlen=settings.buffer_maxlen,
            timeout_s=settings.redis_timeout_s,
            breaker=CircuitBreaker(settings.redis_breaker_failures, settings.redis_breaker_cooldown_s),
            dedup_window_s=settings.sampling.dedup_window_s if settings.sampling.dedup_in_redis else 0.0,
            counters=counters,
        )

    async def _send(self, samples: Sequence[BufferSample]) -> tuple[int, int]:
        if self.dedup_ttl_s:
            keys = [self.stream, *(dedup_key(self.prefix, text_digest(s.text)) for s in samples)]
            args: list[bytes | str | int] = [self.maxlen, self.dedup_ttl_s, BUFFER_FIELD]
            args.extend(s.to_json_bytes() for s in samples)
            kept, length = await self._add_unseen(keys=keys, args=args)
            return int(kept), int(length)
        async with self.client.pipeline(transaction=False) as pipe:
            for sample in samples:
                pipe.xadd(
                    self.stream, {BUFFER_FIELD: sample.to_json_bytes()}, maxlen=self.maxlen, approximate=True
                )
            pipe.xlen(self.stream)
            results = await pipe.execute()
        return len(samples), int(results[-1])

    async def write(self, samples: Sequence[BufferSample]) -> int:
        """Store ``samples`` within ``timeout_s``, or drop and count them; never raises for Redis."""
        if not samples:
            return 0
        if not self.breaker.allow():
            self.counters.drop(DropReason.CIRCUIT_OPEN, len(samples))
            return 0
        failures_before = self.breaker.failures
        try:
            kept, length = await asyncio.wait_for(self._send(samples), self.timeout_s)
        except (TimeoutError, RedisTimeout) as exc:
            self._failed(DropReason.REDIS_TIMEOUT, len(samples), exc)
            return 0
        except (RedisError, OSError) as exc:
            self._failed(DropReason.REDIS_ERROR, len(samples), exc)
            return 0
        self.breaker.success()
        if failures_before:
            log.info("buffer_recovered", stream=self.stream, after_failures=failures_before)
        self.counters.kept += kept
        self.counters.drop(DropReason.DUPLICATE, len(samples) - kept)
        self.length = length
        return kept

    def _failed(self, reason: DropReason, n: int, exc: BaseException) -> None:
        self.counters.drop(reason, n)
        if self.breaker.failure():  # log when the breaker opens, not on every dropped batch
            log.warning(
                "buffer_unavailable",
                stream=self.stream,
                reason=reason.value,
                error=repr(exc),
                failures=self.breaker.failures,
                retry_in_s=self.breaker.cooldown_s,
            )

    async def read_length(self) -> int | None:
        """XLEN of the stream, or None if Redis does not answer in time."""
        try:
            self.length = int(await asyncio.wait_for(self.client.xlen(self.stream), self.timeout_s))
        except (TimeoutError, RedisError, OSError):
            return None
        return self.length

    async def close(self) -> None:
        await self.client.aclose()


class MemoryBufferSink:
    """The in-memory twin for tests: a bounded deque; ``available = False`` simulates an outage."""

    def __init__(self, maxlen: int = 10_000, *, counters: BufferCounters | None = None) -> None:
        self.samples: deque[BufferSample] = deque(maxlen=maxlen)
        self.counters = counters if counters is not None else BufferCounters()
        self.available = True

    async def write(self, samples: Sequence[BufferSample]) -> int:
        if not self.available:
            self.counters.drop(DropReason.REDIS_ERROR, len(samples))
            return 0
        self.samples.extend(samples)
        self.counters.kept += len(samples)
        return len(samples)

    async def close(self) -> None:
        return None
