"""What a run read: each data file's size, modification time and a sampled hash, saved with every
checkpoint and compared on resume, so that a file changed under a run (records appended, lines
reordered, another file in its place) is noticed instead of training on examples twice or never.

A file up to ``WHOLE_BYTES`` is hashed whole (sha256, about 1 GB/s on one core: a quarter
second at most); a bigger one by ``BLOCKS`` blocks spread over it, so the check costs the same on a
100 GB file: an append or a cut changes its size, a reordering of the file one of the blocks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from embedtune.config import DataConfig
from embedtune.data.records import resolve_files
from embedtune.files import hash_file
from embedtune.secrets import scrub_text

WHOLE_BYTES = 256 << 20
BLOCKS = 64
BLOCK_BYTES = 1 << 20


def sampled_hash(path: str, size: int) -> str:
    """The file's sha256 (``files.hash_file``) up to ``WHOLE_BYTES``; above that, a sha256 of its
    size and ``BLOCKS`` blocks at evenly spaced offsets."""
    if size <= WHOLE_BYTES:
        return hash_file(path)[1]
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(BLOCKS):
            f.seek((size - BLOCK_BYTES) * i // (BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))
    return digest.hexdigest()


def describe_file(path: str) -> dict[str, Any]:
    if "://" in path:  # a URL: nothing to stat cheaply
        return {"remote": True}
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": sampled_hash(path, stat.st_size)}


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    """Every training and eval file the config reads, by the name it resolves to, described."""
    # Keyed as checkpoints store names: a password or token in a URL never reaches the disk.
    return {scrub_text(path): describe_file(path) for path in dict.fromkeys(resolve_files(cfg.train_files)
                                                                          + resolve_files(cfg.eval_files))}


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that alter what the run reads, harmless differences) between two identities."""
    changed, harmless = [], []
    for path in sorted(set(saved) | set(now)):
        was, is_ = saved.get(path), now.get(path)
        if was is None:
            changed.append(f"{path}: read now, not by the run so far")
        elif is_ is None:
            changed.append(f"{path}: read by the run so far, not now")
        elif was.get("remote") or is_.get("remote"):
            harmless.append(f"{path}: a URL, not checked")
        elif was.get("size") != is_.get("size"):
            changed.append(f"{path}: {was.get('size'):,} bytes at the checkpoint, {is_.get('size'):,} now")
        elif was.get("hash") != is_.get("hash"):
            changed.append(f"{path}: same size, other contents (edited or reordered)")
        elif was.get("mtime_ns") != is_.get("mtime_ns"):
            harmless.append(f"{path}: modified time changed, contents sampled the same")
    return changed, harmless
