"""Gathering embeddings across processes with their gradient, and the few process helpers."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

logger = logging.getLogger("embedtune")

PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent exits


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


def cores_per_process() -> int:
    """This process's share of the cores it may run on: those of its machine, divided among the
    training processes there (``LOCAL_WORLD_SIZE``, set by the launchers), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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


class _StopRequests:
    """What signals asked of this process; one record, shared by run_signals() and stop_signals()."""

    def __init__(self) -> None:
        self.flag = {"stop": False}
        self.interrupted = False  # a SIGINT came: a person pressed Ctrl-C
        self.open = 0  # blocks with the handler installed
        self.in_loop = False  # inside stop_signals(): the training loop
        self.looped = False  # the training loop has started
        self.launcher: int | None = None  # the parent stop_with_launcher() watches

    def plan(self) -> str:
        """What the run does now that it was asked to stop."""
        if self.in_loop:
            return "finishing this step, saving a checkpoint, then exiting"
        if not self.looped:
            return "training stops after its first step, with a checkpoint"
        return "the run is already ending and exits when that is done"


_REQUESTS = _StopRequests()


def _exiting(pid: int) -> bool:
    """Whether process ``pid`` is gone or on its way out (its main thread has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Record a stop request and say what it does; after a Ctrl-C, stop at once."""
    requests = _REQUESTS
    name = signal.Signals(signum).name
    # The kernel sends the launcher's death signal as its threads exit, before this process
    # is handed to another parent: ask about the launcher itself.
    if requests.launcher is not None and (os.getppid() != requests.launcher or _exiting(requests.launcher)):
        name += f" (the launcher, pid {requests.launcher}, is gone)"
    if requests.interrupted:
        # A person pressed Ctrl-C and signals again. torchrun passes a second Ctrl-C on to its
        # processes as SIGTERM, so any signal after a SIGINT counts.
        logger.error("%s received after Ctrl-C: stopping at once, without saving this step", name)
        raise KeyboardInterrupt
    again = requests.flag["stop"]
    requests.flag["stop"] = True
    requests.interrupted = signum == signal.SIGINT
    if not again:
        logger.warning("%s received: %s; a second Ctrl-C stops at once", name, requests.plan())
    elif requests.interrupted:
        logger.warning("%s received while stopping (%s); press Ctrl-C again to stop at once, without saving",
                       name, requests.plan())
    else:  # a scheduler signals every process and torchrun forwards its own: one stop, asked twice
        logger.warning("%s received again: the stop already asked goes on (%s)", name, requests.plan())


@contextmanager
def _handled() -> Iterator[_StopRequests]:
    """SIGTERM and SIGINT handled for the block; the outermost block starts a fresh record."""
    requests = _REQUESTS
    if not requests.open:  # a new run in this process (tests run several): nothing asked yet
        requests.flag["stop"] = requests.interrupted = requests.looped = False
    requests.open += 1
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_stop_signal)
    except ValueError:  # not the main thread: leave the signals alone
        pass
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        requests.open -= 1


@contextmanager
def run_signals() -> Iterator[dict[str, bool]]:
    """The stop signals handled for a whole run, setup and end included (see stop_signals).

    Without it a SIGTERM outside the loop, such as the one torchrun sends again while the
    processes save and exit, would kill a process that was about to exit with status 0.
    """
    with _handled() as requests:
        yield requests.flag


@contextmanager
def stop_signals() -> Iterator[dict[str, bool]]:
    """SIGTERM / SIGINT ask the training loop to finish its step, save and exit: ``flag["stop"]``.

    Any number of SIGTERMs only ask that (a scheduler signals every process of the job, and
    torchrun forwards its own SIGTERM, maybe several times). A signal after a SIGINT, i.e. a
    person's second Ctrl-C, stops at once (KeyboardInterrupt). Inside run_signals() the flag is
    the run's, so a signal that came during setup is not lost.
    """
    with _handled() as requests:
        requests.in_loop = requests.looped = True
        try:
            yield requests.flag
        finally:
            requests.in_loop = False


def stop_with_launcher() -> None:
    """Under torchrun (``accelerate launch``), have the kernel send SIGTERM when the launcher dies.

    torchrun starts every process in a session of its own, so a SIGKILL of the launcher, or of
    its process group, would leave them training with nobody waiting for them. The SIGTERM
    stops them as any other: finish the step, save, exit. (Linux only; a launcher that dies in
    the moment before this call is not noticed.)
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0),
                            ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        logger.warning("could not ask to be signalled when the launcher exits: if it is killed, stop this "
                       "process (pid %d) yourself", os.getpid())
    else:
        _REQUESTS.launcher = os.getppid()
