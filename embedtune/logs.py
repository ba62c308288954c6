"""Logging, set up one way for every command: the ``embedtune`` logger, every line scrubbed of secrets."""

from __future__ import annotations

import logging
import os
import sys

from embedtune.secrets import scrub_text

LOGGER = "embedtune"
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ScrubbedFormatter(logging.Formatter):
    """A formatter whose lines never hold a secret of the environment or a URL's credentials."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub_text(super().format(record))


def log_to_console(level: int = logging.INFO, keep_existing: bool = False) -> logging.Logger:
    """The ``embedtune`` logger on stderr at ``level``, replacing its handlers; with
    ``keep_existing``, left alone when something (a training run) has set it up already."""
    root = logging.getLogger(LOGGER)
    if keep_existing and root.handlers:
        return root
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ScrubbedFormatter(CONSOLE_FORMAT, "%H:%M:%S"))
    root.addHandler(console)
    return root


def setup_logging(output_dir: str, is_main: bool) -> None:
    """A training run's: the console on every process (warnings only off the main one), and
    ``output_dir/logs/train.log`` on the main one."""
    root = log_to_console(logging.INFO if is_main else logging.WARNING)
    if is_main:
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
        file = logging.FileHandler(os.path.join(output_dir, "logs", "train.log"), encoding="utf-8")
        file.setFormatter(ScrubbedFormatter(FILE_FORMAT))
        root.addHandler(file)
