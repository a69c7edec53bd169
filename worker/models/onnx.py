"""Token-id batches for the ONNX sequence models: padding and attention masks, in one place."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int64]


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, max_length: int | None = None
) -> tuple[IdArray, IdArray]:
    """``input_ids`` and ``attention_mask`` [len(rows), longest], right-padded with ``pad_id``.

    Rows longer than ``max_length`` are cut; an empty row is all padding with a zero mask
    (the width is at least 1, so every model gets a valid tensor).
    """
    longest = max((len(row) for row in rows), default=0)
    if max_length is not None:
        longest = min(longest, max_length)
    longest = max(longest, 1)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for r, row in enumerate(rows):
        n = min(len(row), longest)
        input_ids[r, :n] = row[:n]
        mask[r, :n] = 1
    return input_ids, mask
