"""Two forwarders that copy ``utterances`` to another topic without decoding or classifying.

- ``raw``: a plain aiokafka consumer in a group: ``getmany`` (up to 256) → ``send`` each
  message's bytes → wait for the acks → commit about once a second. The broker's ceiling for
  consume + produce on this machine.
- ``faust``: a Faust app with the worker's own broker settings and agent shape
  (``take_events(256, within=0.01)``, bytes straight to the producer, wait for the acks), and
  nothing else: Faust's own ceiling, without decode, inference, outputs or sampling.

Each runs in its own process, like the worker, and stops at SIGTERM (``raw`` also after
``--count`` messages).

    python benchmarks/forwarders.py raw --bootstrap 127.0.0.1:9092 --sink forwarded --group raw
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker.config import Settings
from worker.stream.app import PRODUCER_MAX_BATCH_BYTES, new_faust_app
from worker.topics import UTTERANCES

ROOT = Path(__file__).resolve().parent.parent

BATCH = 256
WITHIN_S = 0.01
COMMIT_INTERVAL_S = 1.0


async def raw_forward(bootstrap: str, sink: str, group: str, count: int | None) -> int:
    settings = Settings()
    consumer = AIOKafkaConsumer(
        UTTERANCES,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(settings.broker_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.broker_heartbeat_interval_s * 1000),
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=int(settings.producer_linger_s * 1000),
        max_batch_size=PRODUCER_MAX_BATCH_BYTES,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await consumer.start()
    await producer.start()
    done = 0
    committed_at = time.monotonic()
    try:
        while not stop.is_set() and (count is None or done < count):
            batches = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            acks = [
                await producer.send(sink, record.value, key=record.key)
                for records in batches.values()
                for record in records
            ]
            await asyncio.gather(*acks)
            done += len(acks)
            if acks and time.monotonic() - committed_at >= COMMIT_INTERVAL_S:
                await consumer.commit()
                committed_at = time.monotonic()
        await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
    return done


def faust_forward(bootstrap: str, sink: str, group: str, run_dir: Path, web_port: int) -> int:
    import faust

    settings = Settings()
    run_dir.mkdir(parents=True, exist_ok=True)
    # The worker's own app configuration; web_host is loopback by default.
    app = new_faust_app(settings, group=group, kafka_bootstrap=bootstrap, datadir=run_dir, web_port=web_port)
    topic = app.topic(UTTERANCES, key_serializer="raw", value_serializer="raw")

    async def forward(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(BATCH, within=WITHIN_S):  # type: ignore[attr-defined]
            acks = [
                await app.producer.send(
                    sink, e.message.key, e.message.value, partition=None, timestamp=None, headers=None
                )
                for e in events
            ]
            await asyncio.gather(*acks)  # take_events acknowledges the batch when we ask for the next

    app.agent(topic, name="forward")(forward)
    worker = faust.Worker(app, quiet=True, redirect_stdouts=False, loglevel="WARNING")
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["raw", "faust"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--sink", required=True, help="output topic")
    parser.add_argument("--group", required=True, help="consumer group (faust: the app id)")
    parser.add_argument("--count", type=int, default=None, help="raw: stop after this many")
    parser.add_argument(
        "--run-dir", type=Path, default=Path(".run/forward"), help="faust: its data directory"
    )
    parser.add_argument("--web-port", type=int, default=0, help="faust: loopback port of its web server")
    args = parser.parse_args()
    if args.kind == "raw":
        forwarded = asyncio.run(raw_forward(args.bootstrap, args.sink, args.group, args.count))
        print(f"forwarded {forwarded}", file=sys.stderr)
        return 0
    return faust_forward(args.bootstrap, args.sink, args.group, args.run_dir, args.web_port)


if __name__ == "__main__":
    sys.exit(main())
