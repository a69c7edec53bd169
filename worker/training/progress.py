"""Progress of a training run: rows per second, the epoch's time left, and the time budget."""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger(__name__)


class TrainProgress:
    """Rows per second and time left, logged every ``every_s`` seconds and at each epoch's end."""

    def __init__(self, rows_per_epoch: int, epochs: int, every_s: float = 30.0, before: float = 0.0) -> None:
        self.rows_per_epoch, self.epochs, self.every_s = rows_per_epoch, epochs, every_s
        self.before = before  # training seconds of the epochs before a resume
        self.started = time.perf_counter()
        self.epoch = 0
        self.epoch_started_at = self.last_report = self.started
        self.rows = 0
        self.epoch_seconds: list[float] = []

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def epoch_started(self, epoch: int) -> None:
        self.epoch, self.rows = epoch, 0
        self.epoch_started_at = self.last_report = time.perf_counter()

    def rows_done(self, n: int, train_loss: float) -> None:
        self.rows += n
        now = time.perf_counter()
        if now - self.last_report < self.every_s:
            return
        self.last_report = now
        rate = self.rows / max(now - self.epoch_started_at, 1e-9)
        log.info(
            "train_progress",
            epoch=self.epoch,
            rows=self.rows,
            of_rows=self.rows_per_epoch,
            train_loss=round(train_loss, 5),
            rows_per_s=round(rate),
            epoch_left_s=round((self.rows_per_epoch - self.rows) / max(rate, 1e-9)),
        )

    def out_of_time(self, budget_s: float | None) -> bool:
        """Whether one more epoch, as slow as the slowest so far, would end past ``budget_s``."""
        if budget_s is None or not self.epoch_seconds:
            return False
        return self.elapsed() + max(self.epoch_seconds) > budget_s

    def epoch_done(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.epoch_started_at
        self.epoch_seconds.append(seconds)
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        return {
            "epoch_seconds": round(seconds, 1),
            "elapsed_seconds": round(self.elapsed(), 1),
            "rows_per_s": round(self.rows / max(seconds, 1e-9)),
            # An upper bound: early stopping usually ends the run sooner.
            "max_seconds_left": round(mean * (self.epochs - self.epoch)),
        }
