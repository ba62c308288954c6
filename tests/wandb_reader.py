"""Read back what an offline W&B run wrote, from its ``run-<id>.wandb`` file.

The file is a LevelDB-style log of 32 KiB blocks (7-byte header, then chunks of crc, length and
type) whose payloads are ``wandb_internal_pb2.Record`` messages. Read it after the run finished.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"not a W&B run file: {path}")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        if len(payload) < length:
            break
        pos += 7 + length
        if kind == FIRST:
            pending = payload
            continue
        if kind == MIDDLE:
            pending += payload
            continue
        whole = payload if kind == FULL else pending + payload
        pending = b""
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def _assign(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def run_files(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb")))


def read_run(path: str) -> dict[str, Any]:
    """history rows, config, summary and meta (id, project, tags, exit code) of one run file."""
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _assign(row, item)
            row.setdefault("_step", record.history.step.num)
            history.append(row)
        elif kind == "run":
            run = record.run
            meta.update(id=run.run_id, project=run.project, name=run.display_name, tags=list(run.tags))
            for item in run.config.update:
                _assign(config, item)
        elif kind in ("config", "summary"):
            target = config if kind == "config" else summary
            for item in getattr(record, kind).update:
                _assign(target, item)
        elif kind == "exit":
            meta["exit_code"] = record.exit.exit_code
    config.pop("_wandb", None)
    return {"history": history, "config": config, "summary": summary, "meta": meta}
