"""``embedtune train``, ``python train.py`` and ``accelerate launch train.py``: one program."""

from __future__ import annotations

import logging
import os
import sys

from embedtune.config import ConfigError, parse_args
from embedtune.data.records import DataError
from embedtune.distributed import run_signals, stop_with_launcher
from embedtune.logs import scrub_console
from embedtune.model.folder import ModelLoadError
from embedtune.training.state import CheckpointError
from embedtune.training.trainer import TrainingStopped, run_training

logger = logging.getLogger("embedtune")


# The exit status of a run that a second Ctrl-C stopped at once: 128 + SIGINT, as a shell reports it.
INTERRUPTED = 130


def main(argv: list[str] | None = None, prog: str = "embedtune train") -> int:
    """Train; the exit status: 0 when done or stopped by a signal with a checkpoint, 1 on an error
    the message explains, 2 on bad arguments, 130 when a second Ctrl-C stopped the run at once."""
    scrub_console()  # a password in a data URL never reaches the terminal
    # The run starts a W&B service of its own. One the environment names was started by the process
    # that launched this one (a notebook, a script that used wandb): it may be gone, and while it
    # lives it holds the ids of the runs it served, so a killed run could not be resumed through it.
    os.environ.pop("WANDB_SERVICE", None)
    stop_with_launcher()
    try:
        cfg = parse_args(argv, prog=prog)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with run_signals():  # from setup to the end: a signal is never lost, a repeated one never kills
            run_training(cfg)
    except (DataError, ConfigError, ModelLoadError, CheckpointError, TrainingStopped) as exc:
        if logger.handlers:  # once the run's log is set up: the message goes to train.log too
            logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped at once, without saving the step in progress; continue from the last checkpoint with "
              "--resume_from_checkpoint latest", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
