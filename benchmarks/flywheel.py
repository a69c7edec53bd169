"""The closed distillation loop, end to end, on real services: ``make loop-demo``.

1. A worker serves "generation 0" (the shipped CNN recipe distilled from a 10% seed of the
   teacher-labelled development corpus, `make corpus`) on a fresh Tansu broker and valkey.
2. Every training text of ``../shared/data`` (MASSIVE train, Tatoeba and its English side) is
   replayed through it; it samples them into the Redis buffer (rate 1 for the demo).
3. The labeller's throughput is measured at 1 and 2 teacher threads on the same 2,000 entries,
   with its time split (Redis, decode, teacher, Parquet write).
4. ``intent-worker label --once`` labels the whole buffer into a dataset.
5. ``intent-worker train`` distils a candidate from that dataset (the shipped recipe), and a
   deliberately worse one from 1% of it. The candidate is also gated, as a dry run, against the
   shipped student (trained on the same texts), to show what the gate says of a retrained twin.
6. ``intent-worker promote`` refuses the worse one (and says why), and promotes the candidate
   while traffic flows at a steady rate; then ``intent-worker rollback``. Every utterance sent
   during the switches is checked: answered once, by which version, none lost or dead-lettered.

Results: ``benchmarks/results/flywheel.json``. Outputs of slow steps (dataset, candidates) are
kept in ``--workdir`` and reused by a rerun unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis
from common import machine, write_result
from streams import (
    ROOT,
    Text,
    broker,
    produce,
    produce_at_rate,
    read_topic,
    topic_ends,
    utterance_bytes,
)

from worker.data.corpora import read_jsonl
from worker.dev.harness import WorkerProcess, metric_sum, worker_env
from worker.dev.services import start_redis
from worker.topics import BUFFER_FIELD, DEAD_LETTERS, INTENTS, buffer_key

PREFIX = "flywheel"
GROUP = "flywheel"


def training_texts(shared: Path) -> list[Text]:
    """MASSIVE train rows, and every Tatoeba sentence with its English translation."""
    out: list[Text] = []
    for path in sorted((shared / "massive").glob("*.jsonl")):
        out += [
            Text(str(r["id"]), str(r["text"]), str(r["locale"]))
            for r in read_jsonl(path)
            if r.get("split") == "train"
        ]
    for r in read_jsonl(shared / "tatoeba" / "tatoeba.jsonl"):
        out.append(Text(str(r["id"]), str(r["text"]), str(r["locale"])))
        if isinstance(r.get("en"), str):
            out.append(Text(f"{r['id']}:en", str(r["en"]), "en"))
    return out


def cli(
    args: list[str], env: dict[str, str], *, capture: bool = True, check: bool = True
) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
    )  # fmt: skip
    print(
        f"  intent-worker {' '.join(args)}  -> exit {done.returncode} in {time.perf_counter() - started:.1f}s",
        flush=True,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"intent-worker {' '.join(args)} failed:\n{(done.stderr or '')[-3000:]}")
    return done


def label_report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return _with_rates(json.loads(done.stdout))


def _with_rates(report: dict[str, Any]) -> dict[str, Any]:
    """A labelling run's line, plus samples per second and the share of time per stage."""
    span = max(report["finished"] - report["started"], 1e-9)
    report["samples_per_s"] = round(report["entries"] / span, 1)
    total = sum(report["seconds"].values()) or 1.0
    report["time_split"] = {k: round(v / total, 3) for k, v in report["seconds"].items()}
    return report


def copy_entries(client: redis.Redis, chosen: list[Any], prefix: str) -> list[str]:
    """``chosen`` buffer entries added again to the buffer of ``prefix``; their new entry ids."""
    client.delete(buffer_key(prefix))
    with client.pipeline(transaction=False) as pipe:
        for _, fields in chosen:
            pipe.xadd(buffer_key(prefix), {BUFFER_FIELD: fields[BUFFER_FIELD.encode()]})
        return [eid.decode() for eid in pipe.execute()]


def dataset_buffer_ids(location: Path) -> Counter[str]:
    """How often each buffer entry appears in the dataset's listed shards."""
    counts: Counter[str] = Counter()
    manifest = json.loads((location / "manifest.json").read_text())
    for shard in manifest["shards"]:
        counts.update(
            pq.read_table(location / shard["file"], columns=["buffer_id"]).column("buffer_id").to_pylist()
        )
    return counts


def label_process(
    env: dict[str, str], prefix: str, location: Path, consumer: str, threads: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--log-json", "label", "--once", "--data", str(location), "--consumer", consumer],
        env={**env, "INTENT_REDIS_KEY_PREFIX": prefix, "INTENT_TEACHER_THREADS": str(threads),
             "INTENT_LABELLER_CLAIM_IDLE_S": "2"},
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def crash_test(
    client: redis.Redis, env: dict[str, str], work: Path, chosen: list[Any], kills: int
) -> dict[str, Any]:
    """Labellers (the embedded teacher) killed with SIGKILL at random points, then one that finishes."""
    ids = copy_entries(client, chosen, "crash")
    location = work / "crash"
    shutil.rmtree(location, ignore_errors=True)
    rng = random.Random(3)
    points = []
    for attempt in range(kills):
        proc = label_process(env, "crash", location, f"crash{attempt % 2}", threads=2)
        delay = rng.uniform(3.0, 12.0)  # loading the teacher takes ~3 s: most kills land mid-labelling
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.communicate()
        points.append(
            {
                "after_s": round(delay, 2),
                "killed": proc.returncode == -9,
                "rows_so_far": sum(dataset_buffer_ids(location).values())
                if (location / "manifest.json").exists()
                else 0,
            }
        )
    time.sleep(2.5)  # past the claim timeout: the last run also claims what the killed ones held
    final = label_process(env, "crash", location, "survivor", threads=2)
    final_report = json.loads(final.communicate(timeout=600)[0])
    counts = dataset_buffer_ids(location)
    return {
        "buffered": len(ids),
        "kills": sum(p["killed"] for p in points),
        "points": points,
        "rows": sum(counts.values()),
        "lost": len(set(ids) - set(counts)),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "final_run": {k: final_report[k] for k in ("entries", "rows", "duplicates", "claimed")},
        "buffer_left": int(client.xlen(buffer_key("crash"))),
    }


def parallel_labellers(
    client: redis.Redis, env: dict[str, str], work: Path, chosen: list[Any]
) -> dict[str, Any]:
    """Two labellers, one teacher thread each, on one buffer and one dataset at once."""
    ids = copy_entries(client, chosen, "pair")
    location = work / "pair"
    shutil.rmtree(location, ignore_errors=True)
    started = time.perf_counter()
    procs = [label_process(env, "pair", location, name, threads=1) for name in ("left", "right")]
    reports = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    elapsed = time.perf_counter() - started
    counts = dataset_buffer_ids(location)
    return {
        "buffered": len(ids),
        "rows_per_labeller": {r["run"].split("@")[0]: r["rows"] for r in reports},
        "rows": sum(counts.values()),
        "lost": len(set(ids) - set(counts)),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "samples_per_s_together": round(len(ids) / elapsed, 1),
    }


def labeller_throughput(
    client: redis.Redis, env: dict[str, str], work: Path, chosen: list[Any]
) -> dict[str, Any]:
    """The same buffer entries labelled at 1 and at 2 teacher threads, with the time split."""
    out: dict[str, Any] = {}
    for threads in (1, 2):
        prefix = f"throughput{threads}"
        copy_entries(client, chosen, prefix)
        scratch = work / f"throughput-{threads}"
        shutil.rmtree(scratch, ignore_errors=True)
        done = cli(
            ["--log-json", "label", "--once", "--data", str(scratch), "--consumer", f"bench{threads}"],
            {**env, "INTENT_REDIS_KEY_PREFIX": prefix, "INTENT_TEACHER_THREADS": str(threads)},
        )
        report = label_report(done)
        out[f"threads_{threads}"] = {
            k: report[k] for k in ("entries", "rows", "samples_per_s", "seconds", "time_split")
        }
    out["speedup_2_vs_1"] = round(out["threads_2"]["samples_per_s"] / out["threads_1"]["samples_per_s"], 2)
    return out


def replay(kafka: str, worker: WorkerProcess, texts: list[Text], client: redis.Redis) -> dict[str, Any]:
    started = time.perf_counter()
    n, rate = asyncio.run(produce(kafka, "utterances", ((t.id.encode(), utterance_bytes(t)) for t in texts)))
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and metric_sum(worker.metrics(), "intent_worker_labels_total") < n:
        time.sleep(1)
    labelled = metric_sum(worker.metrics(), "intent_worker_labels_total")
    time.sleep(3)  # the last buffer writes run after their batch is released
    metrics = worker.metrics()
    return {
        "sent": n,
        "produce_rate_per_s": round(rate, 1),
        "labelled_by_worker": int(labelled),
        "seconds": round(time.perf_counter() - started, 1),
        "sampler": {
            "selected": int(metric_sum(metrics, "intent_worker_samples_selected_total")),
            "kept": int(metric_sum(metrics, "intent_worker_samples_kept_total")),
            "dropped": {
                k: int(v) for k, v in metrics.items() if k.startswith("intent_worker_samples_dropped_total")
            },
        },
        "buffer_length": int(client.xlen(buffer_key(PREFIX))),
    }


def switch(
    kafka: str,
    worker: WorkerProcess,
    env: dict[str, str],
    candidate: Path,
    work: Path,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Steady traffic; promote ``candidate`` (gate included) after 10 s, roll back 30 s after that."""
    items = [
        Text(f"switch-{i}", text, locale)
        for i, (text, locale) in enumerate(_switch_texts(int(rate * seconds)))
    ]
    intents_start = asyncio.run(topic_ends(kafka, INTENTS))
    dlq_start = asyncio.run(topic_ends(kafka, DEAD_LETTERS))
    before = worker.health()[1].get("model_version")
    result: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: result.update(rate=asyncio.run(produce_at_rate(kafka, items, rate)))
    )
    sender.start()
    time.sleep(10)
    promote = cli(["promote", str(candidate), "--out", str(work / "gate-candidate.json")], env, check=False)
    promoted_at = time.time()  # the gate measured both models under this traffic, then published
    time.sleep(30)
    rollback = cli(["rollback"], env, check=False)
    rolled_back_at = time.time()
    sender.join()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records = asyncio.run(read_topic(kafka, INTENTS, intents_start))
        if len({r.key for r in records}) >= len(items):
            break
        time.sleep(1)
    answered: dict[str, list[str]] = defaultdict(list)
    by_partition: dict[int, list[str]] = defaultdict(list)
    for record in records:
        intent = json.loads(record.value)
        answered[intent["id"]].append(intent["model_version"])
        by_partition[record.partition].append(intent["model_version"])
    sent_ids = {t.id for t in items}
    dead = asyncio.run(read_topic(kafka, DEAD_LETTERS, dlq_start))
    switches = {p: sum(1 for a, b in itertools.pairwise(v) if a != b) for p, v in by_partition.items()}
    return {
        "sent": len(items),
        "offered_rate_per_s": rate,
        "achieved_rate_per_s": round(result.get("rate", 0.0), 1),
        "answered": len(sent_ids & set(answered)),
        "lost": len(sent_ids - set(answered)),
        "answered_twice": sum(1 for v in answered.values() if len(v) > 1),
        "dead_letters": len(dead),
        "served_before": before,
        "by_version": dict(Counter(v[0] for v in answered.values())),
        "version_changes_per_partition": switches,
        "promote_exit": promote.returncode,
        "promote_stdout": promote.stdout[-2000:],
        "rollback_exit": rollback.returncode,
        "rollback_stderr": rollback.stderr[-500:],
        "promoted_at": promoted_at,
        "rolled_back_at": rolled_back_at,
        "reloads": {
            k: v for k, v in worker.metrics().items() if k.startswith("intent_worker_model_reloads_total")
        },
        "worker_health_after": worker.health()[1].get("status"),
    }


_SWITCH_TEXTS: list[tuple[str, str]] = []


def _switch_texts(n: int) -> list[tuple[str, str]]:
    pool = _SWITCH_TEXTS
    return [pool[i % len(pool)] for i in range(n)]


def samples_from_dataset(location: Path, n: int) -> list[Any]:
    """``n`` random rows of a buffer-made dataset, turned back into buffer entries (for re-measuring
    the labeller without a worker): the same texts and fields the worker sampled."""
    import numpy as np

    from worker.schemas import BufferSample, SampleReason

    manifest = json.loads((location / "manifest.json").read_text())
    labels = manifest["teacher"]["labels"]
    rows = [r for shard in manifest["shards"] for r in pq.read_table(location / shard["file"]).to_pylist()]
    entries = []
    for row in random.Random(0).sample(rows, min(n, len(rows))):
        logits = np.asarray(row["student_logits"], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        ordered = np.sort(probs)
        sample = BufferSample(
            id=row["id"], text=row["text"], locale=row["locale"], label=labels[int(probs.argmax())],
            logits=tuple(row["student_logits"]), scores={k: float(p) for k, p in zip(labels, probs, strict=True)},
            margin=float(ordered[-1] - ordered[-2]), model_version=row["model_version"], stratum=row["stratum"],
            reason=SampleReason.STRATUM, sampling_probability=1 / row["weight"], weight=row["weight"],
            timestamp=row["sampled_at"],
        )  # fmt: skip
        entries.append((b"", {BUFFER_FIELD.encode(): sample.to_json_bytes()}))
    return entries


def labeller_only(args: argparse.Namespace) -> int:
    """Re-measure the labeller (1 vs 2 threads, two at once) on a quiet machine; updates flywheel.json."""
    path = ROOT / "benchmarks" / "results" / "flywheel.json"
    result = json.loads(path.read_text())
    work: Path = args.workdir
    chosen = samples_from_dataset(work / "dataset", args.throughput_entries)
    with start_redis(work / "valkey-labeller") as valkey:
        client = redis.Redis.from_url(valkey.url)
        env = worker_env({"INTENT_REDIS_URL": valkey.url, "INTENT_RUN_DIR": str(work / "run")})
        result["labeller_throughput"] = labeller_throughput(client, env, work, chosen)
        result["two_labellers"] = parallel_labellers(client, env, work, chosen)
    result["labeller_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps({k: result[k] for k in ("labeller_throughput", "two_labellers")}, indent=1))
    write_result("flywheel", result)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "flywheel")
    parser.add_argument("--fresh", action="store_true", help="redo the dataset and the candidates")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--throughput-entries", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument(
        "--seed-corpus",
        type=Path,
        default=ROOT / ".cache" / "datasets" / "dev",
        help="generation 0 trains on 10%% of it",
    )
    parser.add_argument("--switch-rate", type=float, default=300.0)
    parser.add_argument(
        "--switch-seconds", type=float, default=150.0, help="long enough to gate, promote, roll back"
    )
    parser.add_argument(
        "--labeller-only", action="store_true", help="only re-measure the labeller, from the demo's dataset"
    )
    args = parser.parse_args()
    if args.labeller_only:
        return labeller_only(args)
    work: Path = args.workdir
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    registry = work / "registry"
    shutil.rmtree(registry, ignore_errors=True)  # every demo starts serving generation 0
    dataset, candidate, worse = work / "dataset", work / "candidate", work / "worse"
    seed = work / "generation-0"
    recipe = ["--arch", "cnn", "--filters", "128", "--min-count", "2", "--threads", str(args.train_threads)]
    if not (seed / "card.json").exists():
        # Generation 0: the shipped recipe on a 10% seed of the teacher-labelled development corpus.
        if not (args.seed_corpus / "manifest.json").exists():
            raise SystemExit(f"no seed corpus at {args.seed_corpus}: run `make corpus` first")
        cli(["train", *recipe, "--epochs", str(args.epochs), "--fraction", "0.1", "--data", str(args.seed_corpus),
             "--out", str(seed)], worker_env({}), capture=False)  # fmt: skip
    texts = training_texts(args.shared)
    _SWITCH_TEXTS.extend((t.text, t.locale) for t in random.Random(1).sample(texts, 5000))
    result: dict[str, Any] = {"machine": machine(), "texts": len(texts)}
    earlier_result = ROOT / "benchmarks" / "results" / "flywheel.json"
    previous: dict[str, Any] = json.loads(earlier_result.read_text()) if earlier_result.exists() else {}
    started = time.perf_counter()
    with broker(work / "tansu", partitions=4) as kafka, start_redis(work / "valkey") as valkey:
        client = redis.Redis.from_url(valkey.url)
        env = worker_env(
            {
                "INTENT_KAFKA_BOOTSTRAP": kafka.bootstrap,
                "INTENT_REDIS_URL": valkey.url,
                "INTENT_REDIS_KEY_PREFIX": PREFIX,
                "INTENT_REGISTRY_DIR": str(registry),
                "INTENT_STUDENT_DIR": str(seed),
                "INTENT_RUN_DIR": str(work / "run"),
            }
        )
        sampling = {
            "INTENT_SAMPLE_RATE": "1.0",  # the demo keeps every text; production samples ~10%
            "INTENT_SAMPLE_BUDGET_PER_S": "1000000",
            "INTENT_BUFFER_MAXLEN": "200000",
            "INTENT_REDIS_TIMEOUT_S": "2.0",
            "INTENT_BUFFER_MAX_PENDING_WRITES": "64",
            "INTENT_MODEL_POLL_INTERVAL_S": "1.0",
        }
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=valkey.url, run_dir=work / "run", group=GROUP,
            student=seed, partitions=4, extra={**sampling, "INTENT_REGISTRY_DIR": str(registry), "INTENT_REDIS_KEY_PREFIX": PREFIX},
        )  # fmt: skip
        with worker:
            worker.wait_healthy()
            print("1-2. replaying the training texts through the worker", flush=True)
            result["replay"] = replay(kafka.bootstrap, worker, texts, client)
            print(json.dumps(result["replay"]), flush=True)
            entries = client.xrange(buffer_key(PREFIX))
            chosen = random.Random(0).sample(entries, min(args.throughput_entries, len(entries)))
            print("3. labeller throughput at 1 and 2 threads; two labellers at once; kill -9", flush=True)
            result["labeller_throughput"] = labeller_throughput(client, env, work, chosen)
            print(json.dumps(result["labeller_throughput"]), flush=True)
            result["two_labellers"] = parallel_labellers(client, env, work, chosen)
            print(json.dumps(result["two_labellers"]), flush=True)
            result["crash_test"] = crash_test(client, env, work, chosen, args.kills)
            print(json.dumps({k: v for k, v in result["crash_test"].items() if k != "points"}), flush=True)
            print("4. labelling the buffer", flush=True)
            if not (dataset / "manifest.json").exists():
                done = cli(
                    ["--log-json", "label", "--once", "--data", str(dataset), "--consumer", "demo"], env
                )
                result["labelling"] = label_report(done)
            else:
                # Labelled by an earlier run of this script: keep that run's measurements.
                runs = json.loads((dataset / "manifest.json").read_text())["runs"]
                result["labelling"] = {**_with_rates(runs[0]), "reused_from_earlier_run": str(dataset)}
                client.delete(buffer_key(PREFIX))
            result["dataset"] = json.loads(cli(["dataset", "stats", str(dataset), "--json"], env).stdout)
            print("5. training the candidate and a deliberately worse one", flush=True)
            for out, extra in (
                (candidate, ["--epochs", str(args.epochs)]),
                (worse, ["--epochs", str(args.epochs), "--fraction", "0.01"]),
            ):
                if not (out / "card.json").exists():
                    began = time.perf_counter()
                    cli(
                        ["train", *recipe, *extra, "--data", str(dataset), "--out", str(out)],
                        env,
                        capture=False,
                    )
                    result.setdefault("training_seconds", {})[out.name] = round(
                        time.perf_counter() - began, 1
                    )
                else:  # trained by an earlier run of this script
                    earlier = previous.get("training_seconds", {}).get(out.name)
                    result.setdefault("training_seconds", {})[out.name] = earlier or "reused"
            result["candidates"] = {}
            for out in (seed, candidate, worse):
                card = json.loads((out / "card.json").read_text())
                result["candidates"][out.name] = {
                    "version": card["version"],
                    "train_rows": card["data"]["train_rows"],
                    "best_epoch": card["training"]["best_epoch"],
                    "training_seconds": card["training"]["seconds"],
                    "threads": card["training"]["threads"],
                    "command": card["command"],
                }
            print("   the same candidate against the shipped student (dry run)", flush=True)
            shipped = cli(
                ["promote", str(candidate), "--dry-run", "--out", str(work / "gate-vs-shipped.json")],
                {**env, "INTENT_REGISTRY_DIR": str(work / "no-registry"), "INTENT_STUDENT_DIR": str(ROOT / "models" / "student")},
                check=False,
            )  # fmt: skip
            result["gate_candidate_vs_shipped"] = json.loads((work / "gate-vs-shipped.json").read_text())
            print(shipped.stdout, flush=True)
            print("6. the gate refuses the worse candidate", flush=True)
            refused = cli(["promote", str(worse), "--out", str(work / "gate-worse.json")], env, check=False)
            result["gate_worse"] = {
                "exit": refused.returncode,
                "stdout": refused.stdout,
                "reasons": json.loads((work / "gate-worse.json").read_text())["reasons"],
            }
            print(refused.stdout, flush=True)
            print("6. promote and roll back under steady traffic", flush=True)
            result["switch"] = switch(
                kafka.bootstrap, worker, env, candidate, work, args.switch_rate, args.switch_seconds
            )
            result["gate_candidate"] = json.loads((work / "gate-candidate.json").read_text())
            print(
                json.dumps({k: v for k, v in result["switch"].items() if k != "promote_stdout"}, indent=1),
                flush=True,
            )
            result["worker_log_events"] = [
                e for e in worker.log_events() if e.get("event") in ("model_reloaded", "model_reload_failed")
            ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = write_result("flywheel", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
