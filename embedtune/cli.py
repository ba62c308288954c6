"""The ``embedtune`` command: one table of subcommands, each ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

from embedtune import __version__
from embedtune.logs import scrub_console

# name: (where its main is, what it does). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("embedtune.commands.train:main",
              "fine-tune a model (same options as train.py; see `embedtune train --help`)"),
    "eval": ("embedtune.commands.eval:main",
             "retrieval metrics of a model on Q&A pairs or queries/corpus/qrels files"),
    "mine": ("embedtune.commands.mine:main", "add hard negatives to a Q&A file, mined with a model"),
    "score": ("embedtune.commands.score:main",
              "add a teacher's scores (a cross-encoder or an embedding model) to Q&A records, for distillation"),
    "validate": ("embedtune.commands.validate:main",
                 "check the environment, data, config and disk before a run (same options as train)"),
    "export": ("embedtune.commands.export:main",
               "turn a checkpoint (of a finished, best or killed run) into a sentence-transformers folder with its card"),
    "search": ("embedtune.commands.search:main", "search a corpus with a fine-tuned model (builds and reuses its index)"),
    "report": ("embedtune.commands.report:main", "PNG plots of a run from its training_metrics.jsonl (no W&B needed)"),
    "bench": ("embedtune.tools.bench:main", "benchmarks that print figures: throughput, memory, negatives, quality, resume, gradcache, data"),
    "soak": ("embedtune.tools.soak:main", "interrupt a 2-process CPU training at random moments and in random ways "
             "(SIGKILL, SIGTERM storms, a full disk, a damaged checkpoint, a second run), resume it each time, and "
             "compare it with an uninterrupted run (embedtune soak --cycles 20)"),
}


def main(argv: list[str] | None = None) -> int:
    # Before anything is printed: a usage error, a command's output or error line, a traceback
    # would otherwise show a URL's password as typed.
    scrub_console()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="embedtune", description="Fine-tune sentence-embedding models "
                                     "on question/answer pairs.")
    parser.add_argument("--version", action="version", version=f"embedtune {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()))
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv or ["--help"])
        return 2
    args = parser.parse_args(argv[:1])
    module, _, function = COMMANDS[args.command][0].partition(":")
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
