"""Distil a student from a dataset of teacher logits (MSE, the paper's Eq. 5), or train the
supervised baseline ``S_sup`` (cross-entropy on gold labels).

Rows stream from the dataset's shards through a bounded shuffle buffer, so memory does not
grow with the corpus. A row's split is a hash of its id: ``valid_fraction`` of rows form the
validation set that drives early stopping, and ``fraction`` keeps a deterministic subset
(the data-volume curve) that is uniform within every locale.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from tokenizers import Tokenizer

from worker.dataset import iter_batches
from worker.tokens import pad_batch
from worker.training import require_torch
from worker.training.students import StudentConfig, build_student

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


@dataclass
class Example:
    text: str
    target: npt.NDArray[np.float32] | int
    locale: str


def split_bucket(row_id: str) -> float:
    """A stable number in [0, 1) from a row id.

    Only the part before a ``:`` counts, so a text and its translation (``id`` and
    ``id:en``) always fall in the same split.
    """
    key = row_id.split(":", 1)[0]
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def stream_examples(datasets: Sequence[Path], part: str, config: TrainConfig) -> Iterator[Example]:
    """Rows of ``part`` ("train" or "valid") from distillation datasets, in shard order."""
    for directory in datasets:
        for batch in iter_batches(directory):
            for i, row_id in enumerate(batch.ids):
                bucket = split_bucket(row_id)
                is_valid = bucket < config.valid_fraction
                if (part == "valid") != is_valid:
                    continue
                # Rescale so `fraction` is taken from the training rows only.
                if (
                    part == "train"
                    and (bucket - config.valid_fraction) / (1 - config.valid_fraction) >= config.fraction
                ):
                    continue
                yield Example(batch.texts[i], batch.teacher_logits[i], batch.locales[i])


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
) -> TrainResult:
    """Train with Adam, linear warm-up, and early stopping on the validation loss.

    ``train_source``/``valid_source`` are callables returning a fresh example iterator
    (each epoch streams the data again).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    model = build_student(student_config, embeddings)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    mse = torch.nn.MSELoss()
    ce = torch.nn.CrossEntropyLoss()

    def loss_of(batch: list[Example], train: bool) -> tuple[Any, int]:
        ids, mask = encode(tokenizer, [e.text for e in batch], config.max_length)
        logits = model(ids, mask)
        if config.objective == "ce":
            target = torch.tensor([int(e.target) for e in batch], dtype=torch.int64)
            return ce(logits, target), len(batch)
        target = torch.from_numpy(np.stack([np.asarray(e.target, np.float32) for e in batch]))
        # Eq. 5: squared error summed over the classes, averaged over the batch.
        return mse(logits, target) * target.shape[1], len(batch)

    valid = list(valid_source())
    train_rows = sum(1 for _ in train_source())
    steps_per_epoch = max(1, math.ceil(train_rows / config.batch_size))
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))
    best_loss, best_epoch, best_state, stale = float("inf"), 0, None, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    step = 0
    rate = config.learning_rate
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, count = 0.0, 0
        stream = shuffled(iter(train_source()), config.shuffle_buffer, rng)
        for batch in _batches(stream, config.batch_size, rng):
            step += 1
            for group in optimiser.param_groups:
                group["lr"] = rate * min(1.0, step / warmup_steps)
            loss, n = loss_of(batch, train=True)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * n
            count += n
        model.eval()
        with torch.no_grad():
            v_total, v_count = 0.0, 0
            for batch in _batches(iter(valid), 512):
                loss, n = loss_of(batch, train=False)
                v_total += float(loss) * n
                v_count += n
        valid_loss = v_total / max(v_count, 1)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(count, 1),
                "valid_loss": valid_loss,
                "learning_rate": rate,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        log.info("epoch_done", **history[-1])
        if valid_loss < best_loss - config.min_delta:
            best_loss, best_epoch, stale = valid_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            rate *= config.plateau_factor
            if stale >= config.patience:
                log.info("early_stop", epoch=epoch, best_epoch=best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, history, best_epoch, train_rows, len(valid), time.perf_counter() - started)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
