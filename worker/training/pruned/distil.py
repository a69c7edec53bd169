"""Distil a pruned-transformer student (the me5s recipe) in torch.

`PrunedTransformer` is the torch twin of the ONNX graph that `worker.training.pruned.build_graph`
writes: post-LN BERT layers with erf-GELU, masked mean pooling, L2 normalisation, then the MLP
head (intents folded into labels when the head has groups). It starts from a `PrunedEncoder` and
a refit head and goes back to them (`to_weights`), so export always uses the one ONNX builder.

Loss: MSE on the teacher's logits (summed over classes, as `worker.training.distil`), plus, with
``cosine``, the me5s sentence-embedding terms: MSE (summed over dimensions) + (1 - cosine)
against the teacher's embedding. The word-embedding table stays frozen: a few thousand
distillation rows would move only the rows they contain, and the teacher's rows are the
best initialisation the others have.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tokenizers import Tokenizer

from worker.teacher.onnx_graph import HeadWeights
from worker.training import require_torch
from worker.training.pruned.encoder import PrunedEncoder

require_torch()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from worker.training.distil import encode  # noqa: E402
from worker.training.progress import TrainProgress  # noqa: E402

log = structlog.get_logger(__name__)
Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PrunedDistilConfig:
    epochs: int = 1
    batch_size: int = 32
    encoder_learning_rate: float = 5e-5
    head_learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    cosine: bool = False
    max_length: int = 64
    seed: int = 0
    threads: int = 1
    device: str = "cpu"  # the torch device to train on; the weights come back on the CPU


class _Layer(nn.Module):
    def __init__(self, hidden: int, ffn: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.ao = (nn.Linear(hidden, hidden) for _ in range(4))
        self.fi, self.fo = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.aln, self.oln = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Any, bias: Any) -> Any:
        b, t, h = x.shape
        d = h // self.heads

        def split(v: Any) -> Any:
            return v.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(2, 3) / float(np.sqrt(d)) + bias
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, h)
        x = self.aln(x + self.ao(context))
        return self.oln(x + self.fo(F.gelu(self.fi(x))))


class PrunedTransformer(nn.Module):
    """input_ids, attention_mask -> (logits, L2-normalised sentence embedding)."""

    def __init__(self, encoder: PrunedEncoder, head: HeadWeights) -> None:
        super().__init__()
        cfg = encoder.config
        self.source = encoder
        self.groups = head.groups
        self.n_labels = head.n_labels
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoder.tensors.items()}
        self.word = nn.Embedding(*t["emb.word"].shape)
        self.word.weight.data.copy_(t["emb.word"])
        self.word.weight.requires_grad_(False)
        self.register_buffer("pos", t["emb.pos"].clone())
        self.register_buffer("type0", t["emb.type"][0].clone())
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.emb_ln.weight.data.copy_(t["emb.ln.w"])
        self.emb_ln.bias.data.copy_(t["emb.ln.b"])
        self.layers = nn.ModuleList()
        for i in range(cfg.layers):
            layer = _Layer(cfg.hidden, cfg.ffn, cfg.heads, cfg.layer_norm_eps)
            for part in ("q", "k", "v", "ao", "fi", "fo"):
                linear = getattr(layer, part)
                linear.weight.data.copy_(t[f"l{i}.{part}.w"])
                linear.bias.data.copy_(t[f"l{i}.{part}.b"])
            for norm in ("aln", "oln"):
                getattr(layer, norm).weight.data.copy_(t[f"l{i}.{norm}.w"])
                getattr(layer, norm).bias.data.copy_(t[f"l{i}.{norm}.b"])
            self.layers.append(layer)
        self.head = nn.ModuleList()
        for w, b in head.layers:
            linear = nn.Linear(w.shape[0], w.shape[1])
            linear.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            linear.bias.data.copy_(torch.from_numpy(b))
            self.head.append(linear)
        if head.groups is not None:
            membership = torch.zeros(len(head.groups), head.n_labels)
            membership[torch.arange(len(head.groups)), torch.from_numpy(head.groups)] = 1.0
            self.register_buffer("membership", membership)

    def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        t = input_ids.shape[1]
        positions: Any = self.pos
        x = self.emb_ln(self.word(input_ids) + positions[:t] + self.type0)
        mask = attention_mask.to(torch.float32)
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[:, :, None]).sum(dim=1) / torch.clamp(mask.sum(dim=1, keepdim=True), min=1.0)
        embedding = pooled / torch.clamp(pooled.norm(dim=1, keepdim=True), min=1e-12)
        h = embedding
        for i, linear in enumerate(self.head):
            h = linear(h)
            if i < len(self.head) - 1:
                h = torch.relu(h)
        if self.groups is None:
            return h, embedding
        log_probs = torch.log(torch.clamp(h.softmax(dim=-1) @ self.membership, min=1e-30))
        return log_probs - log_probs.mean(dim=1, keepdim=True), embedding

    def to_weights(self) -> tuple[PrunedEncoder, HeadWeights]:
        """The trained weights in the layout the ONNX builder reads."""

        def arr(value: Any) -> Array:
            out: Array = value.detach().cpu().numpy().astype(np.float32)
            return out

        tensors = dict(self.source.tensors)
        tensors["emb.ln.w"], tensors["emb.ln.b"] = arr(self.emb_ln.weight), arr(self.emb_ln.bias)
        for i, layer in enumerate(self.layers):
            for part in ("q", "k", "v", "ao", "fi", "fo"):
                linear = getattr(layer, part)
                tensors[f"l{i}.{part}.w"], tensors[f"l{i}.{part}.b"] = arr(linear.weight), arr(linear.bias)
            for norm in ("aln", "oln"):
                ln = getattr(layer, norm)
                tensors[f"l{i}.{norm}.w"], tensors[f"l{i}.{norm}.b"] = arr(ln.weight), arr(ln.bias)
        encoder = replace(self.source, tensors=tensors)
        head = HeadWeights(
            layers=tuple((arr(linear.weight).T.copy(), arr(linear.bias)) for linear in self.head),
            groups=self.groups,
            n_labels=self.n_labels,
        )
        return encoder, head


@dataclass
class PrunedDistilResult:
    encoder: PrunedEncoder
    head: HeadWeights
    history: list[dict[str, float]]
    train_rows: int
    valid_rows: int
    seconds: float


def distil_pruned(
    encoder: PrunedEncoder,
    head: HeadWeights,
    tokenizer: Tokenizer,
    train: Sequence[tuple[str, Array]],
    valid: Sequence[tuple[str, Array]],
    config: PrunedDistilConfig,
    teacher_embeddings: Callable[[Sequence[str]], Array] | None = None,
) -> PrunedDistilResult:
    """Distil on (text, teacher logits) rows; AdamW, linear warm-up then linear decay.

    ``teacher_embeddings`` is needed only with ``config.cosine``.
    """
    if config.cosine and teacher_embeddings is None:
        raise ValueError("the cosine objective needs the teacher's sentence embeddings")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    device = torch.device(config.device)
    model = PrunedTransformer(encoder, head).to(device)
    head_params = list(model.head.parameters())
    encoder_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    optimiser = torch.optim.AdamW(
        [
            {
                "params": encoder_params,
                "lr": config.encoder_learning_rate,
                "base": config.encoder_learning_rate,
            },
            {"params": head_params, "lr": config.head_learning_rate, "base": config.head_learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    train_embeddings = (
        teacher_embeddings([text for text, _ in train]) if config.cosine and teacher_embeddings else None
    )
    valid_embeddings = (
        teacher_embeddings([text for text, _ in valid]) if config.cosine and teacher_embeddings else None
    )

    def batches(source: Sequence[tuple[str, Array]], shuffle: bool) -> list[list[int]]:
        # Length-sorted windows cut padding; shuffling the batches keeps the epoch unordered.
        rows = list(range(len(source)))
        if shuffle:
            rng.shuffle(rows)
        out = []
        window = config.batch_size * 16
        for start in range(0, len(rows), window):
            chunk = sorted(rows[start : start + window], key=lambda i: len(source[i][0]))
            out += [chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]
        if shuffle:
            rng.shuffle(out)
        return out

    def loss_of(rows: Sequence[tuple[str, Array]], index: list[int], emb: Array | None) -> tuple[Any, Any]:
        ids, mask = encode(tokenizer, [rows[i][0] for i in index], config.max_length)
        logits, embedding = model(ids.to(device), mask.to(device))
        target = torch.from_numpy(np.stack([rows[i][1] for i in index]).astype(np.float32)).to(device)
        logit_loss = F.mse_loss(logits, target) * target.shape[1]
        total = logit_loss
        if emb is not None:
            teacher = torch.from_numpy(emb[index]).to(device)
            total = total + ((embedding - teacher) ** 2).sum(dim=1).mean()
            total = total + (1.0 - F.cosine_similarity(embedding, teacher, dim=1)).mean()
        return total, logit_loss

    def validate() -> dict[str, float]:
        model.eval()
        total, logit_total = 0.0, 0.0
        with torch.no_grad():
            for index in batches(valid, shuffle=False):
                loss, logit_loss = loss_of(valid, index, valid_embeddings)
                total += float(loss) * len(index)
                logit_total += float(logit_loss) * len(index)
        n = max(len(valid), 1)
        return {"valid_loss": total / n, "valid_logit_mse": logit_total / n}

    history: list[dict[str, float]] = [{"epoch": 0, **validate()}]
    log.info("pruned_distil_start", **history[0])
    steps_total = config.epochs * max(1, -(-len(train) // config.batch_size))
    warmup = max(1, int(config.warmup_fraction * steps_total))
    step = 0
    started = time.perf_counter()
    progress = TrainProgress(len(train), config.epochs)
    for epoch in range(1, config.epochs + 1):
        model.train()
        running, count = 0.0, 0
        progress.epoch_started(epoch)
        for index in batches(train, shuffle=True):
            step += 1
            factor = min(step / warmup, max(0.0, (steps_total - step) / max(1, steps_total - warmup)))
            for group in optimiser.param_groups:
                group["lr"] = group["base"] * factor
            loss, _ = loss_of(train, index, train_embeddings)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            running += float(loss.detach()) * len(index)
            count += len(index)
            progress.rows_done(len(index), running / count)
        timing = progress.epoch_done()
        history.append(
            {
                "epoch": epoch,
                "train_loss": running / max(count, 1),
                **validate(),
                "seconds": round(time.perf_counter() - started, 1),
                "rows_per_s": timing["rows_per_s"],
                "max_seconds_left": timing["max_seconds_left"],
            }
        )
        log.info("pruned_distil_epoch", **history[-1])
    model.eval()
    trained_encoder, trained_head = model.to_weights()
    return PrunedDistilResult(
        trained_encoder, trained_head, history, len(train), len(valid), time.perf_counter() - started
    )
