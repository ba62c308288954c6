"""The ``embedtune`` command."""

from __future__ import annotations

import argparse
import sys

from embedtune import __version__

COMMANDS = {
    "train": "fine-tune a model (same options as train.py; see `embedtune train --help`)",
    "bench": "benchmarks that print figures: throughput, negatives, resume, gradcache",
    "eval": "retrieval metrics of a model on Q&A pairs or queries/corpus/qrels files",
    "validate": "check the environment, data, config and disk before a run (same options as train)",
    "report": "PNG plots of a run from its training_metrics.jsonl (no W&B needed)",
    "mine": "add hard negatives to a Q&A file, mined with a model",
    "soak": "kill a 2-process CPU training at random moments, resume it each time, and compare it with an "
            "uninterrupted run (embedtune soak --cycles 20)",
}
MODULES = {"eval": "embedtune.evaluate", "validate": "embedtune.validate", "report": "embedtune.report",
           "mine": "embedtune.mine", "soak": "embedtune.soak"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="embedtune", description="Fine-tune sentence-embedding models "
                                     "on question/answer pairs.")
    parser.add_argument("--version", action="version", version=f"embedtune {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv or ["--help"])
        return 2
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "train":
        from embedtune.train import main as train_main

        return train_main(argv[1:], prog="embedtune train")
    if args.command in MODULES:
        import importlib

        return importlib.import_module(MODULES[args.command]).main(argv[1:])
    if args.command == "bench":
        from embedtune.bench import main as bench_main

        return bench_main(argv[1:])
    return 2


if __name__ == "__main__":
    sys.exit(main())
