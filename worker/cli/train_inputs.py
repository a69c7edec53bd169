"""What ``intent-worker train`` checks and builds beyond its arguments: the lever flags a
student would ignore, and the teacher's sentence embeddings for ``--embedding-weight`` /
``--cosine``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.errors import WorkerError


def check_levers(args: argparse.Namespace) -> None:
    """Refuse lever flags that the chosen student or objective would silently ignore."""
    if args.disagreement_student is not None and (args.supervised or args.arch == "pruned"):
        raise WorkerError("--disagreement-student weighs distillation rows of cnn and bag students only")
    if args.disagreement_alpha < 0:
        raise WorkerError("--disagreement-alpha must be 0 or more")
    if args.embedding_weight < 0:
        raise WorkerError("--embedding-weight must be 0 or more")
    if args.embedding_weight > 0 and (args.supervised or args.arch == "pruned"):
        raise WorkerError(
            "--embedding-weight is for distilling cnn and bag students (the pruned one has --cosine)"
        )
    if args.table_bits and args.arch == "pruned":
        raise WorkerError(
            "--table-bits is for cnn and bag students: the pruned one keeps the teacher's own "
            "rows, which it always stores at the teacher's 4 bits"
        )
    if args.keep_characters and args.arch == "pruned":
        raise WorkerError(
            "--keep-characters is for cnn and bag students: the pruned one keeps --min-count's pieces"
        )
    if args.table_epochs < 1:
        raise WorkerError("--table-epochs must be 1 or more")
    if args.init_from is not None and args.arch == "pruned":
        raise WorkerError(
            "--init-from warm-starts cnn and bag students (the pruned one starts from the teacher)"
        )
    if args.epochs is not None and args.epochs < (0 if args.init_from is not None else 1):
        raise WorkerError(
            "--epochs must be 1 or more (0 only with --init-from: keep its weights as they are)"
        )


def check_embedding_teacher(datasets: Sequence[Path], prefix: str) -> None:
    """The sentence embeddings come from the embedded e5 encoder: refuse datasets another teacher
    labelled, whose logits that embedding would not match."""
    from worker.loop.dataset import read_manifest

    for directory in datasets:
        teacher = str(read_manifest(directory).get("teacher", {}).get("id", ""))
        if not teacher.startswith(prefix):
            raise WorkerError(
                f"--embedding-weight targets the embedded e5 teacher's sentence embedding, but "
                f"{directory} was labelled by {teacher or 'an unnamed teacher'}"
            )


def teacher_embedder(settings: Settings, threads: int) -> Callable[[Sequence[str]], Any]:
    """texts -> the embedded teacher's sentence embeddings, cached on disk 8,192 texts at a time,
    so a long embedding pass that is stopped resumes where it was (for the same list of texts:
    the chunks are keyed by their texts, so another ``--fraction`` misses the cache)."""
    from tqdm import tqdm

    from worker.teacher import load_embedded_encoder
    from worker.teacher.fit import embed_cached

    encoder = load_embedded_encoder(settings.model_copy(update={"teacher_threads": threads}))
    tag = f"{encoder.model_path}:{encoder.max_length}"
    chunk = 8192

    def embed(texts: Sequence[str]) -> Any:
        import numpy as np

        out: Any = None
        with tqdm(total=len(texts), unit="utt", desc="teacher embeddings") as bar:
            for start in range(0, len(texts), chunk):
                part = embed_cached(encoder, list(texts[start : start + chunk]), settings.cache_dir, tag)
                if out is None:
                    out = np.empty((len(texts), part.shape[1]), np.float32)
                out[start : start + len(part)] = part
                bar.update(len(part))
        return out if out is not None else np.zeros((0, 0), np.float32)

    return embed
