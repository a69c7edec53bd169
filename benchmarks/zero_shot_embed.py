"""Validation-text embeddings for the zero-shot benchmark, computed once and cached.

The machine has two busy cores, so every validation text goes through the e5 encoder once
per prefix (``query: `` and ``passage: ``); every arrangement of the zero-shot teacher is then
numpy on these arrays. Cache: ``.cache/zero_shot/<set>-<prefix>-<hash>.npy``, where the hash
covers the encoder cache key, the prefix and the texts.
    .venv/bin/python benchmarks/zero_shot_embed.py      # fills the cache (zero_shot.py does too)
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

_HERE = str(Path(__file__).resolve().parent)
while _HERE in sys.path:
    sys.path.remove(_HERE)
import worker  # noqa: F401
from worker.config import REPO_ROOT, Settings
from worker.teacher.build import ensure_encoder
from worker.teacher.e5format import default_weights_path
from worker.teacher.runtime import OnnxSequenceModel

CACHE = REPO_ROOT / ".cache" / "zero_shot"
PREFIXES = {"query": "query: ", "passage": "passage: "}
Array = npt.NDArray[np.float32]


class CachedEncoder:
    """The e5 encoder without a built-in prefix, with an on-disk cache of whole text sets."""

    def __init__(self, settings: Settings, threads: int = 1) -> None:
        files = ensure_encoder(settings.cache_dir, default_weights_path(), settings.teacher_max_length)
        self.key = files.key
        self._files = files
        self._threads = threads
        self._model: OnnxSequenceModel | None = None

    @property
    def model(self) -> OnnxSequenceModel:
        if self._model is None:
            self._model = OnnxSequenceModel(
                self._files.encoder,
                self._files.tokenizer,
                output="embedding",
                threads=self._threads,
                prefix="",
            )
        return self._model

    def embed(self, name: str, texts: list[str], prefix: str) -> Array:
        digest = hashlib.sha256(json.dumps([self.key, prefix, texts]).encode()).hexdigest()[:16]
        tag = prefix.strip().rstrip(":") or "none"
        path = CACHE / f"{name}-{tag}-{digest}.npy"
        if path.exists():
            return np.load(path)
        started = time.perf_counter()
        values = self.model.run([prefix + t for t in texts])
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, values)
        tmp.replace(path)
        print(f"embedded {name} ({len(texts)} texts, {prefix!r}) in {time.perf_counter() - started:.0f} s")
        return values


def main() -> None:
    from worker.data.corpora import (
        load_labelled,
        massive_files,
        require_shared_data,
        shared_mapping,
        xsid_files,
    )

    settings = Settings()
    shared = require_shared_data(settings.shared_data_dir)
    mapping = shared_mapping(shared)
    encoder = CachedEncoder(settings)
    for name, files in (("massive", massive_files(shared)), ("xsid", xsid_files(shared))):
        data = load_labelled(files, mapping, split="validation")
        for prefix in PREFIXES.values():
            encoder.embed(name, data.texts, prefix)


if __name__ == "__main__":
    main()
