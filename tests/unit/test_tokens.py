"""Padding token-id batches."""

from __future__ import annotations

from worker.models.onnx import pad_batch


def test_rows_are_right_padded_with_a_mask() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_max_length_cuts_and_empty_rows_stay_valid() -> None:
    ids, mask = pad_batch([[1, 2, 3, 4], []], pad_id=0, max_length=2)
    assert ids.tolist() == [[1, 2], [0, 0]] and mask.tolist() == [[1, 1], [0, 0]]
    ids, mask = pad_batch([[]], pad_id=0)
    assert ids.shape == (1, 1) and mask.sum() == 0
