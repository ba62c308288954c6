"""What the examples share: the model a training run left, and the run's questions and answers.

OUTPUT_DIR is a training run's output folder (its ``final_model/`` and ``config.yaml``) or a model
folder; a model folder brings no data of its own, so the quickstart's questions and answers,
which ship with embedtune, stand in for the run's.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from embedtune.commands.search import SearchError, locate, run_answers, run_data
from embedtune.config import DataConfig, resolve_config_path
from embedtune.data.records import DataError, Pair, Reject, read_pairs, resolve_files
from embedtune.data.split import eval_pairs
from embedtune.model.folder import ModelLoadError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class MissingExtra(ImportError):
    """An optional package an example needs is not installed; the message names the extra."""


@dataclass(frozen=True)
class Run:
    model_path: str
    data: DataConfig  # the run's data section, or the quickstart's for a bare model folder
    quickstart: bool  # True: a model folder was given, and the data is the quickstart's

    def answers(self) -> list[str]:
        """The distinct answers of the run's data: the corpus the examples search."""
        return run_answers(self.data)

    def held_out(self) -> tuple[list[Pair], str]:
        """The pairs whose questions training held out, and what they are. A run that held out
        none gives its first training pairs instead (the model has seen those)."""
        pairs = eval_pairs(self.data)
        if pairs:
            return pairs, "held-out questions (never trained on)"
        pairs = [p for p in read_pairs(resolve_files(self.data.train_files), self.data) if not isinstance(p, Reject)]
        return pairs[:self.data.max_eval_queries], "training questions (the run held none out)"


def open_run(path: str) -> Run:
    target = locate(path)
    if target.data is not None:
        return Run(target.model, target.data, quickstart=False)
    print(f"{path} is a model folder: its questions and answers come from the quickstart's data", file=sys.stderr)
    return Run(target.model, run_data(str(resolve_config_path("quickstart"))), quickstart=True)


def load_model(run: Run) -> SentenceTransformer:
    """The model as sentence-transformers loads it; ``encode_query`` and ``encode_document`` add
    the prompts it was saved with (embedtune saves its training prefixes as the "query" and
    "document" prompts)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the weights load in a blink; keep the output to the results
    return SentenceTransformer(run.model_path)


def need(module: str, extra: str) -> ModuleType:
    """An optional package, or a MissingExtra that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"this example needs {module}, which is not installed: pip install "
                           f"'embedtune[{extra}]'") from None


def make_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m embedtune.examples.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training run's output folder, or a model folder")
    return parser


def reports_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """An example's ``main`` that prints a bad input as one line and returns 1 (2 for bad arguments)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except SystemExit as exc:  # --help, or argparse has explained a usage error
            return int(exc.code or 0)
        except (SearchError, DataError, ModelLoadError, MissingExtra, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def shorten(text: str, width: int = 100) -> str:
    """A text on one line, cut to ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
