"""Failure scenarios of the worker benchmark (run by ``benchmarks/bench_worker.py``).

- ``scaling``: two workers in one group split the partitions; one is SIGKILLed mid-run while
  utterances arrive at a fixed rate; every produced id must be labelled (duplicates counted).
- ``bad_input``: 1,000 mixed inputs; each ends labelled or in ``utterances.dlq`` with its
  reason, none is lost, and the worker keeps its pid and its health.
- ``redis_outage``: Redis is SIGKILLed during a steady run at a fixed offered rate (below the
  worker's capacity, so a stall would show as lag) and restarted on the same port: labelling
  throughput, latency, CPU and lag per phase, samples dropped, and sampling resuming.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

from streams import (
    TopicWatch,
    broker,
    cycled,
    produce,
    produce_at_rate,
    read_topic,
    topic_ends,
)

from worker.dev.harness import WorkerProcess, metric_sum
from worker.dev.services import start_redis
from worker.schemas import DeadLetter
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scaling-messages", type=int, default=60_000)
    parser.add_argument("--scaling-rate", type=float, default=2_000.0)
    parser.add_argument("--kill-after-s", type=float, default=12.0, help="SIGKILL the second worker then")
    parser.add_argument("--bad-inputs", type=int, default=1_000)
    parser.add_argument(
        "--outage-rate",
        type=float,
        default=1_500.0,
        help="offered rate (about half of one worker's capacity)",
    )
    parser.add_argument("--outage-phase-s", type=float, default=30.0, help="length of each phase")


def _worker(args: argparse.Namespace, kafka: str, redis: str, run_dir: Path, group: str) -> WorkerProcess:
    """The real worker on ``kafka``/``redis`` with the benchmark's student and settings."""
    extra = dict(item.split("=", 1) for item in args.set)
    return WorkerProcess(
        kafka=kafka, redis=redis, run_dir=run_dir, group=group, student=args.student,
        partitions=args.partitions, extra=extra,
    )  # fmt: skip


def _partitions(worker: WorkerProcess) -> list[str]:
    status, body = worker.health()
    return sorted(str(p) for p in body.get("partitions", [])) if status == 200 else []  # type: ignore[attr-defined]


def _assignments(worker: WorkerProcess, began: float) -> list[dict[str, object]]:
    """The ``partitions_assigned`` log events, with seconds since ``began`` (wall clock)."""
    out = []
    for event in worker.log_events():
        if event.get("event") == "partitions_assigned":
            stamp = str(event.get("timestamp", ""))
            at = _epoch(stamp)
            out.append(
                {"at_s": None if at is None else round(at - began, 2), "partitions": event["partitions"]}
            )
    return out


def _epoch(iso: str) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- Scaling -------------------------------------------------------------------------------------------------


def scaling(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    n, rate = args.scaling_messages, args.scaling_rate
    print(f"scaling: 2 workers, {n:,} at {rate:,.0f}/s, SIGKILL one after {args.kill_after_s} s", flush=True)
    with (
        broker(tmp / "tansu-scaling", args.partitions) as kafka,
        start_redis(tmp / "valkey-scaling") as redis,
    ):

        def worker(name: str) -> WorkerProcess:
            return _worker(args, kafka.bootstrap, redis.url, tmp / f"scaling-{name}", "pair")

        began = time.time()
        with worker("a") as a, worker("b") as b:
            a.wait_healthy()
            b.wait_healthy()
            everything = [f"{UTTERANCES}:{p}" for p in range(args.partitions)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                before = {"a": _partitions(a), "b": _partitions(b)}
                if before["a"] and before["b"] and sorted(before["a"] + before["b"]) == everything:
                    break
                time.sleep(0.3)
            else:
                raise RuntimeError(f"the two workers did not split the partitions: {before}")
            items = cycled(rows, n, "s")
            start = asyncio.run(topic_ends(kafka.bootstrap, INTENTS))
            killed: dict[str, float] = {}

            async def run() -> float:
                async def kill_then_watch() -> None:
                    await asyncio.sleep(args.kill_after_s)
                    killed["at"] = time.time()
                    killed["monotonic"] = time.monotonic()
                    await asyncio.to_thread(b.kill)  # SIGKILL: nothing committed on the way out
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:  # while utterances keep arriving
                        if await asyncio.to_thread(_partitions, a) == everything:
                            killed["taken_over"] = time.monotonic()
                            return
                        await asyncio.sleep(0.2)

                watcher = asyncio.create_task(kill_then_watch())
                achieved = await produce_at_rate(kafka.bootstrap, items, rate, linger_ms=5)
                await watcher
                return achieved

            achieved = asyncio.run(run())
            failover_s = (
                round(killed["taken_over"] - killed["monotonic"], 2) if "taken_over" in killed else None
            )

            async def drain() -> int:
                async with TopicWatch(kafka.bootstrap, INTENTS) as watch:
                    return await watch.wait_for(start, n, 300, alive=a.alive)

            asyncio.run(drain())
            time.sleep(2.0)  # let any redone batch land: duplicates are counted, not hidden
            records = asyncio.run(read_topic(kafka.bootstrap, INTENTS, start))
            letters = asyncio.run(read_topic(kafka.bootstrap, DEAD_LETTERS))
            after = _partitions(a)
            a_alive = a.alive()
            a_metrics = a.metrics()
            events = {"a": _assignments(a, began), "b": _assignments(b, began)}
            b_exit = b.process.returncode if b.process is not None else None
    ids = {item.id for item in items}
    labelled = Counter(r.key.decode() for r in records if r.key)
    unique = set(labelled) & ids
    result = {
        "workers": 2,
        "partitions": args.partitions,
        "offered_per_s": rate,
        "achieved_per_s": round(achieved, 1),
        "assignment_before_kill": before,
        "killed": "b",
        "killed_after_s": args.kill_after_s,
        "killed_exit_code": b_exit,
        "assignment_after_kill": {"a": after},
        "failover_s": failover_s,
        "failover_s_from_log": next(
            (
                round(float(e["at_s"]) - (killed["at"] - began), 2)  # type: ignore[arg-type]
                for e in events["a"]
                if e["at_s"] is not None
                and len(e["partitions"]) == args.partitions  # type: ignore[arg-type]
                and float(e["at_s"]) > killed["at"] - began  # type: ignore[arg-type]
            ),
            None,
        ),
        "partitions_assigned_events": events,
        "produced": n,
        "unique_ids_labelled": len(unique),
        "lost": len(ids - unique),
        "duplicates": sum(labelled[i] - 1 for i in unique),
        "unexpected_ids": len(set(labelled) - ids),
        "dead_letters": len(letters),
        "survivor_alive": a_alive,
        "survivor_labels_total": metric_sum(a_metrics, "intent_worker_labels_total"),
        "how": "unique ids labelled = distinct keys on intents after the kill run; failover = SIGKILL → "
        "survivor's /health lists every partition (polled every 0.2 s), or its partitions_assigned log event",
    }
    print(f"  lost {result['lost']}, duplicates {result['duplicates']}, failover {failover_s} s", flush=True)
    return result


# -- Bad input -------------------------------------------------------------------------------------------------

EXPECTED_REASON = {
    "invalid_json": "not_json",
    "non_utf8": "not_utf8",
    "missing_text": "text_missing",
    "text_wrong_type": "text_wrong_type",
    "empty_text": "text_empty",
    "huge_text": "text_too_long",
    "null_id": "id_null",
    "control_id": "id_control_character",
}
VALID_KINDS = ("valid", "extra_fields")
HUGE_COUNT = 3  # 1 MB each


def bad_inputs(rows: list[tuple[str, str]], n: int) -> list[tuple[str, bytes, bytes]]:
    """``n`` (kind, key, value) inputs: every bad kind, plus valid ones and unknown extra fields."""
    rng = random.Random(4)
    kinds = [k for k in (*EXPECTED_REASON, *VALID_KINDS) if k != "huge_text"]
    out: list[tuple[str, bytes, bytes]] = []
    for i in range(n):
        kind = "huge_text" if i % (n // HUGE_COUNT) == n // HUGE_COUNT - 1 else kinds[i % len(kinds)]
        uid = f"bad-{i}"
        text, locale = rows[rng.randrange(len(rows))]
        good = {"id": uid, "text": text, "locale": locale}
        if kind == "valid":
            value = json.dumps(good, ensure_ascii=False).encode()
        elif kind == "extra_fields":
            value = json.dumps(
                {**good, "colour": "blue", "nested": {"a": [1, None]}, "schema_minor": 7, "device": None},
                ensure_ascii=False,
            ).encode()
        elif kind == "invalid_json":
            whole = json.dumps(good, ensure_ascii=False)
            value = rng.choice(
                [whole[:-5], whole + "}", whole.replace('"', "'"), "not json at all", "{,}", ""]
            ).encode()
        elif kind == "non_utf8":
            value = rng.choice(
                [
                    json.dumps(good, ensure_ascii=False).encode("utf-16"),
                    b'{"id": "%s", "text": "caf\xe9 \xff\xfe"}' % uid.encode(),
                    b'{"id": "%s", "text": "\xc3\x28"}' % uid.encode(),
                ]
            )
        elif kind == "missing_text":
            value = json.dumps({"id": uid, "locale": locale, "txt": text}, ensure_ascii=False).encode()
        elif kind == "text_wrong_type":
            wrong = rng.choice([[text], 42, {"value": text}, True, 3.5])
            value = json.dumps({"id": uid, "text": wrong}, ensure_ascii=False).encode()
        elif kind == "empty_text":
            value = json.dumps({"id": uid, "text": rng.choice(["", " ", "\n\t "])}).encode()
        elif kind == "huge_text":
            value = json.dumps({"id": uid, "text": "a" * 1_000_000}).encode()
        elif kind == "control_id":  # NUL or a line break in the id: it would break tail's lines
            bad_id = uid + rng.choice(["\x00nul", "\nline", "\r", "\tx"])
            value = json.dumps({"id": bad_id, "text": text}, ensure_ascii=False).encode()
        else:  # null_id
            value = json.dumps({"id": None, "text": text}, ensure_ascii=False).encode()
        out.append((kind, uid.encode(), value))
    return out


def bad_input(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    inputs = bad_inputs(rows, args.bad_inputs)
    print(f"bad input: {len(inputs)} mixed inputs", flush=True)
    with (
        broker(tmp / "tansu-bad", args.partitions) as kafka,
        start_redis(tmp / "valkey-bad") as redis,
        _worker(args, kafka.bootstrap, redis.url, tmp / "bad", "bad") as worker,
    ):
        worker.wait_healthy()
        pid = worker.pid
        produced, _ = asyncio.run(produce(kafka.bootstrap, UTTERANCES, [(k, v) for _, k, v in inputs]))
        expect_labels = sum(kind in VALID_KINDS for kind, _, _ in inputs)

        async def settle() -> None:
            async with (
                TopicWatch(kafka.bootstrap, INTENTS) as intents,
                TopicWatch(kafka.bootstrap, DEAD_LETTERS) as letters,
            ):
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    done = sum((await intents.ends()).values()) + sum((await letters.ends()).values())
                    if done >= produced:
                        break
                    await asyncio.sleep(0.5)

        asyncio.run(settle())
        time.sleep(1.0)
        intents = asyncio.run(read_topic(kafka.bootstrap, INTENTS))
        letters = asyncio.run(read_topic(kafka.bootstrap, DEAD_LETTERS))
        health, body = worker.health()
        metrics = worker.metrics()
        alive, same_pid = worker.alive(), worker.pid == pid
        events = [e.get("event") for e in worker.log_events()]
    labelled = Counter(r.key for r in intents)
    dead = {r.key: DeadLetter.from_json_bytes(r.value) for r in letters}
    per_kind: dict[str, Counter[str]] = {}
    mismatches = []
    for kind, key, value in inputs:
        counts = per_kind.setdefault(kind, Counter())
        counts["sent"] += 1
        in_labels, letter = labelled.get(key, 0), dead.get(key)
        counts["labelled"] += in_labels > 0
        counts["dead_lettered"] += letter is not None
        counts["lost"] += in_labels == 0 and letter is None
        counts["both"] += in_labels > 0 and letter is not None
        if letter is not None:
            counts["original_bytes_kept"] += value.startswith(
                letter.original()
            ) and letter.original_size == len(value)
            counts["original_truncated"] += letter.original_truncated
        expected_labelled = kind in VALID_KINDS
        if (in_labels > 0) != expected_labelled or (letter is not None) == expected_labelled:
            mismatches.append(
                {"kind": kind, "key": key.decode(), "labelled": in_labels, "dead": letter is not None}
            )
    reasons = {
        key.split('reason="', 1)[1].split('"', 1)[0]: int(v)
        for key, v in metrics.items()
        if key.startswith("intent_worker_dead_letters_total{")
    }
    example_messages = {}
    for kind, key, _ in inputs:
        if kind not in example_messages and key in dead:
            example_messages[kind] = dead[key].error_message[:160]
    result = {
        "sent": produced,
        "labelled": sum(c["labelled"] for c in per_kind.values()),
        "dead_lettered": sum(c["dead_lettered"] for c in per_kind.values()),
        "lost": sum(c["lost"] for c in per_kind.values()),
        "labelled_and_dead_lettered": sum(c["both"] for c in per_kind.values()),
        "expected_labelled": expect_labels,
        "outcome_mismatches": mismatches[:20],
        "by_kind": {kind: dict(c) for kind, c in per_kind.items()},
        "dead_letters_by_reason_metric": reasons,
        "expected_reasons": EXPECTED_REASON,
        "example_error_messages": example_messages,
        "worker_restarts": events.count("worker_starting") - 1,
        "classifier_failed_events": events.count("classifier_failed"),
        "same_pid": same_pid,
        "alive": alive,
        "health_status": health,
        "health": body.get("status"),
    }
    print(
        f"  labelled {result['labelled']}, dead-lettered {result['dead_lettered']}, lost {result['lost']}, "
        f"restarts {result['worker_restarts']}",
        flush=True,
    )
    return result


# -- Redis outage ------------------------------------------------------------------------------------------------


def redis_outage(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    rate, phase = args.outage_rate, args.outage_phase_s
    warmup = 10.0
    print(f"redis outage: {rate:,.0f}/s offered; phases of {phase} s (up, down, back up)", flush=True)
    valkey_dir = tmp / "valkey-outage"
    redis = start_redis(valkey_dir)
    port = redis.port
    scrapes: list[dict[str, object]] = []
    marks: dict[str, float] = {}
    try:
        with (
            broker(tmp / "tansu-outage", args.partitions) as kafka,
            _worker(args, kafka.bootstrap, redis.url, tmp / "outage", "outage") as worker,
        ):
            worker.wait_healthy()
            pid = worker.pid
            total_s = warmup + 3 * phase
            items = cycled(rows, int(rate * total_s), "o")

            def scrape() -> dict[str, object]:
                metrics = worker.metrics()
                status, _ = worker.health()
                return {
                    "t": time.monotonic(),
                    "labels": metric_sum(metrics, "intent_worker_labels_total"),
                    "kept": metrics.get("intent_worker_samples_kept_total", 0.0),
                    "selected": metrics.get("intent_worker_samples_selected_total", 0.0),
                    "dropped": {
                        k.split('reason="', 1)[1].rstrip('"}'): v
                        for k, v in metrics.items()
                        if k.startswith("intent_worker_samples_dropped_total{")
                    },
                    "buffer_length": metrics.get("intent_worker_buffer_length"),
                    "latency_sum": metrics.get("intent_worker_latency_seconds_sum", 0.0),
                    "latency_count": metrics.get("intent_worker_latency_seconds_count", 0.0),
                    "lag": metric_sum(metrics, "intent_worker_consumer_lag"),
                    "health": status,
                    "cpu_s": worker.cpu_seconds(),
                }

            async def timeline() -> None:
                nonlocal redis
                began = time.monotonic()
                marks["start"] = began
                stop_at = began + total_s
                down_at, up_at = began + warmup + phase, began + warmup + 2 * phase
                while time.monotonic() < stop_at:
                    now = time.monotonic()
                    if "down" not in marks and now >= down_at:
                        os.kill(redis.pid, signal.SIGKILL)  # the valkey process dies; no clean stop
                        redis.process.wait()
                        marks["down"] = time.monotonic()
                    if "up" not in marks and now >= up_at:
                        redis = await asyncio.to_thread(start_redis, valkey_dir, port=port)
                        marks["up"] = time.monotonic()
                    scrapes.append(await asyncio.to_thread(scrape))
                    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
                marks["end"] = time.monotonic()

            async def run() -> float:
                clock = asyncio.create_task(timeline())
                achieved = await produce_at_rate(kafka.bootstrap, items, rate, linger_ms=5)
                await clock
                return achieved

            achieved = asyncio.run(run())
            same_pid, alive = worker.pid == pid, worker.alive()
            events = [e.get("event") for e in worker.log_events()]
    finally:
        redis.stop()

    def at(t: float) -> dict[str, object]:
        return min(scrapes, key=lambda s: abs(float(s["t"]) - t))  # type: ignore[arg-type]

    def phase_stats(begin: float, end: float) -> dict[str, object]:
        first, last = at(begin), at(end)
        seconds = float(last["t"]) - float(first["t"])  # type: ignore[arg-type]
        dropped = {
            reason: last["dropped"].get(reason, 0) - first["dropped"].get(reason, 0)  # type: ignore[union-attr]
            for reason in last["dropped"]  # type: ignore[union-attr]
        }
        inside = [s for s in scrapes if begin <= float(s["t"]) <= end]  # type: ignore[arg-type]
        return {
            "seconds": round(seconds, 1),
            "labels_per_s": round((float(last["labels"]) - float(first["labels"])) / seconds, 1),  # type: ignore[arg-type]
            "worker_cpu_per_1k_labels_s": round(
                (float(last["cpu_s"]) - float(first["cpu_s"]))  # type: ignore[arg-type]
                / max(1.0, float(last["labels"]) - float(first["labels"]))  # type: ignore[arg-type]
                * 1000,
                3,
            ),
            "mean_in_worker_latency_ms": round(
                (float(last["latency_sum"]) - float(first["latency_sum"]))  # type: ignore[arg-type]
                / max(1.0, float(last["latency_count"]) - float(first["latency_count"]))  # type: ignore[arg-type]
                * 1000,
                1,
            ),
            "max_consumer_lag": max((float(s["lag"]) for s in inside), default=None),  # type: ignore[arg-type]
            "samples_kept": float(last["kept"]) - float(first["kept"]),  # type: ignore[arg-type]
            "samples_dropped": {k: v for k, v in dropped.items() if v},
            "health_not_ok_scrapes": sum(s["health"] != 200 for s in inside),
        }

    settle = 2.0  # the killed/restarted edges themselves are excluded from each phase
    phases = {
        "redis_up": phase_stats(marks["start"] + warmup, marks["down"]),
        "redis_down": phase_stats(marks["down"] + settle, marks["up"]),
        "redis_back": phase_stats(marks["up"] + settle, marks["end"]),
    }
    up = float(phases["redis_up"]["labels_per_s"])  # type: ignore[arg-type]
    resumed = next(
        (
            round(float(s["t"]) - marks["up"], 2)  # type: ignore[arg-type]
            for s in scrapes
            if float(s["t"]) > marks["up"] and float(s["kept"]) > float(at(marks["up"])["kept"])  # type: ignore[arg-type]
        ),
        None,
    )
    result = {
        "offered_per_s": rate,
        "achieved_per_s": round(achieved, 1),
        "phase_s": phase,
        "warmup_s_excluded": warmup,
        "phases": phases,
        "down_vs_up": round(float(phases["redis_down"]["labels_per_s"]) / up, 3),  # type: ignore[arg-type]
        "back_vs_up": round(float(phases["redis_back"]["labels_per_s"]) / up, 3),  # type: ignore[arg-type]
        "within_10_percent": all(
            abs(float(p["labels_per_s"]) / up - 1) <= 0.10
            for p in phases.values()  # type: ignore[arg-type]
        ),
        "samples_dropped_total_metric": at(marks["end"])["dropped"],
        "sampling_resumed_after_s": resumed,
        "buffer_length_at_end": at(marks["end"])["buffer_length"],
        "worker_restarts": events.count("worker_starting") - 1,
        "buffer_events": Counter(e for e in events if str(e).startswith("buffer_")),
        "same_pid": same_pid,
        "alive": alive,
        "how": "a steady run at a fixed offered rate below one worker's capacity; per phase, from /metrics "
        "scraped every second: labels/s (intent_worker_labels_total), mean in-worker latency "
        "(intent_worker_latency_seconds), worker CPU per 1,000 labels, the largest consumer lag",
    }
    print(
        f"  labels/s per phase {[p['labels_per_s'] for p in phases.values()]}, resumed {resumed} s",
        flush=True,
    )
    return result
