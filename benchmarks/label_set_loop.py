"""A new label set through the whole loop, on real services, without a restart.

0. Generation 0 is ``models/student`` (Action / Other / Recall, a card without a label set),
   served by one worker on a fresh Tansu broker and valkey, sampling every text (rate 1).
1. ``--traffic-per-language`` rows of each ``../shared/data/traffic/<locale>.jsonl`` and the
   first ``--massive-rows`` MASSIVE train rows (read in place) are replayed through it.
2. ``intent-worker label --once`` with ``INTENT_TEACHER_LABELS=models/labels/intents-4-purchase.json``:
   the e5 zero-shot teacher labels the buffer into a dataset tagged with that label set.
3. The trainer is asked to mix that dataset with the development corpus (``make corpus``,
   labelled by the trained head: another label set) and refuses; then it trains a 4-label
   student on the new dataset alone.
4. The gate (dry runs): without ``--new-label-set`` it refuses the candidate (another label
   set than the workers serve); with it, it judges the candidate against its own teacher.
5. Under steady traffic: ``promote --new-label-set``, then ``rollback``. Every utterance sent is
   checked: answered, by which version, with which label set; none lost or dead-lettered.

Results: ``benchmarks/results/label_set_loop.json``; the dataset and the student stay in
``--workdir`` and are reused by a rerun unless ``--fresh``.
    .venv/bin/python benchmarks/label_set_loop.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import redis
from common import machine, write_result
from flywheel import DEMO_SAMPLING
from flywheel_labeller import cli, label_report
from streams import ROOT, Text, broker, produce, produce_at_rate, read_topic, topic_ends, utterance_bytes

from worker.data.corpora import language_of, read_jsonl
from worker.dev.harness import WorkerProcess, metric_sum, worker_env
from worker.dev.services import start_redis
from worker.models.student import Student
from worker.teacher.label_set import LabelSet
from worker.topics import DEAD_LETTERS, INTENTS, buffer_key

PREFIX = "labelset"
LABELS = ROOT / "models" / "labels" / "intents-4-purchase.json"
RECIPE = "--arch cnn --embedding-dim 256 --kernels 2,3,4 --filters 128 --min-count 2 --epochs 8 --patience 2"


def replay_rows(shared: Path, per_language: int, massive_rows: int) -> list[Text]:
    rows: list[Text] = []
    for path in sorted((shared / "traffic").glob("*.jsonl")):
        for row in itertools.islice(read_jsonl(path), per_language):
            rows.append(Text(str(row["id"]), str(row["text"]), str(row["locale"])))
    train = (r for r in read_jsonl(shared / "massive" / "en-US.jsonl") if r.get("split") == "train")
    for row in itertools.islice(train, massive_rows):
        rows.append(Text(str(row["id"]), str(row["text"]), str(row["locale"])))
    return rows


def replay(kafka: str, worker: WorkerProcess, texts: list[Text], client: redis.Redis) -> dict[str, Any]:
    started = time.perf_counter()
    n, rate = asyncio.run(produce(kafka, "utterances", ((t.id.encode(), utterance_bytes(t)) for t in texts)))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and metric_sum(worker.metrics(), "intent_worker_labels_total") < n:
        time.sleep(1)
    time.sleep(3)  # the last buffer writes run after their batch is released
    return {
        "sent": n,
        "per_language": dict(sorted(Counter(language_of(t.locale) for t in texts).items())),
        "labelled_by_worker": int(metric_sum(worker.metrics(), "intent_worker_labels_total")),
        "produce_rate_per_s": round(rate, 1),
        "buffer_length": int(client.xlen(buffer_key(PREFIX))),
        "seconds": round(time.perf_counter() - started, 1),
    }


def switch(
    kafka: str, worker: WorkerProcess, env: dict[str, str], candidate: Path, work: Path, pool: list[Text],
    rate: float, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Steady traffic; promote ``candidate`` (gate included) after 10 s, roll back 30 s later."""
    items = [
        Text(f"switch-{i}", t.text, t.locale)
        for i, t in enumerate(itertools.islice(itertools.cycle(pool), int(rate * seconds)))
    ]
    intents_start = asyncio.run(topic_ends(kafka, INTENTS))
    dlq_start = asyncio.run(topic_ends(kafka, DEAD_LETTERS))
    result: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: result.update(rate=asyncio.run(produce_at_rate(kafka, items, rate)))
    )
    sender.start()
    time.sleep(10)
    promote = cli(
        ["promote", str(candidate), "--new-label-set", "--out", str(work / "gate.json")], env, check=False
    )
    print(promote.stdout, flush=True)
    time.sleep(30)
    rollback = cli(["rollback"], env, check=False) if promote.returncode == 0 else None
    sender.join()
    deadline = time.monotonic() + 120
    records = []
    while time.monotonic() < deadline:
        records = asyncio.run(read_topic(kafka, INTENTS, intents_start))
        if len({r.key for r in records}) >= len(items):
            break
        time.sleep(1)
    answered: dict[str, list[tuple[str, str]]] = defaultdict(list)
    order: list[str] = []
    label_sets: dict[str, set[str]] = defaultdict(set)
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        intent = json.loads(record.value)
        version, label_set = intent["model_version"], intent.get("label_set")
        answered[intent["id"]].append((version, label_set))
        label_sets[version].add(str(label_set))
        labels[version][intent["label"]] += 1
        order.append(version)
    sent = {t.id for t in items}
    dead = asyncio.run(read_topic(kafka, DEAD_LETTERS, dlq_start))
    return {
        "sent": len(items),
        "offered_rate_per_s": rate,
        "achieved_rate_per_s": round(result.get("rate", 0.0), 1),
        "answered": len(sent & set(answered)),
        "lost": len(sent - set(answered)),
        "answered_twice": sum(1 for v in answered.values() if len(v) > 1),
        "dead_letters": len(dead),
        "by_version": dict(Counter(v[0][0] for v in answered.values())),
        "label_sets_by_version": {k: sorted(v) for k, v in label_sets.items()},
        "labels_by_version": {k: dict(v) for k, v in labels.items()},
        "intents_without_label_set": sum(1 for v in answered.values() for _, s in v if not s),
        "promote_exit": promote.returncode,
        "promote_stdout": promote.stdout[-3000:],
        "promote_stderr": promote.stderr[-1500:],
        "rollback_exit": rollback.returncode if rollback else None,
        "reloads": {
            k: v for k, v in worker.metrics().items() if k.startswith("intent_worker_model_reloads_total")
        },
        "worker_health_after": worker.health()[1].get("status"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "label-set-loop")
    parser.add_argument("--labels", type=Path, default=LABELS, help="the new label set")
    parser.add_argument("--traffic-per-language", type=int, default=250)
    parser.add_argument(
        "--massive-rows", type=int, default=3000, help="MASSIVE en-US train rows replayed too"
    )
    parser.add_argument("--dev-corpus", type=Path, default=ROOT / ".cache" / "datasets" / "dev")
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=75.0)
    parser.add_argument("--fresh", action="store_true", help="relabel and retrain")
    args = parser.parse_args()
    work: Path = args.workdir.resolve()
    dataset, student = work / "dataset", work / "student"
    if args.fresh:
        for path in (dataset, student):
            shutil.rmtree(path, ignore_errors=True)
    registry = work / "registry"
    shutil.rmtree(registry, ignore_errors=True)  # every run starts serving generation 0
    gen0 = work / "gen0"
    if not (gen0 / "card.json").exists():
        shutil.copytree(ROOT / "models" / "student", gen0)
    label_set = LabelSet.from_file(args.labels)
    texts = replay_rows(args.shared, args.traffic_per_language, args.massive_rows)
    result: dict[str, Any] = {
        "machine": machine(),
        "label_set": label_set.id,
        "labels": list(label_set.names),
        "gen0": {"version": Student(gen0).version, "label_set": Student(gen0).label_set},
        "recipe": args.recipe,
    }
    steps: dict[str, float] = {}
    started = time.perf_counter()
    with broker(work / "tansu", partitions=4) as kafka, start_redis(work / "valkey") as valkey:
        client = redis.Redis.from_url(valkey.url)
        base = {
            "INTENT_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "INTENT_REDIS_URL": valkey.url,
            "INTENT_REDIS_KEY_PREFIX": PREFIX,
            "INTENT_REGISTRY_DIR": str(registry),
            "INTENT_STUDENT_DIR": str(gen0),
            "INTENT_RUN_DIR": str(work / "run"),
        }
        env = worker_env(base)
        zero_shot = worker_env({**base, "INTENT_TEACHER_LABELS": str(args.labels)})
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=valkey.url, run_dir=work / "run", group=PREFIX, student=gen0,
            partitions=4, extra={**DEMO_SAMPLING, "INTENT_REGISTRY_DIR": str(registry), "INTENT_REDIS_KEY_PREFIX": PREFIX},
        )  # fmt: skip
        with worker:
            worker.wait_healthy()
            began = time.perf_counter()
            print(f"1. replaying {len(texts)} rows through a worker serving gen 0", flush=True)
            result["replay"] = replay(kafka.bootstrap, worker, texts, client)
            print(json.dumps(result["replay"]), flush=True)
            steps["replay"] = round(time.perf_counter() - began, 1)

            began = time.perf_counter()
            print(f"2. labelling the buffer with the zero-shot teacher on {label_set.id}", flush=True)
            if not (dataset / "manifest.json").exists():
                done = cli(
                    ["--log-json", "label", "--once", "--data", str(dataset), "--consumer", "demo"], zero_shot
                )
                result["labelling"] = label_report(done)
            else:
                result["labelling"] = {"reused_from_earlier_run": str(dataset)}
            result["dataset"] = json.loads(cli(["dataset", "stats", str(dataset), "--json"], env).stdout)
            steps["label"] = round(time.perf_counter() - began, 1)

            began = time.perf_counter()
            print("3. the trainer: mixing label sets is refused; then the 4-label student", flush=True)
            if (args.dev_corpus / "manifest.json").exists():
                mixed = cli(
                    ["train", *args.recipe.split(), "--data", str(dataset), str(args.dev_corpus),
                     "--out", str(work / "mixed")],
                    env, check=False,
                )  # fmt: skip
                result["mixed_training"] = {"exit": mixed.returncode, "error": mixed.stderr.strip()[-600:]}
            if not (student / "card.json").exists():
                cli(
                    ["train", *args.recipe.split(), "--threads", "2", "--data", str(dataset), "--out", str(student)],
                    env, capture=False,
                )  # fmt: skip
            card = json.loads((student / "card.json").read_text())
            result["student"] = {
                k: card.get(k) for k in ("version", "labels", "label_set", "teacher", "sizes_bytes")
            } | {"int8_shipped": card["int8"]["shipped"], "int8_parity": card["int8"]["parity"]}
            steps["train"] = round(time.perf_counter() - began, 1)

            began = time.perf_counter()
            print("4. the gate, dry runs: without and with --new-label-set", flush=True)
            plain = cli(["promote", str(student), "--dry-run"], zero_shot, check=False)
            dry = cli(
                ["promote", str(student), "--dry-run", "--new-label-set", "--out", str(work / "gate-dry.json")],
                zero_shot, check=False,
            )  # fmt: skip
            result["gate_without_flag"] = {"exit": plain.returncode, "stderr": plain.stderr.strip()[-800:]}
            report = json.loads((work / "gate-dry.json").read_text())
            result["gate_dry_run"] = {
                "exit": dry.returncode,
                "promote": report["promote"],
                "reasons": report["reasons"],
                "checks": {c["name"]: c["passed"] for c in report["checks"]},
                "candidate": {
                    k: report["candidate"][k] for k in ("agreement", "macro_f1", "kl_mean", "label_set")
                },
                "golden_n": report["golden"]["n"],
            }
            steps["gate_dry_runs"] = round(time.perf_counter() - began, 1)

            began = time.perf_counter()
            print("5. promote --new-label-set under steady traffic, then roll back", flush=True)
            result["switch"] = switch(
                kafka.bootstrap, worker, zero_shot, student, work, texts, args.rate, args.seconds
            )
            print(
                json.dumps({k: v for k, v in result["switch"].items() if "std" not in k}, indent=1),
                flush=True,
            )
            result["worker_log_events"] = [
                {k: e.get(k) for k in ("event", "old", "new", "labels", "error")}
                for e in worker.log_events()
                if e.get("event") in ("model_reloaded", "model_reload_failed", "label_set_changed")
            ]
            steps["switch"] = round(time.perf_counter() - began, 1)
    result["step_seconds"] = steps
    result["seconds"] = round(time.perf_counter() - started, 1)
    print("wrote", write_result("label_set_loop", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
