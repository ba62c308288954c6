"""The run's plan: optimizer steps and processes, as the trainer counts them, and the output:
earlier checkpoints in output_dir, and whether the checkpoints fit on the disk."""

from __future__ import annotations

import math
import os
import shutil

from embedtune.commands.validate.checks import FAIL, OK, WARN, Check, number
from embedtune.commands.validate.environment import LoadedModel
from embedtune.config import Config
from embedtune.files import human_bytes
from embedtune.training.checkpoint import complete_checkpoints, earlier_run_problem, open_resume
from embedtune.training.state import CheckpointError

# Bytes per parameter: fp32 weights, and AdamW's two fp32 moments for the trained ones.
WEIGHT_BYTES, ADAM_BYTES = 4, 8


def step_check(cfg: Config, train_pairs: int) -> tuple[Check, int]:
    """Optimizer steps per epoch, in all, and of warmup, from the trainer's own count; and the total."""
    t, drop_last = cfg.train, cfg.data.drop_last
    per_epoch = t.steps_per_epoch(train_pairs, drop_last)
    total = t.planned_steps(train_pairs, drop_last)
    rest = train_pairs % t.batch_size
    last = (f", the last of {rest} pairs" if rest and not drop_last
            else f", the last {rest} pairs dropped (data.drop_last)" if rest else "")
    data = {"train_pairs": train_pairs, "per_epoch": per_epoch, "total": total, "warmup": t.warmup_steps(total)}
    status = OK
    detail = f"{number(per_epoch)} per epoch ({number(train_pairs)} pairs / batch {t.batch_size}{last}); "
    if t.max_steps:
        passes = t.max_steps / per_epoch if per_epoch else math.inf
        detail += f"{number(total)} in all (train.max_steps: {passes:.2f} passes over the data)"
    else:
        detail += f"{number(total)} in all ({t.epochs} epoch{'s' * (t.epochs != 1)})"
    detail += f"; {data['warmup']} warmup"
    if per_epoch == 0:
        status = FAIL
        detail += "\nan epoch has no training batch: check data.eval_fraction, train.batch_size and data.drop_last"
    return Check("steps", "optimizer steps", status, detail, data), total


def mining_rounds(cfg: Config, total: int, per_epoch: int) -> list[int]:
    """The steps whose weights train.hard_negatives mines with, as the trainer schedules them."""
    hard = cfg.train.hard_negatives
    if hard is None:
        return []
    rounds = {0} if hard.before_training else set()
    if hard.every_n_steps:
        rounds |= set(range(hard.every_n_steps, total, hard.every_n_steps))
    if hard.every_epoch and per_epoch:
        rounds |= set(range(per_epoch, total, per_epoch))
    return sorted(rounds)


def mining_check(cfg: Config, total: int, per_epoch: int, train_pairs: int) -> Check:
    rounds = mining_rounds(cfg, total, per_epoch)
    shown = ", ".join(map(str, rounds[:8])) + (f", ... ({len(rounds)} in all)" if len(rounds) > 8 else "")
    detail = (f"{len(rounds)} round(s), with the weights of step {shown}: each embeds the training questions and "
              f"their distinct answers (about {number(2 * train_pairs)} texts, a third of an epoch's compute)")
    return Check("steps", "hard negatives", OK, detail, {"rounds": rounds})


def processes_check(cfg: Config) -> Check:
    """Whether the batch can be shared by the processes of this launch (WORLD_SIZE), by the rule
    the trainer applies at start."""
    t = cfg.train
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    micro = t.micro_batch_size()
    check = Check("steps", "processes", OK,
                  f"{processes} process{'es' * (processes != 1)} (WORLD_SIZE): {micro} pairs per micro-batch, "
                  f"about {t.pairs_per_process(processes)} per process", {"processes": processes, "micro_batch": micro})
    if problem := t.processes_problem(processes):
        check.status = FAIL
        check.detail += f"\n{problem}"
    return check


def planned_saves(steps: int, every_n_steps: int | None) -> int:
    """Checkpoints a run writes; without periodic ones a stop (signal, non-finite gradients) still
    writes one."""
    if not every_n_steps:
        return 1
    return max(1, math.ceil(steps / every_n_steps))


def checkpoint_bytes(parameters: int, trainable: int, keep_last: int, keep_best: bool, saves: int) -> dict[str, int]:
    """Disk a run needs at its peak: the checkpoints on disk at once, and the exported model.

    A checkpoint holds fp32 weights and AdamW's two moments for the trained weights. Retention
    runs after a new checkpoint is complete, so ``keep_last + 1`` exist for a moment, plus the
    best one when it is kept apart; never more than the run writes.
    """
    per_checkpoint = parameters * WEIGHT_BYTES + trainable * ADAM_BYTES
    at_once = min(saves, keep_last + 1 + int(keep_best))
    final_model = parameters * WEIGHT_BYTES
    return {"per_checkpoint": per_checkpoint, "checkpoints": at_once, "final_model": final_model,
            "total": per_checkpoint * at_once + final_model}


def existing_parent(path: str) -> str:
    """The nearest folder of ``path`` that exists: where its free space is measured."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def disk_check(estimate: dict[str, int], free: int, where: str) -> Check:
    """Blocking when the estimate does not fit in ``free`` bytes; a warning when it takes most of it."""
    need = estimate["total"]
    data = {**estimate, "free": free, "where": where}
    detail = (f"needs about {human_bytes(need)} ({estimate['checkpoints']} checkpoint"
              f"{'s' * (estimate['checkpoints'] != 1)} of {human_bytes(estimate['per_checkpoint'])} + final model "
              f"{human_bytes(estimate['final_model'])}); {human_bytes(free)} free at {where}")
    if need > free:
        return Check("output", "disk space", FAIL,
                     detail + "\ndoes not fit: free space, lower checkpoint.keep_last, or choose another output_dir",
                     data)
    if need > free / 2:
        return Check("output", "disk space", WARN, detail + "\nmore than half the free space", data)
    return Check("output", "disk space", OK, detail, data)


def output_check(cfg: Config) -> Check:
    """The trainer refuses an output_dir with an earlier run's checkpoints unless resuming it."""
    out = cfg.output_dir
    data = {"path": os.path.abspath(out), "checkpoints": len(complete_checkpoints(out))}
    if cfg.checkpoint.resume_from:
        try:
            resume = open_resume(cfg)
        except (CheckpointError, OSError, ValueError, TypeError) as exc:
            return Check("output", "checkpoints", FAIL, str(exc), data)
        detail = f"resumes from {resume.path} (step {resume.state.step}, epoch {resume.state.epoch})"
        if resume.changes:
            detail += "\nchanged since the checkpoint (allowed): " + "; ".join(resume.changes)
        return Check("output", "checkpoints", OK, detail, data)
    if problem := earlier_run_problem(out):
        return Check("output", "checkpoints", FAIL, problem, data)
    where = "exists" if os.path.isdir(out) else "will be created"
    return Check("output", "checkpoints", OK, f"{os.path.abspath(out)} ({where}; no earlier checkpoints)", data)


def plan_section(cfg: Config, train_pairs: int | None, model: LoadedModel | None,
                 free_bytes: int | None = None) -> list[Check]:
    """The steps rows (when the data was counted) and the output rows. ``free_bytes`` replaces
    the free space measured at output_dir."""
    checks: list[Check] = []
    total = None
    if train_pairs is not None:
        steps, total = step_check(cfg, train_pairs)
        checks += [steps, processes_check(cfg)]
        if cfg.train.hard_negatives:
            checks.append(mining_check(cfg, total, steps.data["per_epoch"], train_pairs))
    checks.append(output_check(cfg))
    if model is None:
        checks.append(Check("output", "disk space", WARN, "not estimated: the model did not load"))
        return checks
    # Without a count of the data, max_steps (or one step) still bounds the periodic saves.
    saves = planned_saves(total or cfg.train.max_steps or 1, cfg.checkpoint.every_n_steps)
    estimate = checkpoint_bytes(model.parameters, model.trainable, cfg.checkpoint.keep_last,
                                bool(cfg.checkpoint.best_metric), saves)
    where = existing_parent(cfg.output_dir)
    free = shutil.disk_usage(where).free if free_bytes is None else free_bytes
    checks.append(disk_check(estimate, free, where))
    return checks
