"""Checkpoints: atomic saves, finding the newest complete one, resume checks, retention.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/``: Accelerate's state (model, optimizer,
scheduler, scaler, RNG per process) plus ``trainer_state.json`` (data position, counters, W&B
run id, config). It is written under ``step-NNNNNNNN.tmp`` and renamed when complete, so a
crash or a kill during a save never leaves a folder that looks complete; ``trainer_state.json``
is written last, and a folder without it is never resumed from.

A checkpoint is read as untrusted input. The weights are safetensors; every file that
Accelerate reads with ``torch.load`` must load with ``weights_only=True`` (plain tensors,
numbers and containers: no code runs) before anything of it is used, and ``load`` makes
Accelerate read them that way. ``trainer_state.json`` is checked field by field, and a checkpoint
named in the config never climbs out of the folder it is looked up in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from accelerate import Accelerator
from torch import nn

from embedtune.config import Config
from embedtune.distributed import any_process
from embedtune.files import fsync_dir, write_json
from embedtune.model.lora import trainable_names
from embedtune.secrets import scrub_config

logger = logging.getLogger("embedtune")

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"^step-(\d{8})$")
WEIGHTS = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model\w*\.bin)$")
# Files Accelerate reads with torch.load: optimizer, registered objects (the learning-rate
# schedule), RNG, loss scaler, sampler; and the weights under FSDP, which has no safetensors.
PICKLED = (".bin", ".pkl", ".pt", ".pth", ".pickle", ".ckpt")
SAFE_TORCH = (2, 6)  # weights_only=True could still run code before torch 2.6 (CVE-2025-32434)
RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # a W&B run id; it becomes part of a folder name
MAX_STATE_BYTES = 64 << 20
# Changing these makes the saved data position or weights mean something else.
RESUME_KEYS = (
    "model.base_model", "model.pooling", "model.normalize", "model.lora",
    "data.train_files", "data.format", "data.query_field", "data.positive_field", "data.negatives_field",
    "data.max_negatives", "data.shuffle", "data.shuffle_buffer", "data.group_by_length", "data.eval_files",
    "data.eval_fraction", "data.drop_last", "data.max_record_bytes", "data.max_negatives_per_record",
    "train.batch_size", "train.gradient_accumulation_steps", "train.seed",
)


# Called on every process inside each save, once Accelerate's state is written to the temporary
# folder and before the checkpoint is complete, with that folder. Production code installs none;
# the kill soak and its test install one that sleeps, to widen the window for a kill mid-save.
SAVE_HOOKS: list[Callable[[str], None]] = []


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
        """The state saved in checkpoint ``path``, every field checked (CheckpointError if not)."""
        file = os.path.join(path, STATE_FILE)
        try:
            with open(file, "rb") as f:
                data = json.loads(f.read(MAX_STATE_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {str(exc)[:200]}); resume from "
                                  "another checkpoint") from None
        problem = _state_problem(data)
        if problem:
            raise CheckpointError(f"{file}: {problem}; this file is not one embedtune wrote (or it was edited): "
                                  "resume from another checkpoint")
        return cls(**data)


def _state_problem(data: Any) -> str | None:
    """What is wrong with the contents of a trainer_state.json, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    known = {f.name for f in fields(TrainerState)}
    if unknown := sorted(set(data) - known):
        return f"unknown field(s) {', '.join(map(str, unknown))[:200]}"

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for name in ("step", "epoch", "batches_in_epoch", "examples_seen", "skipped_steps", "nonfinite_in_a_row"):
        if name in data and not count(data[name]):
            return f"'{name}' must be a count (an integer, 0 or more)"
    if "duration_s" in data and not number(data["duration_s"]):
        return "'duration_s' must be a number"
    run_id = data.get("wandb_run_id")
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID.match(run_id)):
        return "'wandb_run_id' must be a W&B run id (letters, digits, '.', '_' and '-')"
    before = data.get("eval_before")
    if before is not None and not (isinstance(before, dict) and all(number(v) for v in before.values())):
        return "'eval_before' must map metric names to numbers"
    scores = data.get("scores", {})
    if not (isinstance(scores, dict) and all(NAME.match(str(k)) and number(v) for k, v in scores.items())):
        return "'scores' must map checkpoint names (step-NNNNNNNN) to numbers"
    if not isinstance(data.get("config", {}), dict):
        return "'config' must be a JSON object"
    return None


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (half-written ones are skipped)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    # A link is not followed: retention deletes what it finds here, and only here.
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := NAME.match(name)) and not os.path.islink(os.path.join(root, name))
             and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return [path for _, path in sorted(found)]


def earlier_run_problem(output_dir: str) -> str | None:
    """Why a new run may not start in ``output_dir`` (an earlier run's checkpoints are there), or None."""
    found = complete_checkpoints(output_dir)
    if not found:
        return None
    return (f"{output_dir} already holds checkpoints of an earlier run ({len(found)}): continue it with "
            f"--resume_from_checkpoint latest, or give another output_dir (or delete {checkpoints_dir(output_dir)})")


@dataclass
class Resume:
    """A checkpoint to resume from, read and checked against the config."""

    path: str
    state: TrainerState
    changes: list[str]  # config keys changed since the checkpoint, harmless ones only


def open_resume(cfg: Config) -> Resume:
    """The checkpoint ``checkpoint.resume_from`` names, its state, and what changed in the config
    since; CheckpointError for one that cannot be resumed exactly."""
    path = find_checkpoint(cfg.output_dir, cfg.checkpoint.resume_from or "latest")
    state = TrainerState.load(path)
    return Resume(path, state, check_resume(state.config, cfg))


def find_checkpoint(output_dir: str, which: str) -> str:
    """The checkpoint to resume from, checked (``verify``) before anything of it is loaded.

    ``latest``: the newest complete one in output_dir; a name (``step-NNNNNNNN``): that one in
    output_dir/checkpoints; otherwise the path of a checkpoint folder, without '..' components.
    """
    flag = f"--resume_from_checkpoint {which}"
    if which == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"{flag}: no complete checkpoint in {checkpoints_dir(output_dir)}; start without it, "
                                  "or name a checkpoint folder")
        path = found[-1]
    elif NAME.match(which):
        path = os.path.join(checkpoints_dir(output_dir), which)
    elif ".." in re.split(r"[\\/]", which) or ("/" not in which and os.sep not in which):
        raise CheckpointError(f"{flag}: expected latest, a checkpoint name like step-00000500, or the path of a "
                              "checkpoint folder without '..' components")
    else:
        path = which
    if not NAME.match(os.path.basename(os.path.normpath(path))) or not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"{flag}: {path} is not a complete checkpoint (a step-NNNNNNNN folder with "
                              f"{STATE_FILE}); use `latest` or a checkpoints/step-NNNNNNNN folder")
    verify(path)
    return path


def _weights_only_load(path: str) -> Any:
    """torch.load with weights_only=True and the NumPy types Accelerate's RNG states need, as
    Accelerate itself loads; zip files are mapped, not read, so an optimizer state costs no memory."""
    from accelerate.utils import load

    return load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _refusal(exc: BaseException) -> str:
    """The reason in torch's weights-only error, without its advice to load the file unsafely."""
    parts = [" ".join(part.split()) for part in str(exc).split("\n\n")]
    reason = [part for part in parts if part and not part.startswith(("Weights only load failed", "Check the doc"))]
    return " ".join(reason)[:300] or type(exc).__name__


def verify(path: str) -> None:
    """Refuse a checkpoint that would run code when loaded.

    Every file Accelerate reads with torch.load must load with weights_only=True (our weights are
    safetensors, but FSDP writes its own with torch.save). Subfolders (FSDP's sharded state,
    DeepSpeed's files) are read by their own loaders, which unpickle without such a check; they
    are named in a warning.
    """
    import torch

    names = sorted(os.listdir(path))
    folders = [n for n in names if os.path.isdir(os.path.join(path, n))]
    if not folders and not any(WEIGHTS.match(n) for n in names):
        raise CheckpointError(f"{path}: no model weights (model.safetensors); resume from another checkpoint")
    for name in names:
        file = os.path.join(path, name)
        if not name.endswith(PICKLED) or not os.path.isfile(file):
            continue
        try:
            _weights_only_load(file)
        except Exception as exc:
            raise CheckpointError(f"{file}: refused: it does not load as plain tensors and numbers "
                                  f"(torch.load with weights_only=True: {_refusal(exc)}). Loading it could run "
                                  "code; resume from a checkpoint embedtune wrote.") from None
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < SAFE_TORCH:
        logger.warning("torch %s: loading with weights_only=True is only safe from torch 2.6 on (CVE-2025-32434); "
                       "upgrade torch before resuming from checkpoints you did not write", torch.__version__)
    if folders:
        logger.warning("%s holds %s, read by their own loaders (FSDP, DeepSpeed), which unpickle without a "
                       "weights-only check: resume only from checkpoints you wrote", path, ", ".join(folders))


@contextmanager
def _custom_states_weights_only() -> Iterator[None]:
    """Accelerate reads registered objects' states (our learning-rate schedule) without the
    weights-only check; for the duration of a load, read them as everything else is."""
    import accelerate.accelerator as module

    original = getattr(module, "load_custom_state", None)
    if original is None:  # another Accelerate: verify() has checked the files already
        yield
        return

    def load_custom_state(obj: Any, path: str, index: int = 0) -> None:
        obj.load_state_dict(_weights_only_load(os.path.join(path, f"custom_checkpoint_{index}.pkl")))

    module.load_custom_state = load_custom_state
    try:
        yield
    finally:
        module.load_custom_state = original


def load(accelerator: Accelerator, path: str, trainable_only: nn.Module | None = None) -> None:
    """Accelerate's state from checkpoint ``path`` (weights, optimizer, schedule, scaler, RNG),
    every pickled file read with weights_only=True. ``trainable_only``: the (prepared) model whose
    checkpoints hold its trainable parameters only (LoRA); they must be exactly those."""
    verify(path)
    strict = {}
    if trainable_only is not None:
        _check_trainable(path, trainable_only)
        strict = {"strict": False}  # the frozen weights are the base model's, already loaded
    with _custom_states_weights_only():
        accelerator.load_state(path, load_kwargs={"weights_only": True}, **strict)


def _check_trainable(path: str, model: nn.Module) -> None:
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    try:
        with safe_open(file, "pt") as f:
            saved = set(f.keys())
    except Exception as exc:  # a damaged or missing file
        raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}); resume from another checkpoint") from None
    expected = trainable_names(model)
    if saved != expected:
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        raise CheckpointError(f"{file}: holds other weights than the ones this run trains (missing: "
                              f"{', '.join(missing[:3]) or 'none'}; not trained here: {', '.join(extra[:3]) or 'none'}); "
                              "it was written with other model.lora settings: resume from a checkpoint of this run")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _default(dotted: str) -> Any:
    """The default of a config key, e.g. ``data.group_by_length``."""
    section, key = dotted.split(".")
    model = Config.model_fields[section].annotation
    return model.model_fields[key].get_default(call_default_factory=True)  # type: ignore[union-attr]


def _absent(tree: dict[str, Any], dotted: str) -> bool:
    *sections, key = dotted.split(".")
    for part in sections:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return not isinstance(tree, dict) or key not in tree


def check_resume(saved: dict[str, Any], current: Config) -> list[str]:
    """Refuse changes that break an exact resume; return the harmless ones for the log.

    Both sides are compared as checkpoints store them, secrets scrubbed; a key the checkpoint
    does not have (it predates the key) counts as its default, which is how that run behaved.
    """
    saved, now = scrub_config(saved), scrub_config(current.to_dict())
    breaking = []
    for key in RESUME_KEYS:
        if not _absent(saved, key):
            if _lookup(saved, key) != _lookup(now, key):
                breaking.append(f"{key}: {_lookup(saved, key)!r} -> {_lookup(now, key)!r}")
        elif _default(key) != _lookup(now, key):  # the run predates the key, so it ran as the default does
            breaking.append(f"{key}: {_default(key)!r} (the checkpoint predates this key) -> {_lookup(now, key)!r}")
    if breaking:
        raise CheckpointError("cannot resume: the config changed in ways that change the data order or the model:\n  "
                              + "\n  ".join(breaking)
                              + "\nRestore these values, or start a new run in another output_dir.")
    harmless = []
    for section, values in now.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if not _absent(saved, f"{section}.{key}") and _lookup(saved, f"{section}.{key}") != value:
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
        for hook in SAVE_HOOKS:
            hook(tmp)
        if accelerator.is_main_process:
            if best_metric and score is not None:
                state.scores[name] = score
            # Written last and made durable: a folder without it is never resumed from.
            write_json(os.path.join(tmp, STATE_FILE), {**asdict(state), "config": scrub_config(state.config)},
                       durable=True, strict=True)
            fsync_dir(tmp)
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
        fsync_dir(root)
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
