"""Student architectures (torch). Both map ``input_ids, attention_mask -> logits``, and offer
``features`` (what their output layer reads) for a second, sentence-embedding target.

- `CnnStudent`, the paper's: subword embeddings, five 1-D convolutions (kernels 2-6 by
  default), max-pooling over time, concatenation, dropout on embeddings and filters, and a
  linear layer to the logits.
- `BagStudent`, the fastest tier: masked mean of the same embeddings, a small MLP, logits.

Results never depend on how much padding a batch adds: the CNN pads every input by the
widest kernel minus one inside the graph and max-pools only over windows that start inside the text
(and, for texts at least one kernel long, lie wholly inside it); the bag averages only real
tokens. Embedding row 0 (``<pad>``) is zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.training import require_torch

require_torch()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


@dataclass(frozen=True)
class StudentConfig:
    arch: str  # "cnn" | "bag"
    vocab_size: int
    n_labels: int
    embedding_dim: int = 384
    kernel_sizes: tuple[int, ...] = (2, 3, 4, 5, 6)
    filters: int = 500
    bag_hidden: int = 256
    dropout: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["kernel_sizes"] = list(self.kernel_sizes)
        return out


def _embedding(config: StudentConfig, embeddings: npt.NDArray[np.float32] | None) -> nn.Embedding:
    """The token embedding table, from the teacher's rows when given (row 0, pad, stays zero)."""
    table = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
    if embeddings is not None:
        table.weight.data.copy_(torch.from_numpy(embeddings))
    return table


class CnnStudent(nn.Module):
    def __init__(self, config: StudentConfig, embeddings: npt.NDArray[np.float32] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embedding = _embedding(config, embeddings)
        self.convs = nn.ModuleList(
            nn.Conv1d(config.embedding_dim, config.filters, kernel_size=k) for k in config.kernel_sizes
        )
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.filters * len(config.kernel_sizes), config.n_labels)
        self.widest = max(config.kernel_sizes)

    @property
    def feature_dim(self) -> int:
        return self.config.filters * len(self.config.kernel_sizes)

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.out(self.dropout(self.features(input_ids, attention_mask)))

    def features(self, input_ids: Any, attention_mask: Any) -> Any:
        """The pooled filters the output layer reads: [B, filters * kernels]."""
        lengths = attention_mask.sum(dim=1)
        x = self.dropout(self.embedding(input_ids))  # [B, T, E]
        # Always pad by widest - 1: T' >= widest for any input, with no shape-dependent branch
        # (which tracing would freeze); the mask below ignores the extra windows.
        x = F.pad(x.transpose(1, 2), (0, self.widest - 1))  # [B, E, T + widest - 1]
        pooled = []
        for kernel, conv in zip(self.config.kernel_sizes, self.convs, strict=True):
            h = conv(x)  # [B, filters, T' - k + 1]
            starts = torch.arange(h.shape[2], device=h.device)
            valid = starts[None, :] < torch.clamp(lengths - kernel + 1, min=1)[:, None]
            h = h.masked_fill(~valid[:, None, :], float("-inf"))
            pooled.append(torch.relu(h.amax(dim=2)))
        return torch.cat(pooled, dim=1)


class BagStudent(nn.Module):
    def __init__(self, config: StudentConfig, embeddings: npt.NDArray[np.float32] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embedding = _embedding(config, embeddings)
        self.dropout = nn.Dropout(config.dropout)
        self.hidden = nn.Linear(config.embedding_dim, config.bag_hidden)
        self.out = nn.Linear(config.bag_hidden, config.n_labels)

    @property
    def feature_dim(self) -> int:
        return self.config.bag_hidden

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.out(self.dropout(self.features(input_ids, attention_mask)))

    def features(self, input_ids: Any, attention_mask: Any) -> Any:
        """The hidden layer the output layer reads: [B, bag_hidden]."""
        mask = attention_mask.unsqueeze(2).to(torch.float32)
        x = self.dropout(self.embedding(input_ids)) * mask
        mean = x.sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1.0)
        return torch.relu(self.hidden(mean))


def build_student(config: StudentConfig, embeddings: npt.NDArray[np.float32] | None = None) -> Any:
    if config.arch == "cnn":
        return CnnStudent(config, embeddings)
    if config.arch == "bag":
        return BagStudent(config, embeddings)
    raise ValueError(f"unknown student architecture {config.arch!r} (expected cnn or bag)")


def initial_embeddings(
    teacher_rows: npt.NDArray[np.float32], teacher_ids: npt.NDArray[np.int64], seed: int
) -> npt.NDArray[np.float32]:
    """Student embeddings: teacher rows where the student token has one, noise elsewhere.

    ``teacher_rows`` holds the teacher's ``emb.word`` rows for ``teacher_ids[teacher_ids >= 0]``
    in order. Pad is zero; unk and byte pieces get small noise at the teacher's scale.
    """
    rng = np.random.default_rng(seed)
    dim = teacher_rows.shape[1]
    out = (rng.standard_normal((len(teacher_ids), dim)) * teacher_rows.std()).astype(np.float32)
    out[teacher_ids >= 0] = teacher_rows
    out[0] = 0.0
    result: npt.NDArray[np.float32] = out
    return result
