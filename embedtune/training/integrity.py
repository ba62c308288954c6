"""Is a checkpoint intact and safe to load? Its manifest, and the files read with torch.load.

Every checkpoint holds ``manifest.json``, written last, which lists every other file with its size
and sha256. Before anything of a checkpoint is loaded, its files are checked against it (present,
same size, same hash), so a damaged checkpoint is refused naming the file and what is wrong.
sha256 (with the CPU's SHA instructions) keeps up with the disk: on 2 busy cores it hashed
520-640 MB/s from the page cache (1.2 GB/s idle) and 350-380 MB/s from the disk, where writing and
flushing runs at about 200 MB/s; for a 1 GiB checkpoint a save takes 1.8 s more (hash and flush)
and a resume 1.7 s (5.5 s from a cold cache). Checkpoints written before manifests existed are
resumed with a warning that they cannot be verified.

A checkpoint is read as untrusted input. The weights are safetensors; every file that Accelerate
reads with ``torch.load`` must load with ``weights_only=True`` (plain tensors, numbers and
containers: no code runs) before anything of it is used, and ``checkpoint.load`` makes
Accelerate read them that way.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from embedtune.files import HASH, files_under, fsync_dir, hash_files, write_json
from embedtune.training.state import MAX_STATE_BYTES, STATE_FILE, CheckpointError

logger = logging.getLogger("embedtune")

MANIFEST = "manifest.json"  # every other file of the checkpoint, with its size and hash; written last
MANIFEST_FORMAT = 1
HEX = re.compile(r"^[0-9a-f]{64}$")
DAMAGED = "resume from an earlier checkpoint (--resume_from_checkpoint latest takes the newest intact one)"
WEIGHTS = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model\w*\.bin)$")
# Files Accelerate reads with torch.load: optimizer, registered objects (the learning-rate
# schedule), RNG, loss scaler, sampler; and the weights under FSDP, which has no safetensors.
PICKLED = (".bin", ".pkl", ".pt", ".pth", ".pickle", ".ckpt")
SAFE_TORCH = (2, 6)  # weights_only=True could still run code before torch 2.6 (CVE-2025-32434)


def one_line(exc: BaseException, limit: int = 300) -> str:
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
        return {}, f"{file}: cannot be read ({one_line(exc, 200)})"
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
        return f"{path}: a file cannot be read ({one_line(exc)}); {DAMAGED}"
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
            return f"{file}: damaged: it cannot be read ({one_line(exc, 200)}), it may be truncated; {DAMAGED}"
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
def custom_states_weights_only() -> Iterator[None]:
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
