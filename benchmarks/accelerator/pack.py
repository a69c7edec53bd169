"""Pack what a lent accelerator machine needs to label and train there (run here, on the CPU).

The accelerator machine starts bare, reaches no network and takes at most 64 MiB of files, so
the job (`job.sh`) gets, in the git-ignored folder ``.gpu/``:

- ``e5.bin.gz``: the embedded teacher's weights with the embedding rows of every piece that
  no text of the job uses set to zero (the whole file is 72 MB; Q4 zeros compress to nothing).
  For the texts of the job the teacher is unchanged: the tokenizer keeps the whole vocabulary,
  and the job checks its logits against ``reference.npz`` before labelling anything.
- ``data.tar.gz``: the shared data the job reads (traffic, MASSIVE, Tatoeba, xSID, mappings),
  as it is; it lives only in ``.gpu/`` and on the lent machine, never in the repository.
- ``reference.npz``: the CPU teacher's logits for a sample of those texts.
- ``manifest.json``: the real teacher's identity and weights digest, which the job records.
- ``whl/``: wheels of the runtime packages that machine lacks (Python 3.12, x86-64).

Usage: ``.venv/bin/python benchmarks/accelerator/pack.py`` (about a minute).
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from worker.config import REPO_ROOT, Settings
from worker.teacher import E5_PREFIX, load_embedded_teacher
from worker.teacher.build import ensure_encoder
from worker.teacher.e5format import E5File, default_weights_path, sha256_file

OUT = REPO_ROOT / ".gpu"
FOLDERS = ("traffic", "massive", "tatoeba", "xsid", "mappings")
WHEELS = (
    "pydantic==2.*",
    "pydantic-core",
    "pydantic-settings",
    "annotated-types",
    "typing-inspection",
    "python-dotenv",
    "structlog",
    "typing-extensions",
)


def job_texts(shared: Path) -> list[str]:
    texts: list[str] = []
    for folder in ("traffic", "massive", "tatoeba"):
        for path in sorted((shared / folder).glob("*.jsonl")):
            for line in path.open(encoding="utf-8"):
                row = json.loads(line)
                texts += [row[k] for k in ("text", "en") if isinstance(row.get(k), str)]
    return texts


def slim_weights(source: Path, keep: np.ndarray, out: Path) -> None:
    """``source`` with the ``emb.word`` rows outside ``keep`` zeroed, gzip-compressed to ``out``."""
    e5 = E5File(source)
    entry = e5._tensors["emb.word"]
    data = bytearray(source.read_bytes())
    row_bytes = entry.nbytes // e5.config.embedding_rows
    table = np.frombuffer(data, dtype=np.uint8, count=entry.nbytes, offset=entry.offset).reshape(
        -1, row_bytes
    )
    drop = np.ones(len(table), dtype=bool)
    drop[keep] = False
    table[drop] = 0
    with gzip.open(out, "wb", compresslevel=6) as sink:
        sink.write(bytes(data))


def main() -> int:
    settings = Settings()
    shared = settings.shared_data_dir
    assert shared is not None and (shared / "traffic").is_dir(), f"no shared data at {shared}"
    OUT.mkdir(exist_ok=True)
    source = default_weights_path(settings.teacher_weights)
    files = ensure_encoder(settings.cache_dir, source, settings.teacher_max_length)
    tokenizer = Tokenizer.from_file(str(files.tokenizer))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=settings.teacher_max_length)
    texts = job_texts(shared)
    used: set[int] = set()
    for start in range(0, len(texts), 8192):
        for encoding in tokenizer.encode_batch([E5_PREFIX + t for t in texts[start : start + 8192]]):
            used.update(encoding.ids)
    e5 = E5File(source)
    used.update((e5.vocab.bos, e5.vocab.eos, e5.vocab.pad, e5.vocab.unk))
    keep = np.array(sorted(used), dtype=np.int64)
    print(f"{len(texts)} texts use {len(keep)} of {e5.config.embedding_rows} pieces", file=sys.stderr)
    slim_weights(source, keep, OUT / "e5.bin.gz")

    teacher = load_embedded_teacher(settings)
    sample = random.Random(0).sample(texts, 512)
    np.savez_compressed(
        OUT / "reference.npz", texts=np.array(sample, dtype=object), logits=teacher.logits(sample)
    )
    (OUT / "manifest.json").write_text(
        json.dumps(
            {
                "teacher_identity": teacher.identity,
                "encoder_key": files.key,
                "weights_sha256": sha256_file(source),
                "kept_pieces": len(keep),
                "texts": len(texts),
            },
            indent=2,
        )
    )
    with tarfile.open(OUT / "data.tar.gz", "w:gz") as tar:
        for folder in FOLDERS:
            tar.add(shared / folder, arcname=f"data/{folder}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp",
         "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
         "--platform", "manylinux_2_28_x86_64", "-d", str(OUT / "whl"), *WHEELS],
        check=True,
    )  # fmt: skip
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 1e6:8.1f} MB  {path.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
