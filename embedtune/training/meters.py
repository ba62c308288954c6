"""What the loop counts between host syncs: a window of training metrics, and the non-finite guard.

Both keep their running figures on the device, so a step adds to them without waiting for the
GPU; the host reads them only where the loop syncs anyway (a logging step, a save, a stop).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from embedtune.data.collate import TrainBatch

logger = logging.getLogger("embedtune")


@dataclass
class WindowFigures:
    loss: float  # mean over the window's micro-batches and the processes
    pairs_per_s: float
    tokens_per_s: float  # real tokens, all processes
    padding_efficiency: float  # real tokens / tokens computed


class MetricsWindow:
    """The loss, pairs and tokens of the micro-batches since the last logging step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.micro_batches = 0
        self.pairs = 0  # across processes
        self.real_tokens = 0  # this process's
        self.computed_tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: TrainBatch) -> None:
        self.loss += loss
        self.micro_batches += 1
        self.pairs += batch.global_size
        if not batch.empty:
            self.real_tokens += batch.real_tokens
            self.computed_tokens += batch.computed_tokens

    def read(self, accelerator: Accelerator) -> WindowFigures:
        """The window's figures over all processes (a collective: every process calls it)."""
        elapsed = time.perf_counter() - self.started
        loss = accelerator.reduce(self.loss, "mean").item() / self.micro_batches
        tokens = torch.tensor([self.real_tokens, self.computed_tokens], device=accelerator.device)
        real, computed = accelerator.reduce(tokens, "sum").tolist()
        return WindowFigures(loss, self.pairs / elapsed, real / elapsed, real / max(computed, 1))


class NonFiniteGuard:
    """Counts updates skipped for a non-finite gradient norm, and how many in a row.

    ``record`` runs every optimizer step, on the device. ``read`` brings the counts to the host
    (and warns about new skips); the loop calls it where it syncs anyway, or every step when the
    update itself needed the host to decide (``reads_every_step``).
    """

    def __init__(self, device: torch.device, in_a_row: int, skipped_before: int, on_device: bool) -> None:
        self._in_a_row = torch.tensor(float(in_a_row), device=device)
        self._skipped = torch.zeros((), device=device)  # skipped in this process's run
        self.reads_every_step = not on_device
        self.skipped_before = skipped_before  # skipped before a resume
        self.reported = 0
        self.in_a_row = in_a_row  # as of the last read
        self.skipped = skipped_before  # the run's total, as of the last read

    def record(self, bad: torch.Tensor) -> None:
        """``bad``: 1.0 when this step's update was skipped, else 0.0 (on the device)."""
        self._in_a_row = (self._in_a_row + bad) * bad
        self._skipped += bad

    def read(self, step: int) -> None:
        in_a_row, skipped = (int(v) for v in torch.stack([self._in_a_row, self._skipped]).tolist())
        if skipped > self.reported:
            logger.warning("step %d: %d update(s) skipped for a non-finite gradient norm (%d in all)",
                           step, skipped - self.reported, skipped)
        self.reported = skipped
        self.in_a_row = in_a_row
        self.skipped = self.skipped_before + skipped

    def tripped(self, limit: int) -> bool:
        return self.in_a_row >= limit
