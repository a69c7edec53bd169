"""Distil a student from a dataset of teacher logits (MSE, the paper's Eq. 5), or train the
supervised baseline ``S_sup`` (cross-entropy on gold labels).

Rows stream from the dataset's shards through a bounded shuffle buffer, so memory does not
grow with the corpus. A row's split is a hash of its id: ``valid_fraction`` of rows form the
validation set that drives early stopping, and ``fraction`` keeps a deterministic subset
(the data-volume curve) that is uniform within every locale.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tokenizers import Tokenizer

from worker.loop.dataset import iter_batches, read_manifest, split_bucket
from worker.models.onnx import pad_batch
from worker.training import require_torch
from worker.training.progress import TrainProgress
from worker.training.students import StudentConfig, build_student
from worker.training.targets import embedding_loss

torch = require_torch()
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "mse"  # "mse" on teacher logits, or "ce" on gold labels
    epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_epochs: float = 2.0
    patience: int = 3
    #: An epoch improves when its validation loss beats the best by more than this; the tiny
    #: default lets a long run creep on by 1e-4 an epoch (0.01 cuts such tails short).
    min_delta: float = 1e-6
    #: After an epoch that does not improve the validation loss, the learning rate is multiplied
    #: by this (1.0: a constant rate after the warm-up).
    plateau_factor: float = 1.0
    seed: int = 0
    valid_fraction: float = 0.05
    fraction: float = 1.0
    max_length: int = 64
    shuffle_buffer: int = 65536
    threads: int = 2
    #: Sparse gradients for the embedding table (SparseAdam): a step touches only the rows of
    #: the batch's tokens, not the whole table (about 1.3x faster with a large vocabulary).
    sparse_embeddings: bool = False
    #: The torch device to train on ("cpu", "cuda", "cuda:1"); the result comes back on the CPU.
    device: str = "cpu"
    #: Train on at most about this many rows of each locale (a deterministic share of the larger
    #: ones, by row id; validation rows untouched), so a few big locales do not crowd out the
    #: rest; None: every row.
    max_rows_per_locale: int | None = None
    #: Stop after the epoch whose successor would end past this many seconds of training
    #: (judged by the slowest epoch so far); None: no limit. The best epoch is kept as always.
    time_budget_s: float | None = None
    #: Disagreement weighting: the model directory of a student (usually the one serving) whose
    #: disagreement with the teacher weights each training row's loss (`disagreement_weights`);
    #: None: every row weighs the same.
    disagreement_student: str | None = None
    #: How much more the most disagreeing rows weigh: w = 1 + alpha * min(KL / mean KL, cap),
    #: then scaled to a mean of 1, so the learning rate means the same as without weights.
    disagreement_alpha: float = 1.0
    disagreement_cap: float = 10.0
    #: The teacher's sentence embedding as a second target (the me5s card's pair): a linear
    #: projection of the student's features is pulled to the teacher's embedding by MSE (summed
    #: over dimensions) + (1 - cosine), weighted by this beside the logit MSE;
    #: 0: logits only. The projection is dropped after training; validation measures the logits.
    embedding_weight: float = 0.0
    #: 4: once the schedule ends, the embedding table is snapped to 4 bits (groups of 32 values,
    #: a float16 scale each: `worker.training.nibbles`) and frozen, and ``table_epochs`` more
    #: epochs train the rest of the model around it, so the INT8 model can store the table at
    #: 4 bits exactly, at about half its bytes; 0: the table stays INT8 like every weight.
    table_bits: int = 0
    table_epochs: int = 2


@dataclass
class Example:
    text: str
    target: npt.NDArray[np.float32] | int
    locale: str
    row_id: str = ""
    weight: float = 1.0  # the row's share of the training loss (1: unweighted)
    embedding: npt.NDArray[np.float32] | None = None  # the teacher's sentence embedding, if targeted


def stream_examples(
    datasets: Sequence[Path],
    part: str,
    config: TrainConfig,
    weights: Mapping[str, float] | None = None,
    embeddings: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> Iterator[Example]:
    """Rows of ``part`` ("train" or "valid") from distillation datasets, in shard order.

    ``weights`` (row id -> weight, from `disagreement_weights`) weigh the training rows; a row
    it does not name, and every validation row, weighs 1. ``embeddings`` (row id -> the
    teacher's sentence embedding) go with the training rows they name.
    """
    shares = locale_shares(datasets, config.max_rows_per_locale) if part == "train" else {}
    for directory in datasets:
        for batch in iter_batches(directory):
            for i, row_id in enumerate(batch.ids):
                bucket = split_bucket(row_id)
                is_valid = bucket < config.valid_fraction
                if (part == "valid") != is_valid:
                    continue
                # Rescale so `fraction` (and a locale's share) is taken from the training rows only.
                if part == "train" and (bucket - config.valid_fraction) / (
                    1 - config.valid_fraction
                ) >= config.fraction * shares.get(batch.locales[i], 1.0):
                    continue
                train = part == "train"
                weight = weights.get(row_id, 1.0) if weights is not None and train else 1.0
                embedding = embeddings.get(row_id) if embeddings is not None and train else None
                yield Example(
                    batch.texts[i], batch.teacher_logits[i], batch.locales[i], row_id, weight, embedding
                )


def locale_shares(datasets: Sequence[Path], max_rows: int | None) -> dict[str, float]:
    """The share of each locale's rows to train on so that it keeps about ``max_rows`` (from the
    datasets' manifests); empty (every row) when ``max_rows`` is None."""
    if max_rows is None:
        return {}
    counts: Counter[str] = Counter()
    for directory in datasets:
        for locale, by_label in read_manifest(directory).get("counts", {}).items():
            counts[locale] += sum(by_label.values())
    return {locale: min(1.0, max_rows / n) for locale, n in counts.items() if n}


def shuffled(examples: Iterator[Example], buffer: int, rng: random.Random) -> Iterator[Example]:
    """A bounded-memory shuffle: reservoir-style buffer of ``buffer`` rows."""
    pool: list[Example] = []
    for example in examples:
        if len(pool) < buffer:
            pool.append(example)
            continue
        j = rng.randrange(buffer)
        yield pool[j]
        pool[j] = example
    rng.shuffle(pool)
    yield from pool


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int) -> tuple[Any, Any]:
    ids, mask = pad_batch([e.ids for e in tokenizer.encode_batch(texts)], 0, max_length)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _batches(
    examples: Iterator[Example], size: int, rng: random.Random | None = None
) -> Iterator[list[Example]]:
    """Batches of ``size``. With ``rng``, rows are bucketed by length within windows of 32
    batches and the batches shuffled, which cuts padding without ordering the epoch."""
    window = size * 32 if rng is not None else size
    pending: list[Example] = []

    def flush() -> Iterator[list[Example]]:
        rows = sorted(pending, key=lambda e: len(e.text)) if rng is not None else pending
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        if rng is not None:
            rng.shuffle(chunks)
        yield from chunks

    for example in examples:
        pending.append(example)
        if len(pending) == window:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


@dataclass
class TrainResult:
    model: Any
    history: list[dict[str, float]]
    best_epoch: int
    train_rows: int
    valid_rows: int
    seconds: float


def train_student(
    student_config: StudentConfig,
    embeddings: npt.NDArray[np.float32] | None,
    tokenizer: Tokenizer,
    train_source: Any,
    valid_source: Any,
    config: TrainConfig,
    checkpoint: Path | None = None,
    fingerprint_extra: str = "",
    start_from: Mapping[str, Any] | None = None,
    freeze_embeddings: bool = False,
) -> TrainResult:
    """Train with Adam, linear warm-up, and early stopping on the validation loss.

    ``train_source``/``valid_source`` are callables returning a fresh example iterator
    (each epoch streams the data again). With ``checkpoint``, the whole training state is
    saved there after every epoch, and a run that finds a checkpoint of the same
    configuration and vocabulary resumes after its last epoch. ``start_from`` (a state dict)
    gives the weights it names (a warm start; the rest keep their initialisation), and
    ``freeze_embeddings`` keeps the table as it starts (the second stage of ``table_bits``).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    device = torch.device(config.device)
    model = build_student(student_config, embeddings).to(device)
    if start_from is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in start_from.items()}, strict=False)
    if freeze_embeddings:
        model.embedding.weight.requires_grad_(False)
    train_rows, target_dim = 0, 0
    for example in train_source():
        train_rows += 1
        if not target_dim and example.embedding is not None:
            target_dim = len(example.embedding)
    if config.embedding_weight > 0:
        if not target_dim:
            raise ValueError("embedding_weight > 0 needs the teacher's embeddings on the training rows")
        # A submodule, so the optimiser, the checkpoint and resuming carry it; export never
        # sees it (forward does not use it), and it is dropped once training ends.
        model.projection = torch.nn.Linear(model.feature_dim, target_dim).to(device)
    optimiser = _Optimiser(model, config.learning_rate, sparse=config.sparse_embeddings)
    mse = torch.nn.MSELoss()
    ce = torch.nn.CrossEntropyLoss()

    def loss_of(batch: list[Example], train: bool) -> tuple[Any, int]:
        ids, mask = encode(tokenizer, [e.text for e in batch], config.max_length)
        with_embedding = train and config.embedding_weight > 0
        if with_embedding:
            features = model.features(ids.to(device), mask.to(device))
            logits = model.out(model.dropout(features))
        else:
            logits = model(ids.to(device), mask.to(device))
        if config.objective == "ce":
            target = torch.tensor([int(e.target) for e in batch], dtype=torch.int64, device=device)
            return ce(logits, target), len(batch)
        target = torch.from_numpy(np.stack([np.asarray(e.target, np.float32) for e in batch])).to(device)
        if train and any(e.weight != 1.0 for e in batch):
            weight = torch.tensor([e.weight for e in batch], dtype=torch.float32, device=device)
            loss = (((logits - target) ** 2).sum(dim=1) * weight).mean()
        else:
            # Eq. 5: squared error summed over the classes, averaged over the batch.
            loss = mse(logits, target) * target.shape[1]
        if with_embedding:
            loss = loss + config.embedding_weight * embedding_loss(model.projection(features), batch)
        return loss, len(batch)

    valid = list(valid_source())
    steps_per_epoch = max(1, math.ceil(train_rows / config.batch_size))
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))
    state = _TrainState(rate=config.learning_rate)
    fingerprint = _fingerprint(student_config, config, tokenizer, train_rows, fingerprint_extra)
    if checkpoint is not None and checkpoint.exists():
        state = _resume(checkpoint, fingerprint, model, optimiser, rng)
    progress = TrainProgress(train_rows, config.epochs, before=state.seconds)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.stale >= config.patience:
            break  # a resumed run that had already stopped early
        model.train()
        total, count = 0.0, 0
        progress.epoch_started(epoch)
        stream = shuffled(iter(train_source()), config.shuffle_buffer, rng)
        for batch in _batches(stream, config.batch_size, rng):
            state.step += 1
            for group in optimiser.param_groups:
                group["lr"] = state.rate * min(1.0, state.step / warmup_steps)
            loss, n = loss_of(batch, train=True)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * n
            count += n
            progress.rows_done(n, total / count)
        model.eval()
        with torch.no_grad():
            v_total, v_count = 0.0, 0
            for batch in _batches(iter(valid), 512):
                loss, n = loss_of(batch, train=False)
                v_total += float(loss) * n
                v_count += n
        valid_loss = v_total / max(v_count, 1)
        state.history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(count, 1),
                "valid_loss": valid_loss,
                "learning_rate": state.rate,
                **progress.epoch_done(),
            }
        )
        log.info("epoch_done", **state.history[-1])
        state.epoch = epoch
        if valid_loss < state.best_loss - config.min_delta:
            state.best_loss, state.best_epoch, state.stale = valid_loss, epoch, 0
            state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.stale += 1
            state.rate *= config.plateau_factor
        if checkpoint is not None:
            _save(checkpoint, fingerprint, state, model, optimiser, rng)
        if state.stale >= config.patience:
            log.info("early_stop", epoch=epoch, best_epoch=state.best_epoch)
            break
        if progress.out_of_time(config.time_budget_s) and epoch < config.epochs:
            log.info(
                "time_budget_spent", epoch=epoch, best_epoch=state.best_epoch, budget_s=config.time_budget_s
            )
            break
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    if config.embedding_weight > 0:
        del model.projection
    model = model.cpu()
    model.eval()
    return TrainResult(model, state.history, state.best_epoch, train_rows, len(valid), progress.elapsed())


class _Optimiser:
    """Adam, or SparseAdam on the embedding table plus Adam on the rest, as one optimiser."""

    def __init__(self, model: Any, rate: float, *, sparse: bool) -> None:
        table = getattr(model, "embedding", None)
        trained = [p for p in model.parameters() if p.requires_grad]  # not a frozen table
        if sparse and table is not None and table.weight.requires_grad:
            table.sparse = True
            rest = [p for p in trained if p is not table.weight]
            self.parts = [torch.optim.SparseAdam([table.weight], lr=rate), torch.optim.Adam(rest, lr=rate)]
        else:
            self.parts = [torch.optim.Adam(trained, lr=rate)]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad()

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [part.state_dict() for part in self.parts]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for part, state in zip(self.parts, states, strict=True):
            part.load_state_dict(state)


@dataclass
class _TrainState:
    """Everything an epoch boundary must carry over, so a run can resume there."""

    rate: float
    epoch: int = 0
    step: int = 0
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict[str, Any] | None = None
    stale: int = 0
    seconds: float = 0.0  # training time of the epochs before a resume
    history: list[dict[str, float]] = field(default_factory=list)


def _fingerprint(
    student_config: StudentConfig, config: TrainConfig, tokenizer: Tokenizer, rows: int, extra: str = ""
) -> str:
    """What a checkpoint must match to be resumed: the model, the schedule, the vocabulary, the data
    (and ``extra``: what the config's paths stood for)."""
    ignored = ("threads", "epochs", "patience", "device", "time_budget_s")
    defaults = asdict(TrainConfig())
    schedule = {
        k: v
        for k, v in asdict(config).items()
        # A lever left at its default leaves the fingerprint as it was before the lever existed.
        if k not in ignored and not (k in _LEVERS and v == defaults[k])
    }
    digest = hashlib.sha256(
        json.dumps([student_config.to_json(), schedule, rows], sort_keys=True, default=str).encode()
    )
    digest.update(tokenizer.to_str().encode())
    if extra:
        digest.update(extra.encode())
    return digest.hexdigest()[:16]


_LEVERS = (
    "disagreement_student",
    "disagreement_alpha",
    "disagreement_cap",
    "embedding_weight",
    "table_bits",
    "table_epochs",
)


def _save(
    path: Path, fingerprint: str, state: _TrainState, model: Any, optimiser: Any, rng: random.Random
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    state.seconds = state.history[-1]["elapsed_seconds"] if state.history else 0.0
    torch.save(
        {
            "fingerprint": fingerprint,
            "state": asdict(state),
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        },
        staging,
    )
    staging.replace(path)
    log.info("checkpoint_saved", path=str(path), epoch=state.epoch)


def _resume(path: Path, fingerprint: str, model: Any, optimiser: Any, rng: random.Random) -> _TrainState:
    saved = torch.load(path, weights_only=False, map_location="cpu")
    if saved["fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint {path} belongs to another run (other data, vocabulary or settings); "
            "delete it to start afresh"
        )
    model.load_state_dict(saved["model"])
    optimiser.load_state_dict(saved["optimiser"])
    rng.setstate(saved["python_rng"])
    torch.set_rng_state(saved["torch_rng"])
    state = _TrainState(**saved["state"])
    log.info("training_resumed", path=str(path), after_epoch=state.epoch, best_epoch=state.best_epoch)
    return state


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
