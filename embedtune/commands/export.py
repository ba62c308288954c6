"""``embedtune export CHECKPOINT OUT``: any checkpoint as a sentence-transformers folder with its card.

The last checkpoint of a run that was killed before its export, the best one, or any other: the
weights of that step, loadable with ``SentenceTransformer(OUT)``. The training data need not be
there: the card gives the data's sizes and hashes as the checkpoint recorded them, and the held-out
metrics the run logged at that step. OUT is written whole in ``OUT.tmp``, then renamed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from embedtune.config import ConfigError
from embedtune.data.records import DataError
from embedtune.logs import log_to_console, scrub_console
from embedtune.model.folder import ModelLoadError
from embedtune.model.onnx import export_onnx, runtime
from embedtune.training.from_checkpoint import export_checkpoint, open_checkpoint
from embedtune.training.state import CheckpointError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtune export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, OUTPUT_DIR/checkpoints/step-NNNNNNNN")
    parser.add_argument("out", help="the model folder to write (must not exist, or be empty)")
    parser.add_argument("--onnx", action="store_true", help="also export the model to ONNX, in OUT")
    parser.add_argument("--quantize", choices=["int8"], help="an int8-quantized ONNX model (implies --onnx)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the code that comes with the base model (runs trained with "
                        "model.trust_remote_code=true need it)")
    return parser


def out_problem(out: str) -> str | None:
    """Why OUT cannot be written (one line), or None: it must not exist, or be an empty folder."""
    if os.path.isdir(out):
        return None if not os.listdir(out) else (f"{out}: exists and is not empty; give a new folder (or empty "
                                                 "this one)")
    if os.path.lexists(out):
        return f"{out}: exists and is not a folder; give a new folder"
    return None


def onnx_exporter(quantize: str | None, trust_remote_code: bool) -> Callable[[str], Any]:
    """``export_onnx`` for the folder written; its packages are checked now, so a missing one is
    told before any work (ImportError, its message one line naming the extra)."""
    runtime()
    return lambda folder: export_onnx(folder, quantize, trust_remote_code)


def main(argv: list[str] | None = None) -> int:
    scrub_console()  # main also runs without the embedtune command (python -m embedtune.commands.export)
    args = make_parser().parse_args(argv)
    log_to_console(logging.WARNING)
    out = os.path.normpath(args.out)
    if problem := out_problem(out):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    then = None
    if args.onnx or args.quantize:
        try:
            then = onnx_exporter(args.quantize, args.trust_remote_code)
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    try:
        run = open_checkpoint(args.checkpoint)
        onnx = export_checkpoint(run, out, trust_remote_code=args.trust_remote_code, then=then)
    except (CheckpointError, ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"{out}: the model of {run.name} (step {run.state.step:,}), with its card; load it with "
          f"SentenceTransformer({out!r})")
    if isinstance(onnx, dict):
        shown = ", ".join(f"{key} {value}" for key, value in onnx.items())
        print(f"ONNX: {shown.replace(out + '.tmp', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
