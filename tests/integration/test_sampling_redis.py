"""The sampler's Redis buffer against a real valkey-server: bounded stream, dedup, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from worker.config import SamplingSettings, Settings
from worker.dev.services import EmbeddedService, start_redis
from worker.models.student import predictions
from worker.schemas import BufferSample, SampleReason, Utterance
from worker.stream.buffer import CircuitBreaker, RedisBufferSink, connect_redis
from worker.stream.sampling import BufferCounters, Sampler, SamplingPolicy
from worker.topics import BUFFER_FIELD, buffer_key

pytestmark = pytest.mark.integration


def sample(i: int, text: str | None = None) -> BufferSample:
    return BufferSample(
        id=f"u{i}",
        text=text if text is not None else f"utterance number {i}",
        locale="en",
        label="alarm_set",
        logits=(1.5, -0.5),
        scores={"alarm_set": 0.88, "weather_query": 0.12},
        margin=0.76,
        model_version="m1",
        stratum="en|alarm_set",
        reason=SampleReason.STRATUM,
        sampling_probability=0.5,
        weight=2.0,
        timestamp=1.7e9 + i,
    )


def sink_for(url: str, prefix: str, **overrides: object) -> RedisBufferSink:
    options: dict[str, object] = {
        "prefix": prefix,
        "maxlen": 1_000,
        "timeout_s": 0.1,
        "breaker": CircuitBreaker(failures=2, cooldown_s=0.3),
        "dedup_window_s": 0.0,
    }
    options.update(overrides)
    return RedisBufferSink(connect_redis(url, timeout_s=0.1), **options)  # type: ignore[arg-type]


async def stream_entries(url: str, prefix: str) -> list[BufferSample]:
    client = Redis.from_url(url)
    try:
        entries = await client.xrange(buffer_key(prefix))
    finally:
        await client.aclose()
    return [BufferSample.from_json_bytes(fields[BUFFER_FIELD.encode()]) for _, fields in entries]


def test_samples_land_in_the_stream_and_it_stays_bounded(
    redis_service: EmbeddedService, unique_name: str
) -> None:
    async def scenario() -> tuple[list[int], list[BufferSample], int | None]:
        sink = sink_for(redis_service.url, unique_name, maxlen=1_000, timeout_s=1.0)
        try:
            written = [await sink.write([sample(b * 250 + i) for i in range(250)]) for b in range(20)]
            return written, await stream_entries(redis_service.url, unique_name), sink.length
        finally:
            await sink.close()

    written, entries, length = asyncio.run(scenario())
    assert written == [250] * 20
    # MAXLEN ~ trims whole stream nodes (100 entries each by default), so a little over 1,000 stays.
    assert 1_000 <= len(entries) <= 1_100 and length == len(entries)
    assert entries[-1] == sample(4_999)
    assert [int(s.id[1:]) for s in entries] == list(range(5_000 - len(entries), 5_000))


def test_workers_do_not_store_the_same_text_twice_within_the_window(
    redis_service: EmbeddedService, unique_name: str
) -> None:
    async def scenario() -> tuple[int, int, BufferCounters, list[BufferSample], int]:
        counters = BufferCounters()
        first = sink_for(redis_service.url, unique_name, dedup_window_s=60.0, timeout_s=1.0)
        second = sink_for(
            redis_service.url, unique_name, dedup_window_s=60.0, timeout_s=1.0, counters=counters
        )
        try:
            kept_first = await first.write([sample(1, "Book a table"), sample(2, "set an alarm")])
            kept_second = await second.write([sample(3, "book  a TABLE"), sample(4, "play jazz")])
            client = Redis.from_url(redis_service.url)
            keys = [key async for key in client.scan_iter(f"{unique_name}:dedup:*")]
            ttls = [await client.ttl(key) for key in keys]
            await client.aclose()
            assert len(keys) == 3 and all(0 < ttl <= 60 for ttl in ttls)
            return (
                kept_first,
                kept_second,
                counters,
                await stream_entries(redis_service.url, unique_name),
                len(keys),
            )
        finally:
            await first.close()
            await second.close()

    kept_first, kept_second, counters, entries, _ = asyncio.run(scenario())
    assert (kept_first, kept_second) == (2, 1)
    assert counters.kept == 1 and counters.dropped_by_reason == {"duplicate": 1}
    assert [s.id for s in entries] == ["u1", "u2", "u4"]


async def timed_write(sink: RedisBufferSink, samples: list[BufferSample]) -> tuple[int, float]:
    started = time.perf_counter()
    kept = await sink.write(samples)
    return kept, time.perf_counter() - started


def test_a_stopped_redis_costs_little_and_sampling_resumes_when_it_returns(
    tmp_path: Path, unique_name: str
) -> None:
    redis = start_redis(tmp_path / "first")
    port = redis.port
    settings = Settings(
        redis_key_prefix=unique_name,
        redis_timeout_s=0.1,
        redis_breaker_failures=2,
        redis_breaker_cooldown_s=0.3,
        sampling=SamplingSettings(dedup_in_redis=True, dedup_window_s=60.0),
    )
    counters = BufferCounters()
    sampler = Sampler(SamplingPolicy(rate=1.0, budget_per_s=1e6, dedup_window_s=0.0), counters=counters)

    scored = predictions(["alarm_set", "weather_query"], np.array([[2.0, 0.0]] * 10, dtype=np.float32))

    def batch(start: int) -> list[BufferSample]:
        utterances = [Utterance(id=f"u{start + i}", text=f"wake me at {start + i}") for i in range(10)]
        return sampler.select(utterances, scored, model_version="m1", now=time.time())

    async def scenario() -> None:
        nonlocal redis
        sink = RedisBufferSink.from_settings(settings, redis.url, counters=counters)
        try:
            assert (await timed_write(sink, batch(0)))[0] == 10
            redis.stop()
            outcomes = [await timed_write(sink, batch(100 * (i + 1))) for i in range(6)]
            assert all(kept == 0 and elapsed < 0.5 for kept, elapsed in outcomes), outcomes
            assert counters.dropped_by_reason["redis_error"] == 20  # two failures open the breaker
            assert counters.dropped_by_reason["circuit_open"] == 40
            redis = start_redis(tmp_path / "second", port=port)
            await asyncio.sleep(0.35)  # the cool-down
            assert (await timed_write(sink, batch(1_000)))[0] == 10
            assert (await timed_write(sink, batch(2_000)))[0] == 10
            assert sink.length == 20  # a fresh, memory-only Redis: only what came after the restart
        finally:
            await sink.close()

    try:
        asyncio.run(scenario())
    finally:
        redis.stop()
    assert counters.kept == 30 and counters.dropped == 60
    assert counters.seen == counters.selected == 90


def test_a_hung_redis_costs_at_most_the_timeout(tmp_path: Path, unique_name: str) -> None:
    async def scenario(redis: EmbeddedService) -> None:
        sink = sink_for(redis.url, unique_name, timeout_s=0.1)
        try:
            assert await sink.write([sample(0)]) == 1
            os.kill(redis.pid, signal.SIGSTOP)  # accepts TCP connections (kernel backlog) but never answers
            try:
                outcomes = [await timed_write(sink, [sample(i)]) for i in range(1, 5)]
            finally:
                os.kill(redis.pid, signal.SIGCONT)
            assert all(kept == 0 and elapsed < 0.5 for kept, elapsed in outcomes), outcomes
            assert sink.counters.dropped_by_reason == {"redis_timeout": 2, "circuit_open": 2}
            await asyncio.sleep(0.35)
            assert await sink.write([sample(5)]) == 1
        finally:
            await sink.close()

    with start_redis(tmp_path) as redis:
        asyncio.run(scenario(redis))
