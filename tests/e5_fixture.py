"""Writes tiny, random e5-format model files for fast tests, and a numpy reference encoder.

The writer follows the byte layout documented in `worker.teacher.e5format` independently
of the reader, and keeps the exact dequantised values so tests can check the reader.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

erf = np.vectorize(math.erf)

WORDS = [
    "hello",
    "world",
    "play",
    "music",
    "set",
    "an",
    "alarm",
    "what",
    "is",
    "my",
    "list",
    "query",
    "book",
    "table",
    "for",
    "two",
    "the",
    "weather",
    "today",
]


@dataclass
class TinyE5:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128
    max_positions: int = 64
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    tensors: dict[str, Array] = field(default_factory=dict)  # dequantised values
    quantised: set[str] = field(default_factory=set)


def _pieces() -> tuple[list[str], list[float]]:
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁", ":", "."]
    chars = sorted({c for w in WORDS for c in w})
    pieces += chars + ["▁" + c for c in chars]
    pieces += ["▁" + w for w in WORDS] + WORDS[:5]
    scores = [0.0, 0.0, 0.0, 0.0] + [-2.0 - 0.01 * i for i in range(len(pieces) - 4)]
    return pieces, scores


def _q4_blocks(rng: np.random.Generator, rows: int, cols: int, scale: float) -> tuple[bytes, Array]:
    nb = cols // 32
    d = (rng.uniform(0.5, 1.5, size=(rows, nb)) * scale).astype(np.float16)
    qs = rng.integers(0, 256, size=(rows, nb, 16), dtype=np.uint8)
    low = (qs & 0x0F).astype(np.float32) - 8
    high = (qs >> 4).astype(np.float32) - 8
    values = np.concatenate([low, high], axis=-1) * d.astype(np.float32)[..., None]
    raw = bytearray()
    for r in range(rows):
        for b in range(nb):
            raw += struct.pack("<e", float(d[r, b])) + qs[r, b].tobytes()
    return bytes(raw), values.reshape(rows, cols).astype(np.float32)


def write_tiny_e5(path: Path, seed: int = 0) -> TinyE5:
    rng = np.random.default_rng(seed)
    m = TinyE5()
    m.pieces, m.scores = _pieces()
    h, ff = m.hidden, m.ffn
    payloads: list[tuple[str, int, int, bytes]] = []  # name, dtype, count, bytes

    def f32(name: str, array: Array) -> None:
        array = array.astype(np.float32)
        m.tensors[name] = array
        payloads.append((name, 0, array.size, array.tobytes()))

    def q4(name: str, rows: int, cols: int, scale: float) -> None:
        raw, values = _q4_blocks(rng, rows, cols, scale)
        m.tensors[name] = values
        m.quantised.add(name)
        payloads.append((name, 1, rows * cols, raw))

    q4("emb.word", len(m.pieces) + 3, h, 0.05)  # +3 padding rows, like the real file
    f32("emb.pos", rng.normal(0, 0.05, (m.max_positions, h)))
    f32("emb.type", rng.normal(0, 0.05, (2, h)))
    f32("emb.ln.w", 1 + rng.normal(0, 0.05, h))
    f32("emb.ln.b", rng.normal(0, 0.05, h))
    for i in range(m.layers):
        for name, rows, cols in (
            ("q", h, h),
            ("k", h, h),
            ("v", h, h),
            ("ao", h, h),
            ("fi", ff, h),
            ("fo", h, ff),
        ):
            q4(f"l{i}.{name}.w", rows, cols, 0.02)
            f32(f"l{i}.{name}.b", rng.normal(0, 0.05, rows))
        for ln in ("aln", "oln"):
            f32(f"l{i}.{ln}.w", 1 + rng.normal(0, 0.05, h))
            f32(f"l{i}.{ln}.b", rng.normal(0, 0.05, h))

    blob = b"".join(p.encode() for p in m.pieces)
    offsets = np.cumsum([0] + [len(p.encode()) for p in m.pieces]).astype("<u4")
    # Normalisation map: tab -> space, U+0001 deleted (as in the real file).
    norm = struct.pack("<IB", 9, 1) + struct.pack("<I", 32) + struct.pack("<IB", 1, 0)
    header = b"E5S1" + struct.pack("<I", 1)
    header += struct.pack("<7i", h, m.layers, m.heads, ff, len(m.pieces) + 3, m.max_positions, 2)
    header += struct.pack("<fi", 1e-12, 32)
    header += struct.pack("<5iQ", len(m.pieces), 0, 2, 1, 3, len(blob))
    body = header + offsets.tobytes() + np.array(m.scores, "<f4").tobytes() + blob
    body += struct.pack("<iI", 2, len(norm)) + norm
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in payloads)
    offset = len(body) + directory_size
    directory = struct.pack("<i", len(payloads))
    data = b""
    for name, dtype, count, raw in payloads:
        directory += (
            struct.pack("<H", len(name))
            + name.encode()
            + struct.pack("<BIQQ", dtype, count, offset + len(data), len(raw))
        )
        data += raw
    path.write_bytes(body + directory + data)
    return m


def _layer_norm(x: Array, w: Array, b: Array) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * w + b


def reference_embedding(m: TinyE5, ids: list[int]) -> Array:
    """The encoder's L2-normalised mean-pooled embedding of one sequence, in float64 numpy."""
    t = {k: v.astype(np.float64) for k, v in m.tensors.items()}
    n = len(ids)
    x = t["emb.word"][ids] + t["emb.pos"][:n] + t["emb.type"][0]
    x = _layer_norm(x, t["emb.ln.w"], t["emb.ln.b"])
    hd = m.hidden // m.heads
    for i in range(m.layers):

        def lin(v: Array, name: str, i: int = i) -> Array:
            return v @ t[f"l{i}.{name}.w"].T + t[f"l{i}.{name}.b"]

        q, k, v = (lin(x, s).reshape(n, m.heads, hd).transpose(1, 0, 2) for s in ("q", "k", "v"))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, m.hidden)
        x = _layer_norm(x + lin(ctx, "ao"), t[f"l{i}.aln.w"], t[f"l{i}.aln.b"])
        hmid = lin(x, "fi")
        gelu = 0.5 * hmid * (1 + erf(hmid / np.sqrt(2)))
        x = _layer_norm(x + lin(gelu, "fo"), t[f"l{i}.oln.w"], t[f"l{i}.oln.b"])
    pooled = x.mean(0)
    return (pooled / np.linalg.norm(pooled)).astype(np.float32)
