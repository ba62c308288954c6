"""Checkpoints: atomic, verified saves, finding the newest intact one, resume checks, retention.

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/``: Accelerate's state (model, optimizer,
scheduler, scaler, RNG per process) plus ``trainer_state.json`` (data position, counters, W&B
run id, config) and ``manifest.json``, which lists every other file with its size and sha256.
It is written under ``step-NNNNNNNN.tmp``: every file is flushed to the disk, then
``trainer_state.json``, then the manifest, both durably, and the folder is renamed when complete,
so a crash or a kill during a save never leaves a folder that looks complete; a folder without
``trainer_state.json`` is never resumed from. A save that fails (a full disk makes torch.save
raise RuntimeError) removes its folder and says how much space there is and a checkpoint takes.

Before anything of a checkpoint is loaded, its files are checked against the manifest (present,
same size, same hash), so a damaged checkpoint is refused naming the file and what is wrong,
and ``latest`` goes back to the newest intact one. sha256 (with the CPU's SHA instructions) keeps
up with the disk: on 2 busy cores it hashed 520-640 MB/s from the page cache (1.2 GB/s idle) and
350-380 MB/s from the disk, where writing and flushing runs at about 200 MB/s; for a 1 GiB
checkpoint a save takes 1.8 s more (hash and flush) and a resume 1.7 s (5.5 s from a cold cache).
Checkpoints written before manifests existed are resumed with a warning that they cannot be verified.

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
import pickle
import re
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from embedtune.config import DEFAULT_MINING, IN_BATCH_LOSSES, Config, HardNegativesSection
from embedtune.distributed import any_process
from embedtune.files import (
    HASH,
    files_under,
    folder_bytes,
    free_bytes,
    fsync_dir,
    hash_files,
    human_bytes,
    remove_path,
    replace_folder,
    write_json,
)
from embedtune.model.lora import trainable_names
from embedtune.secrets import scrub_config

logger = logging.getLogger("embedtune")

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # every other file of the checkpoint, with its size and hash; written last
MANIFEST_FORMAT = 1
NAME = re.compile(r"^step-(\d{8})$")
PARTIAL = re.compile(r"^step-\d{8}\.(tmp|old)$")  # a save that did not finish, or a replaced checkpoint
HEX = re.compile(r"^[0-9a-f]{64}$")
DAMAGED = "resume from an earlier checkpoint (--resume_from_checkpoint latest takes the newest intact one)"
WEIGHTS = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model\w*\.bin)$")
# Files Accelerate reads with torch.load: optimizer, registered objects (the learning-rate
# schedule), RNG, loss scaler, sampler; and the weights under FSDP, which has no safetensors.
PICKLED = (".bin", ".pkl", ".pt", ".pth", ".pickle", ".ckpt")
SAFE_TORCH = (2, 6)  # weights_only=True could still run code before torch 2.6 (CVE-2025-32434)
RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # a W&B or MLflow run id; W&B's becomes part of a folder name
MAX_STATE_BYTES = 64 << 20
# Changing these makes the saved data position or weights mean something else.
RESUME_KEYS = (
    "model.base_model", "model.pooling", "model.normalize", "model.lora",
    "data.train_files", "data.format", "data.query_field", "data.positive_field", "data.negatives_field",
    "data.max_negatives", "data.shuffle", "data.shuffle_buffer", "data.group_by_length", "data.order",
    "data.block_records",
    "data.batch_by_source", "data.source_field", "data.source_weights", "data.eval_files",
    "data.eval_fraction", "data.drop_last", "data.max_record_bytes", "data.max_negatives_per_record",
    "train.batch_size", "train.gradient_accumulation_steps", "train.seed", "train.hard_negatives",
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
    mlflow_run_id: str | None = None  # tracking.report_to's MLflow run, continued on resume
    eval_before: dict[str, float] | None = None
    eval_before_per_query: list[float] | None = None  # the base model's nDCG@k per held-out query
    scores: dict[str, float] = field(default_factory=dict)  # checkpoint name -> best-metric value
    config: dict[str, Any] = field(default_factory=dict)
    data_files: dict[str, Any] = field(default_factory=dict)  # what the run read, file by file; {}: not recorded
    processes: int = 0  # how many processes trained; 0: not recorded
    indexed_order: int = 0  # data.order=indexed: the version of its order (index.INDEXED_ORDER); 0: not
    # recorded (the first version, for a run that was indexed)

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

    for name in ("step", "epoch", "batches_in_epoch", "examples_seen", "skipped_steps", "nonfinite_in_a_row",
                 "processes", "indexed_order"):
        if name in data and not count(data[name]):
            return f"'{name}' must be a count (an integer, 0 or more)"
    if "duration_s" in data and not number(data["duration_s"]):
        return "'duration_s' must be a number"
    for name, tracker in (("wandb_run_id", "W&B"), ("mlflow_run_id", "MLflow")):
        run_id = data.get(name)
        if run_id is not None and not (isinstance(run_id, str) and RUN_ID.match(run_id)):
            return f"'{name}' must be a {tracker} run id (letters, digits, '.', '_' and '-')"
    before = data.get("eval_before")
    if before is not None and not (isinstance(before, dict) and all(number(v) for v in before.values())):
        return "'eval_before' must map metric names to numbers"
    per_query = data.get("eval_before_per_query")
    if per_query is not None and not (isinstance(per_query, list) and all(number(v) for v in per_query)):
        return "'eval_before_per_query' must be a list of numbers"
    scores = data.get("scores", {})
    if not (isinstance(scores, dict) and all(NAME.match(str(k)) and number(v) for k, v in scores.items())):
        return "'scores' must map checkpoint names (step-NNNNNNNN) to numbers"
    if not isinstance(data.get("config", {}), dict):
        return "'config' must be a JSON object"
    if not isinstance(data.get("data_files", {}), dict):
        return "'data_files' must be a JSON object"
    return None


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


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and its message, whitespace folded."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


def write_manifest(folder: str) -> None:
    """Flush every file of checkpoint ``folder`` to the disk and list it, with its size and hash, in
    the folder's manifest, written last and durably: with it, the checkpoint is complete."""
    names = [name for name in files_under(folder) if name != MANIFEST]
    sums = hash_files([os.path.join(folder, name) for name in names], durable=True)
    for parent, _, _ in os.walk(folder, topdown=False):  # the files' entries in their folders
        fsync_dir(parent)
    files = {name: {"bytes": size, HASH: digest} for name, (size, digest) in zip(names, sums)}
    write_json(os.path.join(folder, MANIFEST), {"format": MANIFEST_FORMAT, "hash": HASH, "files": files},
               durable=True, strict=True)
    fsync_dir(folder)


def _read_manifest(file: str) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(the files a manifest lists, what is wrong with it or None)."""
    try:
        with open(file, "rb") as f:
            data = json.loads(f.read(MAX_STATE_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return {}, f"{file}: cannot be read ({_one_line(exc, 200)})"
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        return {}, f"{file}: not a manifest embedtune writes (format {MANIFEST_FORMAT}, a 'files' object)"
    if data.get("hash") != HASH:
        return {}, f"{file}: lists {str(data.get('hash'))[:40]!r} hashes; this embedtune checks {HASH}"
    files = data["files"]
    for name, entry in files.items():
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or "" in parts or name == MANIFEST:
            return {}, f"{file}: names {name[:200]!r}, which is not a file of the checkpoint"
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
                and isinstance(entry.get(HASH), str) and HEX.match(entry[HASH])):
            return {}, f"{file}: the entry of {name[:200]!r} is not a size and a {HASH} hash"
    return files, None


def _writes_manifests(path: str) -> bool:
    """Whether checkpoint ``path`` was written by an embedtune that writes manifests: its
    trainer_state.json, written with every field, holds 'processes', which came with them."""
    try:
        with open(os.path.join(path, STATE_FILE), "rb") as f:
            data = json.loads(f.read(MAX_STATE_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # TrainerState.load says what is wrong with it
    return isinstance(data, dict) and "processes" in data


def manifest_problem(path: str) -> str | None:
    """What is wrong with checkpoint ``path``'s files by its manifest (a file missing, of another
    size, with another hash, or one it does not list), or None; None with a warning for a
    checkpoint written before manifests existed, which cannot be verified."""
    file = os.path.join(path, MANIFEST)
    if not os.path.lexists(file):
        if _writes_manifests(path):
            return (f"{file}: missing, though {STATE_FILE} was written by an embedtune that writes one: the "
                    f"checkpoint is incomplete or was changed; {DAMAGED}")
        logger.warning("%s was written before checkpoints had a manifest: its files cannot be verified (a damaged "
                       "file shows only when it is loaded, if at all)", path)
        return None
    listed, problem = _read_manifest(file)
    if problem:
        return f"{problem}; {DAMAGED}"
    present = set(files_under(path)) - {MANIFEST}
    if extra := sorted(present - set(listed)):
        return (f"{os.path.join(path, extra[0])}: not part of the checkpoint as it was written (not in {MANIFEST}); "
                f"{DAMAGED}")
    for name, entry in sorted(listed.items()):  # sizes first: they cost nothing
        file, written = os.path.join(path, name), entry["bytes"]
        if name not in present:
            return f"{file}: missing (it was written with {written} bytes); {DAMAGED}"
        info = os.lstat(file)
        if not stat.S_ISREG(info.st_mode):
            return f"{file}: not a plain file; {DAMAGED}"
        if info.st_size != written:
            what = (f"truncated: {info.st_size} of the {written} bytes written" if info.st_size < written
                    else f"{info.st_size} bytes where {written} were written")
            return f"{file}: {what}; {DAMAGED}"
    names = sorted(listed)
    try:
        sums = hash_files([os.path.join(path, name) for name in names])
    except OSError as exc:
        return f"{path}: a file cannot be read ({_one_line(exc)}); {DAMAGED}"
    for name, (_, digest) in zip(names, sums):
        if digest != listed[name][HASH]:
            return (f"{os.path.join(path, name)}: damaged: its contents differ from what was written (its {HASH} is "
                    f"not the one in {MANIFEST}); {DAMAGED}")
    return None


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


def _pickle_problem(path: str) -> str | None:
    """A file Accelerate reads with torch.load that does not load with weights_only=True: refused
    as code when the weights-only reader rejects what it holds, damaged when it cannot be read."""
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not name.endswith(PICKLED) or not os.path.isfile(file):
            continue
        try:
            _weights_only_load(file)
        except pickle.UnpicklingError as exc:
            return (f"{file}: refused: it does not load as plain tensors and numbers (torch.load with "
                    f"weights_only=True: {_refusal(exc)}). Loading it could run code; resume from a checkpoint "
                    "embedtune wrote.")
        except Exception as exc:  # a truncated or otherwise damaged file (zip, pickle or I/O errors)
            return f"{file}: damaged: it cannot be read ({_one_line(exc, 200)}), it may be truncated; {DAMAGED}"
    return None


# Checkpoints this process verified, by path, with the size, time and inode of each file then:
# find_checkpoint and load both verify, and the files are hashed once.
_VERIFIED: dict[str, tuple[Any, ...]] = {}


def _signature(path: str) -> tuple[Any, ...]:
    found = []
    for name in files_under(path):
        try:
            info = os.lstat(os.path.join(path, name))
        except OSError:
            return ()
        found.append((name, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(found)


def verify(path: str) -> None:
    """Refuse a checkpoint that is damaged or would run code when loaded (CheckpointError).

    Its files must match its manifest (present, same size, same hash; an older checkpoint without
    one is taken with a warning), the weights must be there, and every file Accelerate reads with
    torch.load must load with weights_only=True (our weights are safetensors, but FSDP writes its
    own with torch.save). Subfolders (FSDP's sharded state, DeepSpeed's files) are read by their
    own loaders, which unpickle without such a check; they are named in a warning.
    """
    key, signature = os.path.realpath(path), _signature(path)
    if signature and _VERIFIED.get(key) == signature:
        return
    problem = manifest_problem(path)
    names = sorted(os.listdir(path))
    folders = [n for n in names if os.path.isdir(os.path.join(path, n))]
    if not problem and not folders and not any(WEIGHTS.match(n) for n in names):
        problem = f"{path}: no model weights (model.safetensors); resume from another checkpoint"
    problem = problem or _pickle_problem(path)
    if problem:
        raise CheckpointError(problem)
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < SAFE_TORCH:
        logger.warning("torch %s: loading with weights_only=True is only safe from torch 2.6 on (CVE-2025-32434); "
                       "upgrade torch before resuming from checkpoints you did not write", torch.__version__)
    if folders:
        logger.warning("%s holds %s, read by their own loaders (FSDP, DeepSpeed), which unpickle without a "
                       "weights-only check: resume only from checkpoints you wrote", path, ", ".join(folders))
    _VERIFIED[key] = signature


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
    checkpoints hold its trainable parameters only (LoRA); they must be exactly those.

    What still fails to load (a file of an older checkpoint, which has no manifest, damaged or
    missing; a checkpoint of another model) is a CheckpointError naming the checkpoint."""
    verify(path)
    strict = {}
    if trainable_only is not None:
        _check_trainable(path, trainable_only)
        strict = {"strict": False}  # the frozen weights are the base model's, already loaded
    try:
        with _custom_states_weights_only():
            accelerator.load_state(path, load_kwargs={"weights_only": True}, **strict)
    except (pickle.UnpicklingError, MemoryError, torch.OutOfMemoryError):
        raise  # a refusal of the weights-only reader, or no memory: not the checkpoint's fault to report as such
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded ({_one_line(exc)}): a file is damaged or missing, or it "
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


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _default(dotted: str) -> Any:
    """The default of a config key, e.g. ``data.group_by_length``."""
    section, key = dotted.split(".")
    model = Config.model_fields[section].annotation
    return model.model_fields[key].get_default(call_default_factory=True)  # type: ignore[union-attr]


def _mining_default(cfg: Config) -> Any:
    """train.hard_negatives as the config fills it in when not given (as stored in a checkpoint)."""
    if cfg.loss.name not in IN_BATCH_LOSSES:
        return None
    return HardNegativesSection(**DEFAULT_MINING).model_dump(mode="json")


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
    if _absent(saved, "train.hard_negatives") and _lookup(now, "train.hard_negatives") == _mining_default(current):
        # Runs before this key mined nothing; the default that mines now steps aside for them.
        current.train.hard_negatives = None
        now = scrub_config(current.to_dict())
    if _absent(saved, "model.layout_by_cost") and current.model.layout_by_cost:
        # Runs before this key laid batches out by the fixed rule (packed attention one call per
        # text on the CPU): they keep it, so their dropout masks, and so the run, continue exactly.
        current.model.layout_by_cost = False
        now = scrub_config(current.to_dict())
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
    reason = _one_line(error) if error is not None else "it failed on another process (see that process's error)"
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
