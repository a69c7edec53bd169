"""The streaming worker's "Must show" measurements, in one run, into ``benchmarks/results/worker.json``.

Sections (``--only`` picks some; the others are then kept from the existing file):

- ``throughput``: 200,000 MASSIVE/Tatoeba texts (cycled, unique ids) pre-produced to
  ``utterances`` on a fresh embedded Tansu broker, then drained, one after the other on the
  same backlog, by five consumers, each in its own process:

  - ``raw_forward``: a plain aiokafka consumer forwarding the bytes (the broker's ceiling);
  - ``faust_forward``: a Faust agent of the worker's shape forwarding the bytes (Faust's ceiling);
  - ``worker_null_model``: the real worker serving a student whose graph does no work
    (tokenising, outputs and sampling still happen): the worker's cost besides inference;
  - ``worker``: ``intent-worker run`` serving the shipped student, 1 inference thread (in the
    worker's inference child process, the default);
  - ``worker_inference_thread``: the same with ``INTENT_INFERENCE_PROCESS=false`` (the student
    on a thread of the worker process, sharing its GIL).

  Rates are (n - 1) / (last - first) over the producer timestamps of the n output records,
  so start-up and group joins do not count. Repeated ``--repeats`` times on a fresh broker
  (the order rotates); medians are reported, with the student's own single-thread rate.
- ``latency``: the worker at a fixed offered rate (500/s for 60 s): p50/p99 from the
  producer's send to the label's arrival at a consumer, plus the worker's own share.
- ``scaling``, ``bad_input``, ``redis_outage``: see ``worker_scenarios.py``.
- ``fresh_start``: ``benchmarks/fresh_start.sh`` (a clean clone, a fresh venv, ``make run``,
  ``send``, ``tail``); its transcript goes to ``benchmarks/results/fresh_start.txt``.

    .venv/bin/python benchmarks/bench_worker.py                 # everything (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_worker.py --only latency  # one section, merged into the file
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import worker_scenarios
from aiokafka import AIOKafkaConsumer, TopicPartition
from common import machine
from streams import (
    TopicWatch,
    broker,
    cycled,
    median,
    null_student,
    percentile,
    produce,
    produce_at_rate,
    read_topic,
    shared_texts,
    span_rate,
    topic_ends,
    utterance_bytes,
)

from worker.config import MODELS_DIR, Settings
from worker.dev.harness import WorkerProcess, cpu_seconds
from worker.dev.services import EmbeddedService, free_port, start_redis
from worker.schemas import Intent
from worker.topics import INTENTS, UTTERANCES

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results" / "worker.json"
SECTIONS = ("throughput", "latency", "scaling", "bad_input", "redis_outage", "fresh_start")
PATHS = ("raw_forward", "faust_forward", "worker_null_model", "worker", "worker_inference_thread")
SINKS = {"raw_forward": "forwarded", "faust_forward": "forwarded.faust"}
TARGET_SHARE = 0.60


# -- Throughput ------------------------------------------------------------------------------------------


def run_path(
    path: str,
    repeat: int,
    kafka: EmbeddedService,
    redis: EmbeddedService,
    n: int,
    tmp: Path,
    args: argparse.Namespace,
    null_dir: Path,
) -> dict[str, object]:
    """Drain the ``n``-message backlog of ``utterances`` with one path; its rate and costs."""
    sink = SINKS.get(path, INTENTS)
    start = asyncio.run(topic_ends(kafka.bootstrap, sink))
    run_dir = tmp / f"{path}-{repeat}"
    group = f"{path}-{repeat}".replace("_", "-")
    broker_cpu = cpu_seconds(kafka.pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the path's process, once reaped
    began = time.monotonic()
    worker: WorkerProcess | None = None
    process: subprocess.Popen[bytes] | None = None
    if path in SINKS:
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "benchmarks" / "forwarders.py"), path.split("_")[0]]
        command += ["--bootstrap", kafka.bootstrap, "--sink", sink, "--group", group]
        command += ["--count", str(n)] if path == "raw_forward" else []
        command += ["--run-dir", str(run_dir / "faust"), "--web-port", str(free_port())]
        with (run_dir / "forward.log").open("wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        alive = lambda: process is not None and process.poll() is None  # noqa: E731
    else:
        student = null_dir if path == "worker_null_model" else args.student
        extra = dict(item.split("=", 1) for item in args.set)
        if path == "worker_inference_thread":
            extra["INTENT_INFERENCE_PROCESS"] = "false"
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=redis.url, run_dir=run_dir, group=group, student=student,
            partitions=args.partitions, extra=extra,
        ).start()  # fmt: skip
        alive = worker.alive

    async def wait() -> int:
        async with TopicWatch(kafka.bootstrap, sink) as watch:
            return await watch.wait_for(start, n, args.path_timeout_s, alive=alive)

    try:
        appended = asyncio.run(wait())
    finally:
        if worker is not None:
            code = worker.terminate()
        else:
            assert process is not None
            if process.poll() is None:
                process.terminate()
            code = process.wait(timeout=60)
    wall_s = time.monotonic() - began
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = reaped.ru_utime + reaped.ru_stime - children.ru_utime - children.ru_stime
    broker_cpu = cpu_seconds(kafka.pid) - broker_cpu
    if appended < n:
        raise RuntimeError(
            f"{path}: only {appended} of {n} outputs within {args.path_timeout_s} s (exit {code})"
        )
    records = asyncio.run(read_topic(kafka.bootstrap, sink, start))
    keys = {r.key for r in records}
    rate = span_rate(records)
    result: dict[str, object] = {
        **rate,
        "unique_keys": len(keys),
        "duplicates": len(records) - len(keys),
        "process_cpu_s_with_startup": round(process_cpu, 1),
        "broker_cpu_s": round(broker_cpu, 1),
        "wall_s_with_startup": round(wall_s, 1),
        "exit_code": code,
    }
    if len(keys) < n:
        raise RuntimeError(f"{path}: {n - len(keys)} of {n} inputs have no output: {result}")
    print(f"  {path:<18} {rate['per_s']:>9,.0f}/s  ({rate['n']} in {rate['span_s']} s)", flush=True)
    return result


def student_rate(student: Path, texts: int) -> dict[str, object]:
    script = ROOT / "benchmarks" / "student_rate.py"
    done = subprocess.run(
        [sys.executable, str(script), str(student), "--texts", str(texts)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def throughput(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    n = args.messages
    null_dir = null_student(args.student, tmp / "null-student")
    repeats: list[dict[str, object]] = []
    for repeat in range(args.repeats):
        paths_run = [path for path in PATHS if path in args.paths.split(",")]
        order = tuple(paths_run[repeat % len(paths_run) :] + paths_run[: repeat % len(paths_run)])
        print(f"throughput repeat {repeat + 1}/{args.repeats}: {n:,} messages, order {order}", flush=True)
        load = [round(x, 2) for x in os.getloadavg()]
        with (
            broker(tmp / f"tansu-{repeat}", args.partitions, extra_topics=tuple(SINKS.values())) as kafka,
            start_redis(tmp / f"valkey-{repeat}") as redis,
        ):
            items = cycled(rows, n, f"t{repeat}")
            produced, produce_rate = asyncio.run(
                produce(kafka.bootstrap, UTTERANCES, ((i.id.encode(), utterance_bytes(i)) for i in items))
            )
            del items
            paths = {
                path: run_path(path, repeat, kafka, redis, produced, tmp, args, null_dir) for path in order
            }
        repeats.append(
            {
                "order": list(order),
                "load_average_at_start": load,
                "producer_per_s": round(produce_rate),
                **paths,
            }
        )

    def med(path: str) -> float:
        return median([float(r[path]["per_s"]) for r in repeats])  # type: ignore[index]

    rates = {path: round(med(path)) for path in paths_run}
    if set(paths_run) != set(PATHS):  # an experiment on some paths: no ratios, no student rates
        return {"messages": n, "repeats": args.repeats, "utterances_per_s_median": rates, "runs": repeats}
    share = rates["worker"] / rates["raw_forward"]
    students = {
        "student": student_rate(args.student, args.inference_texts),
        "null_model": student_rate(null_dir, args.inference_texts),
    }
    return {
        "messages": n,
        "partitions": args.partitions,
        "repeats": args.repeats,
        "utterances_per_s_median": rates,
        "worker_vs_raw_forward": round(share, 3),
        "worker_vs_faust_forward": round(rates["worker"] / rates["faust_forward"], 3),
        "worker_vs_worker_inference_thread": round(rates["worker"] / rates["worker_inference_thread"], 3),
        "faust_forward_vs_raw_forward": round(rates["faust_forward"] / rates["raw_forward"], 3),
        "target_worker_vs_raw_forward": TARGET_SHARE,
        "target_met": share >= TARGET_SHARE,
        "inference_only_1_thread": students,
        "runs": repeats,
        "how": "rate = (n-1)/(last-first) over the producer timestamps of the n outputs of each path",
    }


# -- Latency at a fixed rate -----------------------------------------------------------------------------


async def offered_latency(
    bootstrap: str, rows: list[tuple[str, str]], rate: float, seconds: float, warmup_s: float
) -> dict[str, object]:
    warm = cycled(rows, int(rate * warmup_s), "warm")
    items = cycled(rows[len(warm) % len(rows) :] + rows, int(rate * seconds), "lat")
    sent_at: dict[str, float] = {}
    arrived: dict[str, tuple[float, float]] = {}  # id -> (arrival wall time, worker's own latency_ms)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20
    )
    await consumer.start()
    partitions = [TopicPartition(INTENTS, p) for p in sorted(consumer.partitions_for_topic(INTENTS) or ())]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    stop = asyncio.Event()

    async def receive() -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for batch in batches.values():
                for record in batch:
                    intent = Intent.from_json_bytes(record.value)
                    arrived.setdefault(intent.id, (now, intent.latency_ms))

    receiver = asyncio.create_task(receive())
    try:
        await produce_at_rate(bootstrap, warm, rate)
        achieved = await produce_at_rate(bootstrap, items, rate, sent_at=sent_at)
        deadline = time.monotonic() + 30
        while not set(sent_at) <= set(arrived) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await receiver
        await consumer.stop()
    e2e = [(arrived[i][0] - sent) * 1000 for i, sent in sent_at.items() if i in arrived]
    own = [arrived[i][1] for i in sent_at if i in arrived]

    def summary(values: list[float]) -> dict[str, float]:
        return {
            q: round(percentile(values, p), 1) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        } | {"max": round(max(values), 1)}

    return {
        "offered_per_s": rate,
        "achieved_per_s": round(achieved, 1),
        "seconds": seconds,
        "warmup_s_excluded": warmup_s,
        "sent": len(sent_at),
        "labelled": len(e2e),
        "lost": len(sent_at) - len(e2e),
        "end_to_end_ms": summary(e2e),
        "in_worker_ms": summary(own),
        "how": "end-to-end: wall clock before the producer's send → the label's arrival at a consumer "
        "polling intents (fetch_max_wait 20 ms); in-worker: intent.latency_ms (consumed → output acked)",
    }


def latency(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    print(f"latency: {args.rate}/s for {args.latency_s} s", flush=True)
    with (
        broker(tmp / "tansu-latency", args.partitions) as kafka,
        start_redis(tmp / "valkey-latency") as redis,
    ):
        extra = dict(item.split("=", 1) for item in args.set)
        with WorkerProcess(
            kafka=kafka.bootstrap, redis=redis.url, run_dir=tmp / "latency", group="latency",
            student=args.student, partitions=args.partitions, extra=extra,
        ) as worker:  # fmt: skip
            worker.wait_healthy()
            result = asyncio.run(offered_latency(kafka.bootstrap, rows, args.rate, args.latency_s, 2.0))
            result["worker_cpu_s"] = round(worker.cpu_seconds(), 1)
    print(f"  end-to-end {result['end_to_end_ms']}", flush=True)
    return result


# -- Fresh start --------------------------------------------------------------------------------------------


def fresh_start(args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> dict[str, object]:
    print("fresh start: clone, fresh venv, make run, send, tail", flush=True)
    transcript = ROOT / "benchmarks" / "results" / "fresh_start.txt"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "fresh_start.sh"), str(transcript)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()
    return {
        "exit_code": done.returncode,
        "summary": summary[-1] if summary else "",
        "transcript": str(transcript.relative_to(ROOT)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--messages", type=int, default=200_000, help="backlog of the throughput runs")
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats (medians reported)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--path-timeout-s", type=float, default=900.0, help="longest one path may take")
    parser.add_argument("--inference-texts", type=int, default=20_000)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"throughput: a subset of {PATHS}")
    parser.add_argument("--rate", type=float, default=500.0, help="offered rate of the latency run")
    parser.add_argument("--latency-s", type=float, default=60.0)
    worker_scenarios.add_arguments(parser)
    parser.add_argument("--student", type=Path, default=MODELS_DIR / "student")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--set", action="append", default=[], metavar="INTENT_X=V", help="extra setting for every worker"
    )
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    runners: dict[str, Callable[[argparse.Namespace, list[tuple[str, str]], Path], dict[str, object]]] = {
        "throughput": throughput,
        "latency": latency,
        "scaling": worker_scenarios.scaling,
        "bad_input": worker_scenarios.bad_input,
        "redis_outage": worker_scenarios.redis_outage,
        "fresh_start": fresh_start,
    }
    result: dict[str, object] = {}
    if args.out.is_file() and set(sections) != set(SECTIONS):
        result = json.loads(args.out.read_text())
    rows = shared_texts(Settings().shared_data_dir)
    result.update(
        {
            "student": str(
                args.student.resolve().relative_to(ROOT)
                if args.student.resolve().is_relative_to(ROOT)
                else args.student
            ),
            "student_version": json.loads((args.student / "card.json").read_text()).get("version"),
            "inference_threads": 1,
            "settings": args.set,
            "machine": machine(),
            "command": "python benchmarks/bench_worker.py  # every section; --only SECTION,... reruns some",
        }
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        for section in sections:
            began = time.monotonic()
            load = [round(x, 2) for x in os.getloadavg()]  # other jobs share the cores: say how busy
            section_result = runners[section](args, rows, Path(tmp))
            section_result["seconds"] = round(time.monotonic() - began, 1)
            section_result["load_average_at_start"] = load
            section_result["command"] = "python " + " ".join(sys.argv)
            result[section] = section_result
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")  # after each section
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
