"""Gathering embeddings across processes with their gradient, and the few process helpers."""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

logger = logging.getLogger("embedtune")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _counts(tensor: torch.Tensor, size: int) -> list[int]:
    """Every process's number of rows in ``tensor``."""
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([tensor.shape[0]], device=tensor.device))
    return [int(n.item()) for n in lengths]


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any (a signal or an error may reach only some)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``tensor`` concatenated along dim 0, and where this process's rows start.

    The autograd graph is kept: the backward pass sums the gradients of all processes into each
    local slice, so a loss that is the mean over local queries, averaged by DDP, gets the
    gradient of the global mean. Slices may differ in length (the last batch of an epoch).
    """
    rank, size = world()
    if size == 1:
        return tensor, 0
    # Imported here: torch builds without distributed support have no such module.
    from torch.distributed.nn.functional import all_gather

    counts = _counts(tensor, size)
    padded = torch.nn.functional.pad(tensor, (0, 0, 0, max(counts) - tensor.shape[0]))
    parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0), sum(counts[:rank])


def gather_plain(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0, without gradient (labels, text keys)."""
    _, size = world()
    if size == 1:
        return tensor
    counts = _counts(tensor, size)
    pad = [0, 0] * (tensor.dim() - 1) + [0, max(counts) - tensor.shape[0]]
    padded = torch.nn.functional.pad(tensor, pad)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0)


def cpu_processes() -> bool:
    """Several processes but no GPU (torchrun, or accelerate launch's multi-process launcher):
    Accelerate only sets up gloo when told it runs on the CPU, and would otherwise run each
    process as if it were alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def release(accelerator: Accelerator) -> None:
    """Free the DDP model on every process together, while all of them are still there.

    Left to garbage collection when training returns, the DDP reducer takes the gloo process
    group down with it, and a process whose peers had already exited could wait for them forever.
    (``end_training`` then destroys the process group itself.)
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()


@contextmanager
def stop_signals() -> Iterator[dict[str, bool]]:
    """SIGTERM / SIGINT ask the loop to finish its step, save and exit; a second one kills."""
    flag = {"stop": False}

    def ask(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        logger.warning("%s received: finishing this step, saving a checkpoint, then exiting",
                       signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, ask)
    except ValueError:  # not the main thread: leave the signals alone
        pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
