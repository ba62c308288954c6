"""Small file jobs, each written once: atomic writes, JSON in and out, sizes for people."""

from __future__ import annotations

import json
import os
from typing import Any


def write_atomic(path: str, text: str, durable: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: a reader sees the old
    file or the new one, never half of one. ``durable`` also flushes it to the disk first."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, payload: Any, durable: bool = False, strict: bool = False) -> None:
    """``payload`` as indented JSON, atomically; the folder is created when missing. A value JSON
    has no type for is written as its text, unless ``strict`` (then it is a TypeError)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(payload, indent=2, default=None if strict else str)
    write_atomic(path, text + "\n", durable)


def read_json(path: str) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    value = read_json(path)
    return value if isinstance(value, dict) else {}


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_bytes(value: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
