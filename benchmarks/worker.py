"""Worker throughput: one worker process (1 inference thread) against the raw forward ceiling.

Both run on the same embedded Tansu broker, in the same run, on the same backlog:

- **raw forward**: an aiokafka consumer that forwards every message's bytes to an output
  topic (``getmany`` → ``send`` per message → wait for the acks), without decoding or
  classifying: the ceiling of consuming and producing on this broker and machine.
- **worker**: ``intent-worker run`` (the real CLI in a subprocess) draining the same backlog
  from ``utterances`` to ``intents``; timed from its first label to its last.

    .venv/bin/python benchmarks/worker.py --messages 20000

Writes ``benchmarks/results/worker.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.config import MODELS_DIR, Settings  # noqa: E402
from worker.services import create_topics, ensure_services, free_port  # noqa: E402
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "worker.json"
FORWARDED = "forwarded"


def texts(shared: Path, limit: int) -> list[dict[str, str]]:
    files = [*sorted((shared / "massive").glob("*.jsonl")), shared / "tatoeba" / "tatoeba.jsonl"]
    rows = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            rows.append({"text": record["text"], "locale": record.get("locale") or ""})
    return [{"id": f"b-{i}", **row} for i, row in zip(range(limit), itertools.cycle(rows), strict=False)]


async def produce(bootstrap: str, topic: str, records: list[dict[str, str]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=256 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        acks = []
        for record in records:
            acks.append(await producer.send(topic, json.dumps(record).encode(), key=record["id"].encode()))
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return len(records) / (time.perf_counter() - started)


async def raw_forward(bootstrap: str, n: int) -> float:
    """Forward ``n`` messages of ``utterances`` to another topic; messages per second."""
    consumer = AIOKafkaConsumer(
        UTTERANCES, bootstrap_servers=bootstrap, group_id="raw-forward", auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    done = 0
    started: float | None = None
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=256)
            acks = []
            for records in batches.values():
                for record in records:
                    acks.append(await producer.send(FORWARDED, record.value, key=record.key))
            if acks and started is None:
                started = time.perf_counter()
            await asyncio.gather(*acks)
            await consumer.commit()
            done += len(acks)
    finally:
        await consumer.stop()
        await producer.stop()
    assert started is not None
    return n / (time.perf_counter() - started)


async def drain_intents(bootstrap: str, n: int, timeout_s: float) -> float:
    """Read ``intents`` until ``n`` labels; labels per second between the first and the last.

    Times are the broker's append times of the labels, so the worker's start-up does not count.
    """
    consumer = AIOKafkaConsumer(
        INTENTS, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    stamps: list[float] = []
    began = time.perf_counter()
    try:
        while len(stamps) < n and time.perf_counter() - began < timeout_s:
            batches = await consumer.getmany(timeout_ms=500)
            stamps.extend(record.timestamp / 1000 for records in batches.values() for record in records)
    finally:
        await consumer.stop()
    if len(stamps) < n:
        raise RuntimeError(f"only {len(stamps)} of {n} labels within {timeout_s} s")
    return (len(stamps) - 1) / max(max(stamps) - min(stamps), 1e-9)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--student", type=Path, default=MODELS_DIR / "student")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--set", action="append", default=[], metavar="INTENT_X=V", help="extra setting for the worker"
    )
    args = parser.parse_args()

    settings = Settings()
    load = os.getloadavg()  # other jobs on the machine share its cores: record how busy it was
    with (
        tempfile.TemporaryDirectory() as tmp,
        ensure_services(Settings(kafka_bootstrap=None, redis_url=None, run_dir=Path(tmp))) as services,
    ):
        bootstrap = services.kafka_bootstrap
        topics = dict.fromkeys((UTTERANCES, INTENTS, DEAD_LETTERS, FORWARDED), args.partitions)
        asyncio.run(create_topics(bootstrap, topics))
        records = texts(settings.shared_data_dir, args.messages)
        produce_rate = asyncio.run(produce(bootstrap, UTTERANCES, records))
        forward_rate = asyncio.run(raw_forward(bootstrap, len(records)))

        env = {k: v for k, v in os.environ.items() if not k.startswith("INTENT_")}
        env.update(
            INTENT_KAFKA_BOOTSTRAP=bootstrap,
            INTENT_REDIS_URL=services.redis_url,
            INTENT_STUDENT_DIR=str(args.student),
            INTENT_RUN_DIR=tmp,
            INTENT_WEB_PORT=str(free_port()),
            INTENT_INFERENCE_THREADS="1",
        )
        env.update(item.split("=", 1) for item in args.set)
        log = Path(tmp) / "worker.log"
        with log.open("wb") as handle:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "--log-json", "run", "--partitions", str(args.partitions)],
                env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            worker_rate = asyncio.run(drain_intents(bootstrap, len(records), timeout_s=600))
        finally:
            worker.terminate()
            worker.wait(timeout=60)

    result = {
        "messages": len(records),
        "partitions": args.partitions,
        "student": str(
            args.student.resolve().relative_to(ROOT)
            if args.student.resolve().is_relative_to(ROOT)
            else args.student
        ),
        "student_version": json.loads((args.student / "card.json").read_text()).get("version"),
        "inference_threads": 1,
        "settings": args.set,
        "producer_msgs_per_s": round(produce_rate),
        "raw_forward_msgs_per_s": round(forward_rate),
        "worker_utterances_per_s": round(worker_rate),
        "worker_vs_raw_forward": round(worker_rate / forward_rate, 3),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load],
        },
        "command": "python " + " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
