"""``embedtune train``, ``python train.py`` and ``accelerate launch train.py``: one program."""

from __future__ import annotations

import logging
import sys

from embedtune.config import ConfigError, parse_args
from embedtune.data.records import DataError
from embedtune.model.folder import ModelLoadError
from embedtune.training.checkpoint import CheckpointError
from embedtune.training.trainer import TrainingStopped, run_training

logger = logging.getLogger("embedtune")


def main(argv: list[str] | None = None, prog: str = "embedtune train") -> int:
    try:
        cfg = parse_args(argv, prog=prog)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_training(cfg)
    except (DataError, ConfigError, ModelLoadError, CheckpointError, TrainingStopped) as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
