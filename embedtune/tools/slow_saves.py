"""Training whose every checkpoint save lasts at least SECONDS longer: a fault-injection wrapper.

``python -m embedtune.tools.slow_saves SECONDS [training arguments...]`` (or
``accelerate launch ... -m embedtune.tools.slow_saves SECONDS ...``) installs a hook in
``embedtune.training.checkpoint.SAVE_HOOKS`` that sleeps SECONDS on every process, after
Accelerate's state is written to ``step-N.tmp`` and before the checkpoint is complete, then runs
the training program (``embedtune.commands.train``) on the remaining arguments and exits with its
status. The wider window lets the kill soak and the resume tests kill a run in the middle of a
save reliably. Production runs never go through it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from embedtune.commands.train import main as train_main
from embedtune.training import checkpoint

PROG = "python -m embedtune.tools.slow_saves SECONDS"
USAGE = f"usage: {PROG} [training arguments...]\nSECONDS: how long every checkpoint save pauses (0 or more)"


def sleeping_hook(seconds: float) -> Callable[[str], None]:
    """A save hook that pauses ``seconds`` inside each save (the folder is not touched)."""

    def pause(folder: str) -> None:
        time.sleep(seconds)

    return pause


def parse_seconds(text: str) -> float | None:
    """SECONDS as a finite number, 0 or more; None when it is not one."""
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    seconds = parse_seconds(argv[0])
    if seconds is None:
        print(f"error: SECONDS must be a number, 0 or more; got {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    hook = sleeping_hook(seconds)
    checkpoint.SAVE_HOOKS.append(hook)
    try:
        return train_main(argv[1:], prog=PROG)
    finally:
        # Called in-process (not as a program), later saves must not pause.
        checkpoint.SAVE_HOOKS.remove(hook)


if __name__ == "__main__":
    sys.exit(main())
