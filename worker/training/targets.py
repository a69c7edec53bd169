"""What a training row is pulled towards beyond its teacher logits.

- `disagreement_weights`: a loss weight per row from how far a student (usually the one serving)
  is from the teacher there, so the next student learns most where the last one was wrong.
- `embedding_loss`: the teacher's sentence embedding as a second target (the me5s card's pair
  of MSE and cosine), on a projection of the student's features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from worker.training import require_torch

if TYPE_CHECKING:
    from worker.training.distil import Example, TrainConfig

torch = require_torch()
F = torch.nn.functional
Logits = npt.NDArray[np.float32]


def disagreement_weights(
    examples: Iterable[Example], student_logits: Callable[[Sequence[str]], Logits], config: TrainConfig
) -> tuple[dict[str, float], dict[str, float]]:
    """A loss weight per training row from how far ``student_logits`` is from its teacher logits.

    The distance is KL(teacher || student) of the softmaxed logits. ``w = 1 + alpha *
    min(KL / mean KL, cap)``, scaled to a mean of 1 over the rows. The cap keeps a few rows
    (often noise the teacher itself is unsure of) from taking over the loss. Returns the weights
    by row id and a summary (mean KL, the share of rows whose top label differs, weight
    quantiles) for the card.
    """
    rows = [e for e in examples if isinstance(e.target, np.ndarray)]
    if not rows:
        return {}, {"rows": 0}
    chunk = 4096
    kl = np.empty(len(rows), np.float64)
    disagree = np.empty(len(rows), bool)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        teacher = np.stack([np.asarray(e.target, np.float32) for e in part]).astype(np.float64)
        student = np.asarray(student_logits([e.text for e in part]), np.float64)
        p_log = teacher - _logsumexp(teacher)
        q_log = student - _logsumexp(student)
        kl[start : start + len(part)] = (np.exp(p_log) * (p_log - q_log)).sum(axis=1)
        disagree[start : start + len(part)] = teacher.argmax(axis=1) != student.argmax(axis=1)
    mean_kl = float(kl.mean())
    relative = np.minimum(kl / max(mean_kl, 1e-12), config.disagreement_cap)
    raw = 1.0 + config.disagreement_alpha * relative
    weights = raw / raw.mean()
    summary = {
        "rows": float(len(rows)),
        "mean_kl": round(mean_kl, 5),
        "top_label_disagreement": round(float(disagree.mean()), 5),
        **{f"weight_q{q}": round(float(np.quantile(weights, q / 100)), 4) for q in (1, 50, 90, 99)},
        "weight_max": round(float(weights.max()), 4),
    }
    return {e.row_id: float(w) for e, w in zip(rows, weights, strict=True)}, summary


def _logsumexp(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    top = x.max(axis=1, keepdims=True)
    result: npt.NDArray[np.float64] = top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))
    return result


def embedding_loss(projected: Any, batch: list[Example]) -> Any:
    """MSE (summed over dimensions) + (1 - cosine) between the projection and the teacher's
    (unit-length) embedding, averaged over the rows that have one (0 when none has).

    The MSE is on the projection as it is, not normalised: on two unit vectors it would only
    repeat the cosine term (``|a - b|^2 = 2 - 2 cos``); as it is, it also pulls the projection's
    length to 1. Each row counts with its loss weight (`disagreement_weights`), as in the logit term.
    """
    rows = [i for i, e in enumerate(batch) if e.embedding is not None]
    if not rows:
        return projected.sum() * 0.0
    target = torch.from_numpy(np.stack([np.asarray(batch[i].embedding, np.float32) for i in rows]))
    target = target.to(projected.device)
    weight = torch.tensor([batch[i].weight for i in rows], dtype=torch.float32, device=projected.device)
    mine = projected[rows]
    per_row = ((mine - target) ** 2).sum(dim=1) + (1.0 - F.cosine_similarity(mine, target, dim=1))
    return (per_row * weight).mean()
