"""A one-shard distillation dataset written by the real `DatasetWriter`, for trainer tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.loop.dataset import DatasetWriter, ShardRows


def write_dataset(
    path: Path, texts: Sequence[str], logits: npt.NDArray[np.float32], labels: Sequence[str]
) -> Path:
    """``texts`` with the teacher ``logits`` (one row each), all English, ids ``r0``, ``r1``..."""
    writer = DatasetWriter(path, "teacher@test", tuple(labels))
    writer.write_shard(
        "a",
        ShardRows(
            ids=[f"r{i}" for i in range(len(texts))],
            texts=list(texts),
            locales=["en"] * len(texts),
            teacher_logits=list(logits),
            teacher_labels=[labels[int(i)] for i in logits.argmax(1)],
            sources=["test"] * len(texts),
        ),
    )
    return path
