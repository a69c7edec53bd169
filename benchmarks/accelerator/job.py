"""The accelerator job: label the development corpus and all the traffic, then distil students.

Runs on the lent machine (`job.sh` sets it up from what `pack.py` packed), or anywhere with
``--device cpu`` and ``--per-file`` for a dry run. Steps, each timed into ``<out>/job.json``:

1. The teacher's torch twin (`worker.training.torch_teacher`) on ``--device``, checked
   against the CPU teacher's logits in ``.gpu/reference.npz``: the job stops if they differ.
2. Label MASSIVE train + Tatoeba (the `corpus build` default) into ``<work>/datasets/dev`` and
   every traffic row into ``<work>/datasets/traffic``, with the real teacher's identity.
3. ``intent-worker train --arch cnn --device ...`` on both datasets into ``<work>/students/cnn``,
   and beside it, at the same time, each ``--pruned`` layer spec as a distilled pruned transformer.

A dataset already labelled in ``<work>`` is not labelled again (its shards are skipped).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.config import Settings
from worker.data.corpora import massive_files
from worker.loop.dataset import DatasetWriter
from worker.loop.seeding import label_rows, rows_from_files
from worker.models.onnx import read_labels
from worker.teacher import E5_PREFIX
from worker.teacher.build import ensure_encoder
from worker.teacher.e5format import E5File, default_weights_path
from worker.teacher.head import load_head
from worker.training.torch_teacher import TorchTeacher

CNN = [
    "--arch", "cnn", "--embedding-dim", "256", "--kernels", "2,3,4,5", "--filters", "192",
    "--min-count", "3", "--patience", "3", "--plateau-factor", "0.5", "--min-delta", "0.002",
    "--batch-size", "256", "--lr", "0.0015", "--sparse-embeddings",
]  # fmt: skip


PART_BYTES = 15 << 20  # files coming back from the lent machine may be at most 16 MiB each


def _small(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Leave out checkpoints and the float export (``model.onnx`` is the float model when INT8 fails)."""
    return None if info.name.endswith((".pt", "fp32.onnx")) else info


def ship(directory: Path, out: Path) -> list[str]:
    """``directory`` as a gzipped tar in ``out``, cut into ``<name>.tgz.NN`` parts (``cat`` joins them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=directory.name, filter=_small)
    data = buffer.getvalue()
    names = []
    for n, start in enumerate(range(0, len(data), PART_BYTES)):
        part = out / f"{directory.name}.tgz.{n:02d}"
        part.write_bytes(data[start : start + PART_BYTES])
        names.append(part.name)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pack", type=Path, default=Path(".gpu"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the archives go")
    parser.add_argument("--per-file", type=int, default=None, help="rows per file (a dry run)")
    parser.add_argument("--cnn-epochs", type=int, default=12)
    parser.add_argument("--cnn-budget", type=float, default=240.0, help="seconds of CNN training")
    parser.add_argument("--pruned", nargs="*", default=[], help="layer specs, e.g. 0,11")
    parser.add_argument("--pruned-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    settings = Settings()
    report: dict[str, Any] = {"device": args.device, "steps": {}}
    args.work.mkdir(parents=True, exist_ok=True)

    def step(name: str, started: float, **facts: Any) -> None:
        report["steps"][name] = {"seconds": round(time.perf_counter() - started, 1), **facts}
        (args.out / "job.json").write_text(json.dumps(report, indent=2))
        print(f"job: {name} {report['steps'][name]}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = json.loads((args.pack / "manifest.json").read_text())
    weights = default_weights_path(settings.teacher_weights)
    files = ensure_encoder(settings.cache_dir, weights, settings.teacher_max_length)
    labels = read_labels(settings.teacher_dir / "labels.json")
    teacher = TorchTeacher(
        E5File(weights),
        files.tokenizer,
        load_head(settings.teacher_dir / "head.npz"),
        labels,
        manifest["teacher_identity"],
        device=args.device,
        prefix=E5_PREFIX,
        max_length=settings.teacher_max_length,
    )
    with np.load(args.pack / "reference.npz", allow_pickle=True) as ref:
        got = teacher.logits([str(t) for t in ref["texts"]])
        gap = float(np.abs(got - ref["logits"]).max())
        same = float(np.mean(got.argmax(1) == ref["logits"].argmax(1)))
    step("teacher", started, identity=teacher.identity, reference_max_abs_diff=gap, reference_same_label=same)
    if gap > 1e-3:
        raise SystemExit(f"the torch teacher differs from the CPU teacher by {gap}: stopping")

    shared = settings.shared_data_dir
    assert shared is not None
    datasets = args.work / "datasets"
    sources = {
        "dev": [*massive_files(shared), shared / "tatoeba" / "tatoeba.jsonl"],
        "traffic": sorted((shared / "traffic").glob("*.jsonl")),
    }
    for name, paths in sources.items():
        started = time.perf_counter()
        writer = DatasetWriter(
            datasets / name, teacher.identity, teacher.labels, label_set=teacher.label_set_id
        )
        rows = list(rows_from_files(paths, split="train", with_translations=True, per_file=args.per_file))
        n = label_rows(teacher, rows, writer)
        rate = round(n / (time.perf_counter() - started))
        step(f"label_{name}", started, rows=n, rows_per_s=rate, shipped=ship(datasets / name, args.out))

    # The students train side by side: each is bound by its CPU data pipeline, not the GPU.
    students = args.work / "students"
    threads = str(max(1, args.threads // (bool(args.cnn_epochs) + len(args.pruned))))
    common = ["--device", args.device, "--threads", threads]
    data = ["--data", str(datasets / "dev"), str(datasets / "traffic")]
    runs: dict[str, list[str]] = {}
    if args.cnn_epochs:
        runs["cnn"] = [*CNN, "--epochs", str(args.cnn_epochs), "--time-budget", str(args.cnn_budget)]
    for spec in args.pruned:
        runs[f"pruned-{spec.replace(',', '-')}"] = [
            "--arch", "pruned", "--layers", spec, "--mode", "distil", "--epochs", str(args.pruned_epochs),
            "--batch-size", "128", "--lr", "1e-4",
        ]  # fmt: skip
    started = time.perf_counter()
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "train",
                *options,
                *common,
                *data,
                "--out",
                str(students / name),
            ]
        )
        for name, options in runs.items()
    }
    for name, process in processes.items():
        code = process.wait()
        step(
            f"train_{name}", started, exit=code, shipped=ship(students / name, args.out) if code == 0 else []
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
