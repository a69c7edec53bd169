"""Faults survived: one table in ``benchmarks/results/faults.json`` (``make bench-faults``).

Real Tansu, valkey, worker and labeller processes on loopback. Each scenario offers traffic
with unique ids, injects one fault, and then counts, from a ledger that follows ``intents``
and ``utterances.dlq`` across broker restarts (``fault_tools.Ledger``):

- ``produced``: sends the broker acknowledged; ``labelled``: of those, distinct ids with an
  intent; ``duplicates``: extra intents of those ids; ``dead_lettered``; ``lost``: acknowledged
  and seen nowhere; ``offset_resets``: the workers' ``intent_worker_offset_resets_total``.

Scenarios (``--only`` picks some; the others are then kept from the existing file):

- ``broker_frozen``: Tansu SIGSTOPped for 15 s under traffic, then SIGCONT.
- ``broker_restarted``: Tansu SIGKILLed under traffic and started again on its port with a
  fresh (empty) store: the lost-topic case. The topics are created again at once, as an init
  job would; the worker must notice its offsets are past the new logs' ends, reset, and label
  what the new logs hold. Sends the old broker acknowledged and then lost with its memory are
  ``lost_with_broker``, not the worker's; sends the new broker acknowledged that its logs do not
  hold at the end (read whole) are ``dropped_by_broker``, not the worker's either.
- ``worker_killed``: two workers in one group; one SIGKILLed mid-run.
- ``redis_frozen``: valkey SIGSTOPped for 10 s under traffic.
- ``labeller_killed``: ``label`` SIGKILLed mid-run, then a second labeller finishes; counted in
  buffer entries and dataset rows.
- ``poison_pills``: a 460 KB key, and ``{"schema_version": "v" * 700000, ...}``, among valid traffic.
- ``bad_inputs``: 1,000 mixed bad inputs (``worker_scenarios.bad_inputs``).

    .venv/bin/python benchmarks/faults.py                      # all (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/faults.py --only poison_pills  # one, merged into the file
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common import RESULTS, machine
from fault_labeller import labeller_killed
from fault_tools import Ledger, Traffic, json_line, log_keys, tally
from streams import WORKER_TOPICS, cycled, shared_texts
from worker_scenarios import bad_inputs

from worker.config import MODELS_DIR, REPO_ROOT
from worker.dev.harness import WorkerProcess, metric_sum
from worker.dev.services import EmbeddedService, start_kafka, start_redis
from worker.stream.admin import create_topics

SCENARIOS = (
    "broker_frozen",
    "broker_restarted",
    "worker_killed",
    "redis_frozen",
    "labeller_killed",
    "poison_pills",
    "bad_inputs",
)
FAST_GROUPS = {  # short sessions: a worker joins in ~2 s and a dead one's partitions move in ~4 s
    "INTENT_BROKER_SESSION_TIMEOUT_S": "3.0",
    "INTENT_BROKER_HEARTBEAT_INTERVAL_S": "0.8",
    "INTENT_COMMIT_INTERVAL_S": "0.5",
    "INTENT_HEALTH_BROKER_TIMEOUT_S": "5",  # /health turns 503 within a 15 s freeze
}


class Context:
    """What every scenario needs: arguments, texts, a scratch directory."""

    def __init__(self, args: argparse.Namespace, rows: list[tuple[str, str]], tmp: Path) -> None:
        self.args = args
        self.rows = rows
        self.tmp = tmp

    def kafka(self, name: str, port: int | None = None) -> EmbeddedService:
        service = start_kafka(self.tmp / f"tansu-{name}-{time.monotonic_ns()}", port=port)
        asyncio.run(create_topics(service.bootstrap, dict.fromkeys(WORKER_TOPICS, self.args.partitions)))
        return service

    def worker(self, kafka: str, redis: str, name: str, group: str, **extra: str) -> WorkerProcess:
        return WorkerProcess(
            kafka=kafka, redis=redis, run_dir=self.tmp / f"run-{name}", group=group,
            student=self.args.student, partitions=self.args.partitions, extra={**FAST_GROUPS, **extra},
        )  # fmt: skip


def worker_facts(*workers: WorkerProcess) -> dict[str, object]:
    """Offset resets and the health of the workers at the end (metrics, log events, exit)."""
    resets = unread = 0.0
    events: list[str] = []
    alive = []
    for worker in workers:
        alive.append(worker.alive())
        if worker.alive():
            metrics = worker.metrics()
            resets += metric_sum(metrics, "intent_worker_offset_resets_total")
            unread += metric_sum(metrics, "intent_worker_offset_reset_unread_total")
        events += [str(e.get("event")) for e in worker.log_events()]
    return {
        "offset_resets": int(resets),
        "offset_reset_unread": int(unread),
        "offset_reset_events": events.count("offset_reset"),
        "workers_alive_at_end": alive,
        "classifier_failed_events": events.count("classifier_failed"),
    }


class Supervisor:
    """What systemd or Kubernetes does: a worker that exits is started again (its exit codes kept)."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.exits: list[int | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            if not self.worker.alive():
                self.exits.append(self.worker.process.returncode if self.worker.process else None)
                self.worker.start()


@contextmanager
def paused(pid: int, seconds: float) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


Fault = Callable[[EmbeddedService, EmbeddedService, Traffic, WorkerProcess], dict[str, object]]


def _steady(ctx: Context, name: str, fault: Fault) -> dict[str, object]:
    """One worker under ``--rate`` traffic for ``--seconds``; ``fault`` runs meanwhile."""
    args = ctx.args
    items = cycled(ctx.rows, int(args.rate * args.seconds), name)
    with (
        ctx.kafka(name) as kafka,
        start_redis(ctx.tmp / f"valkey-{name}") as redis,
        ctx.worker(kafka.bootstrap, redis.url, name, name) as worker,
        Ledger(kafka.bootstrap) as ledger,
    ):
        worker.wait_healthy()
        supervisor = Supervisor(worker).start()
        traffic = Traffic(kafka.bootstrap, items, args.rate).start()
        time.sleep(args.fault_after_s)
        details = fault(kafka, redis, traffic, worker)
        sent = traffic.join()
        ledger.settle(len(sent.acked), timeout_s=120)
        supervisor.stop()
        details["worker_restarts_by_supervisor"] = supervisor.exits
        lost_epochs = frozenset(int(e) for e in details.pop("lost_epochs", []))  # type: ignore[attr-defined]
        in_log = log_keys(kafka.bootstrap) if lost_epochs else None
        result = {
            **tally(sent.acked, ledger, lost_epochs=lost_epochs, in_log=in_log),
            "send_failures": sent.failed,
            "ledger_saw_restarts": ledger.restarts_seen,
            **worker_facts(worker),
            **details,
        }
        result["exit_code_on_sigterm"] = worker.terminate(60)
    return result


def broker_frozen(ctx: Context) -> dict[str, object]:
    def fault(
        kafka: EmbeddedService, redis: EmbeddedService, traffic: Traffic, worker: WorkerProcess
    ) -> dict[str, object]:
        codes = []
        os.kill(kafka.pid, signal.SIGSTOP)
        began = time.monotonic()
        try:
            while time.monotonic() - began < ctx.args.freeze_broker_s:
                codes.append(worker.health()[0])
                time.sleep(1.0)
        finally:
            os.kill(kafka.pid, signal.SIGCONT)
        return {"frozen_s": ctx.args.freeze_broker_s, "health_codes_while_frozen": sorted(set(codes))}

    return _steady(ctx, "broker_frozen", fault)


def broker_restarted(ctx: Context) -> dict[str, object]:
    def fault(
        kafka: EmbeddedService, redis: EmbeddedService, traffic: Traffic, worker: WorkerProcess
    ) -> dict[str, object]:
        port = kafka.port
        kafka.process.kill()  # SIGKILL: the memory-only store, topics and offsets go with it
        kafka.process.wait()
        traffic.sent.epoch = 1
        time.sleep(1.0)
        fresh = start_kafka(ctx.tmp / "tansu-restarted-fresh", port=port)
        asyncio.run(create_topics(fresh.bootstrap, dict.fromkeys(WORKER_TOPICS, ctx.args.partitions)))
        kafka.process = fresh.process  # the scenario's `with` stops the new one
        return {"lost_epochs": [0], "restarted_on_port": port}

    return _steady(ctx, "broker_restarted", fault)


def redis_frozen(ctx: Context) -> dict[str, object]:
    def fault(
        kafka: EmbeddedService, redis: EmbeddedService, traffic: Traffic, worker: WorkerProcess
    ) -> dict[str, object]:
        with paused(redis.pid, ctx.args.freeze_redis_s):
            pass
        return {"frozen_s": ctx.args.freeze_redis_s}

    return _steady(ctx, "redis_frozen", fault)


def worker_killed(ctx: Context) -> dict[str, object]:
    args = ctx.args
    items = cycled(ctx.rows, int(args.rate * args.seconds), "killed")
    with (
        ctx.kafka("killed") as kafka,
        start_redis(ctx.tmp / "valkey-killed") as redis,
        ctx.worker(kafka.bootstrap, redis.url, "killed-a", "pair") as a,
        ctx.worker(kafka.bootstrap, redis.url, "killed-b", "pair") as b,
        Ledger(kafka.bootstrap) as ledger,
    ):
        a.wait_healthy()
        b.wait_healthy()
        traffic = Traffic(kafka.bootstrap, items, args.rate).start()
        time.sleep(args.fault_after_s)
        b.kill()
        sent = traffic.join()
        ledger.settle(len(sent.acked), timeout_s=120)
        result = {**tally(sent.acked, ledger), "send_failures": sent.failed, **worker_facts(a, b)}
    return result


def poison_pills(ctx: Context) -> dict[str, object]:
    huge_key = b"k" * 460_000
    pills = [
        (huge_key, b"not json at all"),
        (b"pill-schema-version", json_line({"schema_version": "v" * 700_000, "id": "a", "text": "hi"})),
    ]
    items = cycled(ctx.rows, 400, "pill")
    with (
        ctx.kafka("pills") as kafka,
        start_redis(ctx.tmp / "valkey-pills") as redis,
        ctx.worker(kafka.bootstrap, redis.url, "pills", "pills") as worker,
        Ledger(kafka.bootstrap) as ledger,
    ):
        worker.wait_healthy()
        pid = worker.pid
        traffic = Traffic(kafka.bootstrap, items, 200.0, extra=pills).start()
        sent = traffic.join()
        ledger.settle(len(sent.acked), timeout_s=120)
        result = {
            **tally(sent.acked, ledger),
            "pills_dead_lettered": tally(dict.fromkeys((key for key, _ in pills), 0), ledger)[
                "dead_lettered"
            ],
            "largest_dead_letter_bytes": max(ledger.letter_sizes, default=0),
            "same_pid": worker.pid == pid,
            **worker_facts(worker),
        }
        result["exit_code_on_sigterm"] = worker.terminate(60)
    return result


def bad_input_mix(ctx: Context) -> dict[str, object]:
    inputs = bad_inputs(ctx.rows, ctx.args.bad_inputs)
    with (
        ctx.kafka("bad") as kafka,
        start_redis(ctx.tmp / "valkey-bad") as redis,
        ctx.worker(kafka.bootstrap, redis.url, "bad", "bad") as worker,
        Ledger(kafka.bootstrap) as ledger,
    ):
        worker.wait_healthy()
        pid = worker.pid
        traffic = Traffic(kafka.bootstrap, [], 1.0, extra=[(k, v) for _, k, v in inputs]).start()
        sent = traffic.join()
        ledger.settle(len(sent.acked), timeout_s=120)
        result = {**tally(sent.acked, ledger), "same_pid": worker.pid == pid, **worker_facts(worker)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--rate", type=float, default=400.0, help="offered utterances per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the traffic per scenario")
    parser.add_argument("--fault-after-s", type=float, default=6.0)
    parser.add_argument("--freeze-broker-s", type=float, default=15.0)
    parser.add_argument("--freeze-redis-s", type=float, default=10.0)
    parser.add_argument("--bad-inputs", type=int, default=1_000)
    parser.add_argument("--buffer-entries", type=int, default=300, help="labeller_killed: buffered samples")
    parser.add_argument("--student", type=Path, default=MODELS_DIR / "student")
    parser.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep services' and workers' logs here")
    args = parser.parse_args()
    runners: dict[str, Callable[[Context], dict[str, object]]] = {
        "broker_frozen": broker_frozen,
        "broker_restarted": broker_restarted,
        "worker_killed": worker_killed,
        "redis_frozen": redis_frozen,
        "labeller_killed": lambda ctx: labeller_killed(ctx.args, ctx.rows, ctx.tmp),
        "poison_pills": poison_pills,
        "bad_inputs": bad_input_mix,
    }
    chosen = [name for name in args.only.split(",") if name]
    unknown = set(chosen) - set(runners)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results: dict[str, object] = dict(previous.get("scenarios", {}))
    rows = shared_texts(args.shared)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # our own clients: the faults are deliberate
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    scratch_dir = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="faults-", dir=args.keep))
        if args.keep is not None
        else tempfile.TemporaryDirectory(prefix="faults-")
    )
    with scratch_dir as scratch:
        for name in chosen:
            print(f"{name} ...", flush=True)
            started = time.monotonic()
            outcome = runners[name](Context(args, rows, Path(scratch)))
            outcome["seconds"] = round(time.monotonic() - started, 1)
            results[name] = outcome
            print(f"  {json.dumps(outcome)[:400]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("only", "out")},
        "how": __doc__.split("\n\n")[1] if __doc__ else "",
        "scenarios": {name: results[name] for name in SCENARIOS if name in results},
    }
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
