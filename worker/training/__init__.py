"""Students and their distillation: vocabulary pruning, architectures, training, export.

Torch is needed only here and comes with the ``train`` extra; `require_torch` names it.
"""

from __future__ import annotations

from types import ModuleType

from worker.errors import MissingExtra


def require_torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:
        raise MissingExtra("train", "torch") from exc
    return torch
