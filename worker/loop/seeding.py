"""Seeding: label rows from JSONL files with the teacher into a distillation dataset.

The development corpus and ``corpus build`` start here; the Redis-fed labelling job
(:mod:`worker.loop.labelling`) names its shards the same way (:func:`shard_name`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import structlog

from worker.data.corpora import read_jsonl
from worker.loop.dataset import DatasetWriter, ShardRows
from worker.teacher import Teacher

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SourceRow:
    id: str
    text: str
    locale: str
    source: str


def rows_from_files(
    paths: Iterable[Path],
    split: str | None,
    with_translations: bool,
    per_file: int | None = None,
    skip_per_file: int = 0,
) -> Iterator[SourceRow]:
    """Texts of ``split`` rows (rows without a split always count), plus each row's ``en``
    translation when asked (Tatoeba pairs carry one); at most ``per_file`` rows of each file
    (its first ones: the shared files are shuffled), translations not counted. The first
    ``skip_per_file`` rows of each file are passed over: the rows after what an earlier
    ``per_file`` took."""
    for path in paths:
        seen = 0
        taken = 0
        for row in read_jsonl(path):
            if split is not None and row.get("split", split) != split:
                continue
            seen += 1
            if seen <= skip_per_file:
                continue
            if per_file is not None and taken >= per_file:
                break
            taken += 1
            rid = str(row.get("id", ""))
            yield SourceRow(rid, str(row["text"]), str(row.get("locale", "")), path.name)
            if with_translations and isinstance(row.get("en"), str):
                yield SourceRow(f"{rid}:en", str(row["en"]), "en", f"{path.name}:en")


def shard_name(teacher: Teacher, keys: Iterable[str]) -> str:
    """A shard's identity: the teacher that labelled it and the entries it covers."""
    digest = hashlib.sha256(teacher.identity.encode())
    for key in keys:
        digest.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:20]


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
        name = shard_name(teacher, (f"{r.id}\0{r.text}" for r in chunk))
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
