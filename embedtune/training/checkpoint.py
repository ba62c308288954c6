"""Checkpoints: atomic saves, finding the newest intact one, loading, retention.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/``: Accelerate's state (model, optimizer,
scheduler, scaler, RNG per process) plus ``trainer_state.json`` (``state``: data position,
counters, W&B run id, config) and ``manifest.json`` (``integrity``: every other file with its size
and sha256). It is written under ``step-NNNNNNNN.tmp``: every file is flushed to the disk, then
``trainer_state.json``, then the manifest, both durably, and the folder is renamed when complete,
so a crash or a kill during a save never leaves a folder that looks complete; a folder without
``trainer_state.json`` is never resumed from. A save that fails (a full disk makes torch.save
raise RuntimeError) removes its folder and says how much space there is and a checkpoint takes.

Before anything of a checkpoint is loaded it is verified (``integrity.verify``), so a damaged
checkpoint is refused naming the file and what is wrong, and ``latest`` goes back to the newest
intact one; a checkpoint named in the config never climbs out of the folder it is looked up in.
Which config changes a resume allows is ``resume_check``'s.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from torch import nn

from embedtune.config import Config
from embedtune.distributed import any_process
from embedtune.files import folder_bytes, free_bytes, human_bytes, remove_path, replace_folder, write_json
from embedtune.model.lora import trainable_names
from embedtune.secrets import scrub_config
from embedtune.training.integrity import DAMAGED, custom_states_weights_only, one_line, verify, write_manifest
from embedtune.training.resume_check import check_resume
from embedtune.training.state import NAME, STATE_FILE, CheckpointError, TrainerState

logger = logging.getLogger("embedtune")

PARTIAL = re.compile(r"^step-\d{8}\.(tmp|old)$")  # a save that did not finish, or a replaced checkpoint

# Called on every process inside each save, once Accelerate's state is written to the temporary
# folder and before the checkpoint is complete, with that folder. Production code installs none;
# the kill soak and its test install one that sleeps, to widen the window for a kill mid-save.
SAVE_HOOKS: list[Callable[[str], None]] = []


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (half-written ones are skipped).

    Complete means saved to the end: a real folder named step-NNNNNNNN (a link is not followed:
    retention deletes what it finds here, and only here) holding trainer_state.json. Whether its
    files are intact is ``verify``'s question: retention and ``latest`` count the same folders, and
    a damaged one is kept until retention or a new save of its step replaces it.
    """
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := NAME.match(name)) and not os.path.islink(os.path.join(root, name))
             and os.path.isdir(os.path.join(root, name)) and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return [path for _, path in sorted(found)]


def remove_partial(output_dir: str) -> list[str]:
    """Remove what saves that did not finish left in output_dir/checkpoints (``step-N.tmp``, and
    ``step-N.old`` from a crash while a checkpoint was replaced); returns their names. Only while
    no save of this output_dir is under way: the trainer's output lock makes sure of that."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    removed = sorted(name for name in os.listdir(root) if PARTIAL.match(name))
    for name in removed:
        remove_path(os.path.join(root, name))
        logger.info("removed %s, left by a checkpoint save that did not finish", os.path.join(root, name))
    return removed


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

    ``latest``: the newest complete one in output_dir that passes the checks (damaged ones are
    skipped with a warning); a name (``step-NNNNNNNN``): that one in output_dir/checkpoints;
    otherwise the path of a checkpoint folder, without '..' components. A named checkpoint that
    fails the checks is refused with the reason.
    """
    flag = f"--resume_from_checkpoint {which}"
    if which == "latest":
        return _newest_intact(output_dir, flag)
    if NAME.match(which):
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


def _newest_intact(output_dir: str, flag: str) -> str:
    """The newest complete checkpoint whose files and trainer_state.json pass the checks."""
    found = complete_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"{flag}: no complete checkpoint in {checkpoints_dir(output_dir)}; start without it, "
                              "or name a checkpoint folder")
    problems = []
    for path in reversed(found):
        try:
            verify(path)
            TrainerState.load(path)
            return path
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", os.path.basename(path), exc)
            problems.append(f"{os.path.basename(path)}: {str(exc).removesuffix(f'; {DAMAGED}')}")
    raise CheckpointError(f"{flag}: none of the {len(found)} checkpoint(s) in {checkpoints_dir(output_dir)} can be "
                          f"resumed from ({' | '.join(problems)}); start a new run (in another output_dir, or after "
                          "deleting them)")


def load(accelerator: Accelerator, path: str, trainable_only: nn.Module | None = None) -> None:
    """Accelerate's state from checkpoint ``path`` (weights, optimizer, schedule, scaler, RNG),
    every pickled file read with weights_only=True. ``trainable_only``: the (prepared) model whose
    checkpoints hold its trainable parameters only (LoRA); they must be exactly those.

    What still fails to load (a file of an older checkpoint, which has no manifest, damaged or
    missing; a checkpoint of another model) is a CheckpointError naming the checkpoint."""
    verify(path)
    strict = {}
    if trainable_only is not None:
        _check_trainable(path, trainable_only)
        strict = {"strict": False}  # the frozen weights are the base model's, already loaded
    try:
        with custom_states_weights_only():
            accelerator.load_state(path, load_kwargs={"weights_only": True}, **strict)
    except (pickle.UnpicklingError, MemoryError, torch.OutOfMemoryError):
        raise  # a refusal of the weights-only reader, or no memory: not the checkpoint's fault to report as such
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded ({one_line(exc)}): a file is damaged or missing, or it "
                              f"is a checkpoint of another model; {DAMAGED}") from None


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


def save(accelerator: Accelerator, output_dir: str, state: TrainerState, keep_last: int,
         best_metric: str | None = None, score: float | None = None) -> str:
    """Write a checkpoint atomically on every process (collective), then apply retention.

    Whatever fails (a full disk: torch.save raises RuntimeError, safetensors its own error), every
    process agrees on it, the half-written folder is removed, and each raises CheckpointError
    saying why, the space left and about what a checkpoint takes; earlier checkpoints are untouched.
    """
    name = f"step-{state.step:08d}"
    root = checkpoints_dir(output_dir)
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    main = accelerator.is_main_process

    def start() -> None:
        os.makedirs(root, exist_ok=True)
        remove_partial(output_dir)  # leftovers of saves that were killed, which may fill the disk
        os.makedirs(tmp)

    def write() -> None:
        accelerator.save_state(tmp, safe_serialization=True)
        for hook in SAVE_HOOKS:
            hook(tmp)

    def complete() -> None:
        if best_metric and score is not None:
            state.scores[name] = score
        # The RNG files of every process are written by now: the agreement before this stage waits for all.
        write_json(os.path.join(tmp, STATE_FILE), {**asdict(state), "config": scrub_config(state.config)},
                   durable=True, strict=True)
        write_manifest(tmp)  # last: it lists (and flushes) every file, trainer_state.json included
        replace_folder(tmp, final)

    error: Exception | None = None
    for everyone, stage in ((False, start), (True, write), (False, complete)):
        if everyone or main:
            try:
                stage()
            except Exception as exc:
                error = exc
        # Agree on the outcome, so that no process goes on, renames or retries alone.
        if any_process(error is not None, accelerator.device):
            message = _save_failure(output_dir, final, tmp, error)
            accelerator.wait_for_everyone()  # every process has measured the folder before it goes
            if main:
                remove_path(tmp)
            raise CheckpointError(message)
    if main:
        _retain(output_dir, keep_last, state.scores, best_metric)
    accelerator.wait_for_everyone()
    return final


def _save_failure(output_dir: str, final: str, tmp: str, error: Exception | None) -> str:
    """One line: why the save of ``final`` failed, the free space there, and about what a checkpoint takes."""
    reason = one_line(error) if error is not None else "it failed on another process (see that process's error)"
    free = free_bytes(checkpoints_dir(output_dir))
    found = complete_checkpoints(output_dir)
    if found:
        need = f"about {human_bytes(folder_bytes(found[-1]))} (as {os.path.basename(found[-1])} does)"
    else:
        need = f"more than the {human_bytes(folder_bytes(tmp))} written before the failure"
    return (f"could not write checkpoint {final}: {reason}. {'?' if free is None else human_bytes(free)} free on "
            f"its disk; a checkpoint needs {need}. The previous checkpoints are untouched; free space (or lower "
            "checkpoint.keep_last) for the next save.")


def best_checkpoint(scores: dict[str, float], among: Iterable[str] | None = None) -> str | None:
    """The name of the best-scoring checkpoint (the earliest of equals), of those ``among`` when given."""
    names = [n for n in scores if among is None or n in among]
    return max(sorted(names), key=lambda n: scores[n], default=None)


def evaluations_since_best(scores: dict[str, float]) -> int:
    """How many scored checkpoints came after the best one: evaluations without improvement."""
    best = best_checkpoint(scores)
    return sum(name > best for name in scores) if best else 0


def load_weights(model: nn.Module, path: str, trainable_only: bool) -> bool:
    """The model weights of checkpoint ``path`` into ``model`` (unwrapped), nothing else; False
    when the checkpoint holds none in one file (FSDP and DeepSpeed shard them)."""
    from safetensors.torch import load_file

    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        return False
    verify(path)
    model.load_state_dict(load_file(file, device=str(next(model.parameters()).device)), strict=not trainable_only)
    return True


def _retain(output_dir: str, keep_last: int, scores: dict[str, float], best_metric: str | None) -> None:
    """Delete complete checkpoints beyond the last ``keep_last`` (and the best one)."""
    found = complete_checkpoints(output_dir)
    keep = set(found[-keep_last:]) if keep_last > 0 else set(found)
    present = {os.path.basename(p): p for p in found}
    if best_metric and (best := best_checkpoint(scores, present)):
        keep.add(present[best])
    for path in found:
        if path not in keep:
            remove_path(path)
