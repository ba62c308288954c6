"""The trainer's own state in a checkpoint: ``trainer_state.json``, read as untrusted input.

Everything besides Accelerate's state that an exact resume needs (data position, counters, the
trackers' run ids, the config), written as JSON and read back field by field: a file embedtune
did not write, or one that was edited, is refused before anything of the checkpoint is used.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"^step-(\d{8})$")  # a checkpoint's folder
RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # a W&B or MLflow run id; W&B's becomes part of a folder name
MAX_STATE_BYTES = 64 << 20


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
