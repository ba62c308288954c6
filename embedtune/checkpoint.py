"""Checkpoints: atomic saves, finding the newest complete one, resume checks, retention.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/``: Accelerate's state (model, optimizer,
scheduler, scaler, RNG per process) plus ``trainer_state.json`` (data position, counters, W&B
run id, config). It is written under ``step-NNNNNNNN.tmp`` and renamed when complete, so a
crash or a kill during a save never leaves a folder that looks complete; ``trainer_state.json``
is written last, and a folder without it is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from accelerate import Accelerator

from embedtune.config import Config
from embedtune.distributed import any_process

logger = logging.getLogger("embedtune")

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"^step-(\d{8})$")
# Changing these makes the saved data position or weights mean something else.
RESUME_KEYS = (
    "model.base_model", "model.pooling", "model.normalize",
    "data.train_files", "data.format", "data.query_field", "data.positive_field", "data.negatives_field",
    "data.max_negatives", "data.shuffle", "data.shuffle_buffer", "data.eval_files", "data.eval_fraction",
    "data.drop_last", "train.batch_size", "train.gradient_accumulation_steps", "train.seed",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed from; the message says why and what to do."""


@dataclass
class TrainerState:
    """Everything besides Accelerate's own state that an exact resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # global batches of that epoch already trained on
    examples_seen: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    duration_s: float = 0.0
    wandb_run_id: str | None = None
    eval_before: dict[str, float] | None = None
    scores: dict[str, float] = field(default_factory=dict)  # checkpoint name -> best-metric value
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> TrainerState:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            return cls(**json.load(f))


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (half-written ones are skipped)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := NAME.match(name)) and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str, which: str) -> str:
    """``latest`` -> the newest complete checkpoint of output_dir; otherwise a path to one."""
    if which == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                                  f"{checkpoints_dir(output_dir)}; start without it, or name a checkpoint folder")
        return found[-1]
    if not os.path.isfile(os.path.join(which, STATE_FILE)):
        raise CheckpointError(f"--resume_from_checkpoint {which}: not a complete checkpoint (no {STATE_FILE}); "
                              "use `latest` or a checkpoints/step-NNNNNNNN folder")
    return which


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_resume(saved: dict[str, Any], current: Config) -> list[str]:
    """Refuse changes that break an exact resume; return the harmless ones for the log."""
    now = current.to_dict()
    breaking = [f"{key}: {_lookup(saved, key)!r} -> {_lookup(now, key)!r}" for key in RESUME_KEYS
                if _lookup(saved, key) != _lookup(now, key)]
    if breaking:
        raise CheckpointError("cannot resume: the config changed in ways that change the data order or the model:\n  "
                              + "\n  ".join(breaking)
                              + "\nRestore these values, or start a new run in another output_dir.")
    harmless = []
    for section, values in now.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if _lookup(saved, f"{section}.{key}") != value:
                    harmless.append(f"{section}.{key}: {_lookup(saved, f'{section}.{key}')!r} -> {value!r}")
    return harmless


def save(accelerator: Accelerator, output_dir: str, state: TrainerState, keep_last: int,
         best_metric: str | None = None, score: float | None = None) -> str:
    """Write a checkpoint atomically on every process (collective), then apply retention."""
    name = f"step-{state.step:08d}"
    root = checkpoints_dir(output_dir)
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a save that was killed
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    error: BaseException | None = None
    try:
        accelerator.save_state(tmp, safe_serialization=True)
        if delay := float(os.environ.get("EMBEDTUNE_FAULT_SAVE_DELAY_S", "0")):
            time.sleep(delay)  # fault injection for tests: widens the window for a kill mid-save
        if accelerator.is_main_process:
            if best_metric and score is not None:
                state.scores[name] = score
            _write_json(os.path.join(tmp, STATE_FILE), asdict(state))
            _fsync_dir(tmp)
    except OSError as exc:
        error = exc
    # Agree on the outcome, so that no process renames or retries alone.
    failed = any_process(error is not None, accelerator.device)
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {error or 'failed on another process'}. "
                              "The previous checkpoints are untouched.")
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _retain(output_dir, keep_last, state.scores, best_metric)
    accelerator.wait_for_everyone()
    return final


def _retain(output_dir: str, keep_last: int, scores: dict[str, float], best_metric: str | None) -> None:
    found = complete_checkpoints(output_dir)
    keep = set(found[-keep_last:]) if keep_last > 0 else set(found)
    present = {os.path.basename(p): p for p in found}
    if best_metric and scores:
        best = max((n for n in scores if n in present), key=lambda n: scores[n], default=None)
        if best:
            keep.add(present[best])
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
