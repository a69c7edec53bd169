"""The numpy head trainer and its file format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.errors import ModelError
from worker.teacher.head import HeadConfig, forward, head_digest, load_head, save_head, train_head


def _blobs(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (4, 16))
    y = rng.integers(0, 4, n)
    x = centres[y] + rng.normal(0, 0.3, (n, 16))
    return x.astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("hidden", [0, 32])
def test_head_learns_separable_classes_and_folds_them_into_labels(hidden: int) -> None:
    x, y = _blobs()
    groups = np.array([0, 0, 1, 1])  # four fine classes, two labels
    head = train_head(
        x, y, 4, groups, 2, HeadConfig(hidden=hidden, epochs=30, batch_size=64, learning_rate=1e-2)
    )
    logits = forward(head, x)
    assert logits.shape == (600, 2)
    assert (logits.argmax(axis=1) == groups[y]).mean() > 0.98


def test_training_is_deterministic_for_a_seed() -> None:
    x, y = _blobs()
    config = HeadConfig(hidden=8, epochs=2, seed=3)
    a = train_head(x, y, 4, None, 4, config)
    b = train_head(x, y, 4, None, 4, config)
    assert head_digest(a, ("a", "b", "c", "d")) == head_digest(b, ("a", "b", "c", "d"))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    x, y = _blobs()
    head = train_head(x, y, 4, np.array([0, 1, 1, 0]), 2, HeadConfig(hidden=8, epochs=1))
    save_head(head, tmp_path / "head.npz")
    loaded = load_head(tmp_path / "head.npz")
    np.testing.assert_array_equal(forward(head, x), forward(loaded, x))
    assert head_digest(head, ("A", "B")) == head_digest(loaded, ("A", "B")) != head_digest(loaded, ("B", "A"))


def test_unreadable_head_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "head.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="unreadable"):
        load_head(tmp_path / "head.npz")
