"""What a run read: each data file's size, modification time and a sampled hash, saved with every
checkpoint and compared on resume, so that a file changed under a run (records appended, lines
reordered, another file in its place) is noticed instead of training on examples twice or never.

A file up to ``WHOLE_BYTES`` is hashed whole (sha256, about 1 GB/s on one core: a quarter
second at most); a bigger one by ``BLOCKS`` blocks spread over it, so the check costs the same on a
100 GB file: an append or a cut changes its size, a reordering of the file one of the blocks.

With ``data.order: indexed`` (data in many shards, where hashing each whole would be a pass over
all of it before step 1) every file is hashed by ``INDEXED_SAMPLE`` smaller blocks, a mebibyte
of each at most; there the reader also checks each line it reads against the index.
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
INDEXED_SAMPLE = [16, 64 << 10]  # blocks, bytes each


def sampled_hash(path: str, size: int, blocks: int = BLOCKS, block_bytes: int = BLOCK_BYTES,
                 whole: int = WHOLE_BYTES) -> str:
    """The file's sha256 (``files.hash_file``) up to ``whole`` bytes; above that, a sha256 of its
    size and ``blocks`` blocks at evenly spaced offsets."""
    if size <= whole:
        return hash_file(path)[1]
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek((size - block_bytes) * i // (blocks - 1))
            digest.update(f.read(block_bytes))
    return digest.hexdigest()


def describe_file(path: str, sample: list[int] | None = None) -> dict[str, Any]:
    """Its size, modification time and hash; with ``sample`` ([blocks, bytes]) hashed by that many
    blocks whatever its size (and the description says so)."""
    if "://" in path:  # a URL: nothing to stat cheaply
        return {"remote": True}
    stat = os.stat(path)
    if sample is None:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": sampled_hash(path, stat.st_size)}
    blocks, block_bytes = sample
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample": [blocks, block_bytes],
            "hash": sampled_hash(path, stat.st_size, blocks, block_bytes, blocks * block_bytes)}


def data_identity(cfg: DataConfig, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every training and eval file the config reads, by the name it resolves to, described; a file
    that ``like`` (a checkpoint's) describes is described the same way, so the two compare."""
    default = INDEXED_SAMPLE if cfg.order == "indexed" else None
    like = like or {}
    # Keyed as checkpoints store names: a password or token in a URL never reaches the disk.
    described = {}
    for path in dict.fromkeys(resolve_files(cfg.train_files) + resolve_files(cfg.eval_files)):
        name = scrub_text(path)
        saved = like.get(name)
        described[name] = describe_file(path, saved.get("sample") if isinstance(saved, dict) else default)
    return described


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
