"""Build the embedded teacher's files once and cache them, keyed by a content hash.

Cache layout, under ``<cache_dir>/teacher/<key>/`` where ``key`` hashes the builder version,
the e5 weight file and the tokenizer length limit:

    encoder.weights   float32 tensors, external data shared by every graph below
    encoder.onnx      input_ids, attention_mask -> embedding
    tokenizer.json    the rebuilt XLM-R Unigram tokenizer
    head-<h>.onnx     the encoder plus the head with content hash <h>: -> logits, embedding
    manifest.json     sha256 and size of every file above

A second build with the same inputs only verifies the manifest. A file whose hash no longer
matches is reported and the whole entry is rebuilt. Builds write to a temporary directory and
rename it into place, so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from worker.errors import CacheError
from worker.teacher.e5format import E5File, sha256_file
from worker.teacher.onnx_graph import HeadWeights, attach_head, build_encoder
from worker.teacher.tokenizer import build_tokenizer

# Bump when the graph or tokenizer construction changes: it invalidates every cache entry.
BUILDER_VERSION = "e5-onnx-1"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EncoderFiles:
    """Paths of a verified cache entry."""

    directory: Path
    key: str
    source_sha256: str

    @property
    def encoder(self) -> Path:
        return self.directory / "encoder.onnx"

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"

    def head_graph(self, head_hash: str) -> Path:
        return self.directory / f"head-{head_hash[:16]}.onnx"


def cache_key(source_sha256: str, max_length: int) -> str:
    material = json.dumps([BUILDER_VERSION, source_sha256, max_length]).encode()
    return hashlib.sha256(material).hexdigest()[:20]


def _read_manifest(directory: Path) -> dict[str, dict[str, object]]:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def _write_manifest(directory: Path, files: dict[str, dict[str, object]], meta: dict[str, object]) -> None:
    payload = json.dumps({**meta, "files": files}, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest.")
    with os.fdopen(fd, "w") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / "manifest.json")


def _file_record(path: Path) -> dict[str, object]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def verify(directory: Path, names: list[str] | None = None) -> list[str]:
    """Names of files in the entry that are missing or fail their recorded hash."""
    files = _read_manifest(directory)
    if not files:
        return ["manifest.json"]
    bad = []
    for name in names if names is not None else list(files):
        record = files.get(name)
        path = directory / name
        if (
            record is None
            or not path.exists()
            or path.stat().st_size != record.get("size")
            or sha256_file(path) != record.get("sha256")
        ):
            bad.append(name)
    return bad


def ensure_encoder(cache_dir: Path, e5_path: Path, max_length: int) -> EncoderFiles:
    """Return a verified cache entry for ``e5_path``, building it if missing or corrupt."""
    source_sha = sha256_file(e5_path)
    key = cache_key(source_sha, max_length)
    root = cache_dir / "teacher"
    directory = root / key
    base_files = ["encoder.weights", "encoder.onnx", "tokenizer.json"]
    if directory.exists():
        bad = verify(directory, base_files)
        if not bad:
            log.info("teacher_cache_hit", key=key, directory=str(directory))
            return EncoderFiles(directory, key, source_sha)
        log.warning("teacher_cache_corrupt", key=key, bad_files=bad)
        shutil.rmtree(directory)
    root.mkdir(parents=True, exist_ok=True)
    log.info("teacher_build_started", key=key, source=str(e5_path))
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
    try:
        import onnx

        e5 = E5File(e5_path)
        tokenizer = build_tokenizer(e5.vocab, max_length)
        tokenizer.no_padding()
        tokenizer.save(str(staging / "tokenizer.json"))
        model = build_encoder(e5, staging / "encoder.weights")
        onnx.save(model, str(staging / "encoder.onnx"))
        files = {name: _file_record(staging / name) for name in base_files}
        meta = {
            "key": key,
            "builder_version": BUILDER_VERSION,
            "source": str(e5_path),
            "source_sha256": source_sha,
            "max_length": max_length,
        }
        _write_manifest(staging, files, meta)
        try:
            staging.rename(directory)
        except OSError:
            # Another process finished the same build first; its entry is as good as ours.
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("teacher_build_finished", key=key, directory=str(directory))
    return EncoderFiles(directory, key, source_sha)


def ensure_head_graph(files: EncoderFiles, head: HeadWeights, head_hash: str) -> Path:
    """The encoder-plus-head graph for ``head``, written next to the shared weights."""
    import onnx

    path = files.head_graph(head_hash)
    name = path.name
    if path.exists() and not verify(files.directory, [name]):
        return path
    encoder = onnx.load(str(files.encoder), load_external_data=False)
    model = attach_head(encoder, head)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    manifest = json.loads((files.directory / "manifest.json").read_text())
    manifest["files"][name] = _file_record(path)
    meta = {k: v for k, v in manifest.items() if k != "files"}
    _write_manifest(files.directory, manifest["files"], meta)
    if verify(files.directory, [name]):
        raise CacheError(f"teacher head graph {path} failed verification right after writing")
    return path
