"""What a command shows, set up one way for every command, every line scrubbed of secrets.

The console: ``scrub_console`` puts a scrubbing layer over ``sys.stdout`` and ``sys.stderr``, so
whatever is printed there (a command's table and ``error:`` line, a usage error, a traceback, a
library's warning, a progress bar) is scrubbed, and so is what W&B records of the console. The
``embedtune`` logger writes there, and a training run's ``logs/train.log`` gets the same lines
through ``ScrubbedFormatter``. A command's ``--json`` report goes through ``write_report``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from embedtune.files import write_json
from embedtune.secrets import scrub_text, scrub_value

LOGGER = "embedtune"
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ScrubbedFormatter(logging.Formatter):
    """A formatter whose lines never hold a secret of the environment or a URL's credentials."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub_text(super().format(record))


def _scrubbed(text: Any) -> Any:
    return scrub_text(text) if isinstance(text, str) else text


class ScrubbedStream:
    """A text stream that scrubs every text written to it, then hands it to the stream it wraps.

    Anything else (``fileno``, ``isatty``, ``encoding``, ``flush``...) is the wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        object.__setattr__(self, "stream", stream)

    def write(self, text: str) -> int:
        self.stream.write(_scrubbed(text))
        return len(text)  # what the caller gave: a shorter scrubbed text is not a short write

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        if name == "stream":  # not set yet (a copy being made): no wrapped stream to ask
            raise AttributeError(name)
        return getattr(self.stream, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # W&B captures the console by replacing the stream's ``write`` with one that calls the old
        # one and records the text; whoever replaces it this way is handed the scrubbed text, so
        # W&B's copy of the console (output.log) is scrubbed too.
        if name == "write" and callable(value):
            value = _scrubbing(value)
        object.__setattr__(self, name, value)


def _scrubbing(write: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def scrubbed_write(text: Any) -> Any:
        return write(_scrubbed(text))

    return scrubbed_write


def scrub_console() -> None:
    """Scrub whatever this process prints to stdout and stderr from now on (once is enough)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ScrubbedStream):
            setattr(sys, name, ScrubbedStream(stream))


def write_report(path: str, payload: Any) -> None:
    """A command's ``--json`` report, every text in it scrubbed."""
    write_json(path, scrub_value(payload))


def log_to_console(level: int = logging.INFO, keep_existing: bool = False) -> logging.Logger:
    """The ``embedtune`` logger on stderr at ``level``, replacing its handlers; with
    ``keep_existing``, left alone when something (a training run) has set it up already.
    The console is scrubbed either way."""
    scrub_console()
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
