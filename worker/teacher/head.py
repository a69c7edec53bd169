"""The teacher's classification head: an MLP on the frozen e5 sentence embedding.

Trained in numpy (no torch) with Adam and cross-entropy. The head may score finer classes
than the label set (e.g. MASSIVE's intents) and fold them into labels by summing member
probabilities; see `HeadWeights`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.errors import ModelError
from worker.teacher.onnx_graph import HeadWeights

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 512
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    seed: int = 0


def _relu(x: Array) -> Array:
    return np.maximum(x, 0.0)


def forward(head: HeadWeights, embeddings: Array) -> Array:
    """Label logits for ``embeddings`` [n, H]; mirrors the ONNX head exactly."""
    x: Array = embeddings.astype(np.float32)
    for i, (w, b) in enumerate(head.layers):
        x = np.asarray(x @ w + b, dtype=np.float32)
        if i < len(head.layers) - 1:
            x = _relu(x)
    if head.groups is None:
        return x
    z = x - x.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    membership = np.zeros((len(head.groups), head.n_labels), dtype=np.float32)
    membership[np.arange(len(head.groups)), head.groups] = 1.0
    log_probs = np.log(np.maximum(p @ membership, 1e-30))
    centred: Array = (log_probs - log_probs.mean(axis=1, keepdims=True)).astype(np.float32)
    return centred


def train_head(
    embeddings: Array,
    targets: npt.NDArray[np.int64],
    n_classes: int,
    groups: npt.NDArray[np.int64] | None,
    n_labels: int,
    config: HeadConfig,
) -> HeadWeights:
    """Fit a softmax classifier over ``n_classes`` targets with cross-entropy.

    ``config.hidden`` > 0 gives one ReLU hidden layer (dropout after it); 0 gives a linear
    (multinomial logistic regression) head.
    """
    rng = np.random.default_rng(config.seed)
    n, dim = embeddings.shape
    width = config.hidden or dim
    params: list[Array] = []
    if config.hidden:
        params += [
            (rng.standard_normal((dim, width)) * np.sqrt(2.0 / dim)).astype(np.float32),
            np.zeros(width, np.float32),
        ]
    params += [
        (rng.standard_normal((width, n_classes)) * np.sqrt(1.0 / width)).astype(np.float32),
        np.zeros(n_classes, np.float32),
    ]
    moments = [np.zeros_like(p) for p in params]
    velocities = [np.zeros_like(p) for p in params]
    beta1, beta2, step = 0.9, 0.999, 0
    steps_total = config.epochs * int(np.ceil(n / config.batch_size))
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            x, y = embeddings[idx], targets[idx]
            w_out, b_out = params[-2], params[-1]
            if config.hidden:
                h_pre = x @ params[0] + params[1]
                keep = (rng.random(h_pre.shape) >= config.dropout).astype(np.float32) / (1 - config.dropout)
                h = _relu(h_pre) * keep
            else:
                h = x
            z = h @ w_out + b_out
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            dz = p
            dz[np.arange(len(y)), y] -= 1.0
            dz /= len(y)
            grads = [h.T @ dz, dz.sum(axis=0)]
            if config.hidden:
                dh = (dz @ w_out.T) * keep * (h_pre > 0)
                grads = [x.T @ dh, dh.sum(axis=0), *grads]
            step += 1
            # Cosine decay keeps the last epochs from wandering.
            lr = config.learning_rate * 0.5 * (1 + np.cos(np.pi * step / steps_total))
            for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
                if param.ndim == 2:
                    grad = grad + config.weight_decay * param
                moments[i] = beta1 * moments[i] + (1 - beta1) * grad
                velocities[i] = beta2 * velocities[i] + (1 - beta2) * grad * grad
                m_hat = moments[i] / (1 - beta1**step)
                v_hat = velocities[i] / (1 - beta2**step)
                param -= (lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)
    layers = tuple((params[i], params[i + 1]) for i in range(0, len(params), 2))
    return HeadWeights(layers=layers, groups=groups, n_labels=n_labels)


def save_head(head: HeadWeights, path: Path) -> None:
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for i, (w, b) in enumerate(head.layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    if head.groups is not None:
        arrays["groups"] = head.groups
    arrays["n_labels"] = np.array(head.n_labels, dtype=np.int64)
    with path.open("wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]


def load_head(path: Path) -> HeadWeights:
    try:
        with np.load(path) as npz:
            n_layers = sum(1 for key in npz.files if key.startswith("w"))
            layers = tuple(
                (npz[f"w{i}"].astype(np.float32), npz[f"b{i}"].astype(np.float32)) for i in range(n_layers)
            )
            groups = npz["groups"].astype(np.int64) if "groups" in npz.files else None
            n_labels = int(npz["n_labels"])
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"teacher head {path} is unreadable: {exc}") from exc
    return HeadWeights(layers=layers, groups=groups, n_labels=n_labels)


def head_digest(head: HeadWeights, labels: tuple[str, ...]) -> str:
    """A content hash of the head and its label list: the head's identity in caches."""
    digest = hashlib.sha256(json.dumps(list(labels)).encode())
    for w, b in head.layers:
        digest.update(np.ascontiguousarray(w).tobytes())
        digest.update(np.ascontiguousarray(b).tobytes())
    if head.groups is not None:
        digest.update(head.groups.tobytes())
    return digest.hexdigest()
