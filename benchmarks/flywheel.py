"""The closed distillation loop on multilingual traffic, end to end on real services: ``make loop-demo``.

0. Generation 0 is the student in ``models/student`` when the demo first ran: a copy is kept in
   ``<workdir>/gen0`` (``--gen0`` names another), so a later default does not change the demo.
1. Traffic generation 0 never saw is replayed through a worker serving it on a fresh Tansu
   broker and valkey, which samples it into the Redis buffer (rate 1 for the demo): of each
   ``../shared/data/traffic/<locale>.jsonl`` (read in place; the files are shuffled), the
   ``--per-language`` rows after its first ``--skip-per-language`` (those ``make traffic``
   labelled for generation 0), less the rows the trainer holds back (``split_bucket(id) <
   0.05``).
2. The labeller on a copy of ``--labeller-entries`` buffer entries: throughput at 1 and 2
   teacher threads, two labellers at once, and ``kill -9`` at random points (``--kills 0``: skip);
   the last two write shards of 128 rows, so that they interleave.
3. ``intent-worker label --once`` labels the whole buffer into a dataset.
4. ``intent-worker train`` distils generation 1 from that dataset plus generation 0's own
   datasets (``--train-data``: ``make corpus traffic``), warm-started from generation 0's weights
   (``--recipe``; ``--from-scratch`` leaves out ``--init-from``).
5. ``intent-worker promote`` gates generation 1 against generation 0 (per locale and per
   language) and publishes it while traffic flows at a steady rate (``--switch-rate``, from 10 s
   before the gate to 10 s after the rollback); ``rollback`` 30 s after the promotion. Every
   utterance sent is checked: answered once, by which version, none lost or dead-lettered.
6. The gate in reverse (dry run): generation 0 offered as a candidate against generation 1.
7. Agreement with the teacher per language, generation 0 against generation 1, on the gate's
   golden set (MASSIVE + xSID validation, from its report) and on held-back traffic (ids with
   ``split_bucket < 0.05``, never trained on: at most ``--holdout-per-language`` per language;
   teacher logits from ``--traffic-dataset`` where it has them, else from the teacher).

Results: ``benchmarks/results/flywheel.json``. The dataset and generation 1 are kept in
``--workdir`` and reused by a rerun unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import redis
from common import machine, write_result
from flywheel_labeller import cli, crash_test, label_report, labeller_throughput, parallel_labellers
from streams import ROOT, Text, broker, new_producer, produce, read_topic, topic_ends, utterance_bytes

from worker.config import Settings
from worker.data.corpora import language_of, read_jsonl
from worker.dev.harness import WorkerProcess, metric_sum, worker_env
from worker.dev.services import start_redis
from worker.loop.dataset import split_bucket
from worker.models.student import Student, chunked_logits
from worker.topics import DEAD_LETTERS, INTENTS, UTTERANCES, buffer_key

PREFIX = "flywheel"
GROUP = "flywheel"
#: Worker settings of the demos: every text is sampled (production samples ~10%) and the buffer
#: never drops one, so what was replayed is what gets labelled.
DEMO_SAMPLING = {
    "INTENT_SAMPLE_RATE": "1.0",
    "INTENT_SAMPLE_BUDGET_PER_S": "1000000",
    "INTENT_BUFFER_MAXLEN": "200000",
    "INTENT_REDIS_TIMEOUT_S": "2.0",
    "INTENT_BUFFER_MAX_PENDING_WRITES": "64",
    "INTENT_MODEL_POLL_INTERVAL_S": "1.0",
}
HELD_BACK = 0.05  # the trainer's validation bucket: split_bucket(id) below this is never trained on
#: One generation of the loop: generation 0's architecture (the CNN of ``make student``), two
#: epochs at half its rate, then one around the table snapped to 4 bits; ``--init-from <gen0>``
#: is added.
RECIPE = (
    "--arch cnn --embedding-dim 256 --kernels 2,3,4,5 --filters 160 --min-count 2 --epochs 2 --patience 2"
    " --plateau-factor 0.5 --batch-size 256 --lr 0.00075 --sparse-embeddings --table-bits 4 --table-epochs 1"
)
#: Rows of each traffic file ``make traffic`` labelled (``--per-file``): generation 0 trained on them.
GEN0_TRAFFIC_PER_FILE = 6000


def traffic_rows(
    traffic: Path, per_language: int, held_back: int, skip: int = 0
) -> tuple[list[Text], list[Text]]:
    """(replayed, held back): the trainable rows among rows ``skip`` to ``skip + per_language`` of
    each locale file (those ``corpus build --skip-per-file skip --per-file per_language`` labels),
    and its first ``held_back`` rows in the trainer's validation bucket."""
    replayed: list[Text] = []
    kept: list[Text] = []
    for path in sorted(traffic.glob("*.jsonl")):
        train: list[Text] = []
        valid: list[Text] = []
        for position, row in enumerate(read_jsonl(path)):
            item = Text(str(row["id"]), str(row["text"]), str(row["locale"]))
            if split_bucket(item.id) < HELD_BACK:
                if len(valid) < held_back:
                    valid.append(item)
            elif skip <= position < skip + per_language:
                train.append(item)
            if position >= skip + per_language and len(valid) >= held_back:
                break
        replayed += train
        kept += valid
    if not replayed:
        raise SystemExit(f"no traffic rows under {traffic}")
    return replayed, kept


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
        "per_language": dict(sorted(Counter(language_of(t.locale) for t in texts).items())),
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


async def steady_traffic(kafka: str, pool: list[Text], rate: float, stop: threading.Event) -> list[Text]:
    """Utterances from ``pool`` (cycled, each with a new id) at ``rate`` per second until ``stop``."""
    producer = new_producer(kafka, linger_ms=0)
    await producer.start()
    sent: list[Text] = []
    started = time.monotonic()
    try:
        pending = []
        for i, row in enumerate(itertools.cycle(pool)):
            if stop.is_set():
                break
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            item = Text(f"switch-{i}", row.text, row.locale)
            pending.append(
                await producer.send(UTTERANCES, utterance_bytes(item, time.time()), key=item.id.encode())
            )
            sent.append(item)
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


def switch(
    kafka: str,
    worker: WorkerProcess,
    env: dict[str, str],
    candidate: Path,
    work: Path,
    pool: list[Text],
    rate: float,
) -> dict[str, Any]:
    """Steady traffic throughout: promote ``candidate`` (the gate runs first, under this traffic)
    after 10 s, roll back 30 s after it is published, and stop sending 10 s after that."""
    intents_start = asyncio.run(topic_ends(kafka, INTENTS))
    dlq_start = asyncio.run(topic_ends(kafka, DEAD_LETTERS))
    before = worker.health()[1].get("model_version")
    stop = threading.Event()
    items: list[Text] = []
    began = time.monotonic()
    sender = threading.Thread(
        target=lambda: items.extend(asyncio.run(steady_traffic(kafka, pool, rate, stop)))
    )
    sender.start()
    time.sleep(10)
    promote = cli(["promote", str(candidate), "--out", str(work / "gate-gen1.json")], env, check=False)
    print(promote.stdout, flush=True)
    promoted_at = time.time()
    time.sleep(30)
    # A refused candidate changed nothing: there is nothing to roll back.
    rollback = cli(["rollback"], env, check=False) if promote.returncode == 0 else None
    rolled_back_at = time.time() if rollback else None
    time.sleep(10)
    stop.set()
    sender.join()
    seconds = time.monotonic() - began
    deadline = time.monotonic() + 120
    records = []
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
    changes = {p: sum(1 for a, b in itertools.pairwise(v) if a != b) for p, v in by_partition.items()}
    return {
        "sent": len(items),
        "offered_rate_per_s": rate,
        "achieved_rate_per_s": round(len(items) / seconds, 1),
        "seconds": round(seconds, 1),
        "answered": len(sent_ids & set(answered)),
        "lost": len(sent_ids - set(answered)),
        "answered_twice": sum(1 for v in answered.values() if len(v) > 1),
        "dead_letters": len(dead),
        "served_before": before,
        "by_version": dict(Counter(v[0] for v in answered.values())),
        "version_changes_per_partition": changes,
        "promote_exit": promote.returncode,
        "promote_stdout": promote.stdout[-4000:],
        "rollback_exit": rollback.returncode if rollback else None,
        "rollback_stderr": rollback.stderr[-500:] if rollback else "not run: nothing was promoted",
        "promoted_at": promoted_at,
        "rolled_back_at": rolled_back_at,
        "reloads": {
            k: v for k, v in worker.metrics().items() if k.startswith("intent_worker_model_reloads_total")
        },
        "worker_health_after": worker.health()[1].get("status"),
    }


def dataset_logits(location: Path, ids: set[str], teacher_id: str) -> dict[str, np.ndarray]:
    """Teacher logits of ``ids`` from a distillation dataset labelled by the same teacher."""
    manifest_path = location / "manifest.json"
    if not manifest_path.exists():
        return {}
    manifest = json.loads(manifest_path.read_text())
    if manifest["teacher"]["id"] != teacher_id:
        print(f"  {location}: teacher {manifest['teacher']['id']} is not {teacher_id}; not used", flush=True)
        return {}
    found: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(location / shard["file"], columns=["id", "teacher_logits"])
        for row_id, logits in zip(
            table.column("id").to_pylist(), table.column("teacher_logits").to_pylist(), strict=True
        ):
            if row_id in ids:
                found[row_id] = np.asarray(logits, np.float32)
    return found


def agreement_by_language(
    models: dict[str, Path], rows: list[Text], teacher_logits: np.ndarray, labels: tuple[str, ...]
) -> dict[str, Any]:
    """Each model's agreement with the teacher's top label, overall and per language (with n)."""
    languages = np.asarray([language_of(t.locale) for t in rows])
    teacher_top = teacher_logits.argmax(1)
    out: dict[str, Any] = {"n": dict(sorted(Counter(languages.tolist()).items()))}
    for name, directory in models.items():
        student = Student(directory)
        order = [student.labels.index(label) for label in labels]
        agree = chunked_logits([t.text for t in rows], student, rows=64)[:, order].argmax(1) == teacher_top
        out[name] = {
            "version": student.version,
            "overall": round(float(agree.mean()), 4),
            "per_language": {
                lang: round(float(agree[languages == lang].mean()), 4)
                for lang in sorted(set(languages.tolist()))
            },
        }
    return out


def held_back_agreement(rows: list[Text], models: dict[str, Path], traffic_dataset: Path) -> dict[str, Any]:
    """Agreement per language on held-back traffic; teacher logits from the dataset, else computed."""
    from worker.teacher import load_teacher

    teacher = load_teacher(Settings())
    known = dataset_logits(traffic_dataset, {t.id for t in rows}, teacher.identity)
    missing = [t for t in rows if t.id not in known]
    if missing:
        print(f"  the teacher labels {len(missing)} held-back rows not in {traffic_dataset}", flush=True)
        computed = teacher.logits([t.text for t in missing])
        known.update({t.id: computed[i] for i, t in enumerate(missing)})
    logits = np.stack([known[t.id] for t in rows])
    result = agreement_by_language(models, rows, logits, tuple(teacher.labels))
    result["teacher_logits"] = {
        "from_dataset": len(rows) - len(missing),
        "computed": len(missing),
        "dataset": str(traffic_dataset),
    }
    return result


def golden_table(gate: dict[str, Any]) -> dict[str, Any]:
    """Per-locale and per-language agreement of both models, from the gate's report."""
    return {
        "rows_per_locale": gate["golden"]["locales"],
        "rows_per_language": gate["golden"].get("languages", {}),
        **{
            name: {
                "version": gate[role]["version"],
                "overall": round(gate[role]["agreement"], 4),
                "per_locale": {k: round(v, 4) for k, v in sorted(gate[role]["agreement_per_locale"].items())},
                "per_language": {
                    k: round(v, 4) for k, v in sorted(gate[role]["agreement_per_language"].items())
                },
            }
            for name, role in (("gen0", "current"), ("gen1", "candidate"))
        },
    }


def card_summary(directory: Path) -> dict[str, Any]:
    card = json.loads((directory / "card.json").read_text())
    training = card.get("training", {})
    return {
        "version": card["version"],
        "train_rows": card["data"]["train_rows"],
        "best_epoch": training.get("best_epoch"),
        "training_seconds": training.get("seconds"),
        "command": card.get("command"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "flywheel")
    parser.add_argument(
        "--gen0", type=Path, help="generation 0 (default: <workdir>/gen0, copied from models/student)"
    )
    parser.add_argument("--fresh", action="store_true", help="relabel the buffer and retrain generation 1")
    parser.add_argument(
        "--per-language", type=int, default=20_000, help="traffic rows replayed per locale file, at most"
    )
    parser.add_argument(
        "--skip-per-language",
        type=int,
        default=GEN0_TRAFFIC_PER_FILE,
        help="rows of each locale file passed over: those generation 0 was trained on",
    )
    parser.add_argument(
        "--holdout-per-language", type=int, default=300, help="held-back rows scored per locale file"
    )
    datasets = ROOT / ".cache" / "datasets"
    parser.add_argument(
        "--train-data", type=Path, nargs="*", default=[datasets / "dev", datasets / "traffic"],
        help="datasets generation 1 trains on besides the buffer's: generation 0's own",
    )  # fmt: skip
    parser.add_argument("--traffic-dataset", type=Path, default=datasets / "traffic",
                        help="teacher logits of the traffic, where labelled already")  # fmt: skip
    parser.add_argument("--recipe", default=RECIPE, help="intent-worker train options for generation 1")
    parser.add_argument(
        "--from-scratch", action="store_true", help="train generation 1 without --init-from generation 0"
    )
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--labeller-entries", type=int, default=3000)
    parser.add_argument(
        "--kills", type=int, default=6, help="labellers killed at random points (0: skip step 2)"
    )
    parser.add_argument("--switch-rate", type=float, default=300.0)
    parser.add_argument("--result", default="flywheel", help="benchmarks/results/<name>.json")
    args = parser.parse_args()
    work: Path = args.workdir.resolve()  # the services run in directories of their own
    gen0: Path = (args.gen0 or work / "gen0").resolve()
    dataset, gen1 = work / "dataset", work / "gen1"
    if args.fresh:
        for path in (dataset, gen1):
            shutil.rmtree(path, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (gen0 / "card.json").exists():
        shutil.copytree(ROOT / "models" / "student", gen0)
    for path in args.train_data:
        if not (path / "manifest.json").exists():
            raise SystemExit(f"no dataset at {path}: run `make corpus traffic` first")
    registry = work / "registry"
    shutil.rmtree(registry, ignore_errors=True)  # every demo starts serving generation 0
    replayed, held_back = traffic_rows(
        args.shared / "traffic", args.per_language, args.holdout_per_language, skip=args.skip_per_language
    )
    recipe = args.recipe.split() + ([] if args.from_scratch else ["--init-from", str(gen0)])
    result: dict[str, Any] = {
        "machine": machine(),
        "recipe": " ".join(recipe),
        "train_data": [str(p) for p in args.train_data],
        "per_language": args.per_language,
        "skip_per_language": args.skip_per_language,
    }
    started = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, began: float) -> None:
        steps[name] = round(time.perf_counter() - began, 1)

    with broker(work / "tansu", partitions=4) as kafka, start_redis(work / "valkey") as valkey:
        client = redis.Redis.from_url(valkey.url)
        env = worker_env(
            {
                "INTENT_KAFKA_BOOTSTRAP": kafka.bootstrap,
                "INTENT_REDIS_URL": valkey.url,
                "INTENT_REDIS_KEY_PREFIX": PREFIX,
                "INTENT_REGISTRY_DIR": str(registry),
                "INTENT_STUDENT_DIR": str(gen0),
                "INTENT_RUN_DIR": str(work / "run"),
            }
        )
        worker = WorkerProcess(
            kafka=kafka.bootstrap, redis=valkey.url, run_dir=work / "run", group=GROUP, student=gen0,
            partitions=4, extra={**DEMO_SAMPLING, "INTENT_REGISTRY_DIR": str(registry), "INTENT_REDIS_KEY_PREFIX": PREFIX},
        )  # fmt: skip
        with worker:
            worker.wait_healthy()
            began = time.perf_counter()
            print(f"1. replaying {len(replayed)} traffic rows through a worker serving gen 0", flush=True)
            result["replay"] = replay(kafka.bootstrap, worker, replayed, client)
            print(json.dumps(result["replay"]), flush=True)
            step("replay", began)
            if args.kills > 0:
                began = time.perf_counter()
                entries = client.xrange(buffer_key(PREFIX))
                chosen = random.Random(0).sample(entries, min(args.labeller_entries, len(entries)))
                print("2. labeller throughput at 1 and 2 threads; two labellers at once; kill -9", flush=True)
                result["labeller_throughput"] = labeller_throughput(client, env, work, chosen)
                print(json.dumps(result["labeller_throughput"]), flush=True)
                result["two_labellers"] = parallel_labellers(client, env, work, chosen)
                print(json.dumps(result["two_labellers"]), flush=True)
                result["crash_test"] = crash_test(client, env, work, chosen, args.kills)
                print(
                    json.dumps({k: v for k, v in result["crash_test"].items() if k != "points"}), flush=True
                )
                step("labeller_checks", began)
            began = time.perf_counter()
            print("3. labelling the buffer", flush=True)
            if not (dataset / "manifest.json").exists():
                done = cli(
                    ["--log-json", "label", "--once", "--data", str(dataset), "--consumer", "demo"], env
                )
                result["labelling"] = label_report(done)
                (work / "labelling.json").write_text(json.dumps(result["labelling"]))
            else:  # labelled by an earlier run of this script (same rows unless --per-language changed)
                earlier = work / "labelling.json"
                result["labelling"] = {
                    "reused_from_earlier_run": str(dataset),
                    **(json.loads(earlier.read_text()) if earlier.exists() else {}),
                }
                client.delete(buffer_key(PREFIX))
            result["dataset"] = json.loads(cli(["dataset", "stats", str(dataset), "--json"], env).stdout)
            step("label", began)
            began = time.perf_counter()
            print("4. training generation 1 on the buffer dataset + generation 0's datasets", flush=True)
            if not (gen1 / "card.json").exists():
                cli(
                    ["train", *recipe, "--threads", str(args.train_threads),
                     "--data", str(dataset), *map(str, args.train_data), "--out", str(gen1)],
                    env, capture=False,
                )  # fmt: skip
            result["generations"] = {"gen0": card_summary(gen0), "gen1": card_summary(gen1)}
            step("train", began)
            began = time.perf_counter()
            print("5. gate + promote generation 1, then roll back, under steady traffic", flush=True)
            result["switch"] = switch(kafka.bootstrap, worker, env, gen1, work, replayed, args.switch_rate)
            print(
                json.dumps({k: v for k, v in result["switch"].items() if k != "promote_stdout"}, indent=1),
                flush=True,
            )
            result["worker_log_events"] = [
                e for e in worker.log_events() if e.get("event") in ("model_reloaded", "model_reload_failed")
            ]
            step("gate_promote_rollback", began)
    gate = json.loads((work / "gate-gen1.json").read_text())
    result["gate"] = {"promote": gate["promote"], "reasons": gate["reasons"],
                      "checks": {c["name"]: c["passed"] for c in gate["checks"]}}  # fmt: skip
    result["golden"] = golden_table(gate)
    began = time.perf_counter()
    print("6. the gate in reverse: gen 0 as a candidate against gen 1 (dry run)", flush=True)
    reverse = cli(
        ["promote", str(gen0), "--dry-run", "--out", str(work / "gate-gen0-vs-gen1.json")],
        worker_env({"INTENT_REGISTRY_DIR": str(work / "no-registry"), "INTENT_STUDENT_DIR": str(gen1)}),
        check=False,
    )
    print(reverse.stdout, flush=True)
    report = work / "gate-gen0-vs-gen1.json"
    result["gate_reverse"] = {
        "exit": reverse.returncode,
        "reasons": json.loads(report.read_text())["reasons"] if report.exists() else None,
        "stderr": reverse.stderr[-1500:] if not report.exists() else "",
    }
    step("gate_reverse", began)
    began = time.perf_counter()
    print(f"7. agreement per language on {len(held_back)} held-back traffic rows", flush=True)
    result["held_back_traffic"] = held_back_agreement(
        held_back, {"gen0": gen0, "gen1": gen1}, args.traffic_dataset
    )
    print(json.dumps({k: v for k, v in result["held_back_traffic"].items() if k != "n"}), flush=True)
    step("held_back_eval", began)
    result["step_seconds"] = steps
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = write_result(args.result, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
