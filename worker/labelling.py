"""Labelling: run the teacher over texts and write distillation datasets.

`label_files` seeds a dataset from JSONL files (the development corpus); the streaming
labelling job that drains the Redis buffer builds on the same writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import structlog

from worker.corpus import read_jsonl
from worker.dataset import DatasetWriter, ShardRows
from worker.teacher import Teacher

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SourceRow:
    id: str
    text: str
    locale: str
    source: str


def rows_from_files(paths: Iterable[Path], split: str | None, with_translations: bool) -> Iterator[SourceRow]:
    """Texts of ``split`` rows (rows without a split always count), plus each row's ``en``
    translation when asked (Tatoeba pairs carry one)."""
    for path in paths:
        for row in read_jsonl(path):
            if split is not None and row.get("split", split) != split:
                continue
            rid = str(row.get("id", ""))
            yield SourceRow(rid, str(row["text"]), str(row.get("locale", "")), path.name)
            if with_translations and isinstance(row.get("en"), str):
                yield SourceRow(f"{rid}:en", str(row["en"]), "en", f"{path.name}:en")


def label_rows(
    teacher: Teacher,
    rows: Iterable[SourceRow],
    writer: DatasetWriter,
    shard_rows: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Label ``rows`` in shards; a shard already in the dataset is skipped, not redone."""
    iterator = iter(rows)
    written = 0
    while chunk := list(islice(iterator, shard_rows)):
        # A shard's identity is the entries it covers and the teacher that labelled them.
        digest = hashlib.sha256(teacher.identity.encode())
        for row in chunk:
            digest.update(row.id.encode() + b"\0" + row.text.encode("utf-8", "surrogatepass") + b"\0")
        name = digest.hexdigest()[:20]
        if writer.has_shard(name):
            log.info("shard_exists", shard=name, rows=len(chunk))
        else:
            logits = teacher.logits([r.text for r in chunk])
            shard = ShardRows(
                ids=[r.id for r in chunk],
                texts=[r.text for r in chunk],
                locales=[r.locale for r in chunk],
                teacher_logits=list(logits),
                teacher_labels=[teacher.labels[int(i)] for i in np.argmax(logits, axis=1)],
                sources=[r.source for r in chunk],
            )
            writer.write_shard(name, shard)
            log.info("shard_written", shard=name, rows=len(chunk))
        written += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return written
