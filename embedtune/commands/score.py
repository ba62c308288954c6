"""``embedtune score``: add a teacher's scores to Q&A records, for distillation (see ``embedtune.mining.scores``)."""

from __future__ import annotations

import argparse
import sys

from embedtune.commands.mine import run_command
from embedtune.mining.scores import ScoreOptions, score
from embedtune.mining.teacher import KINDS


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedtune score",
        description="Add a teacher's scores to Q&A records: [score(question, answer), score(question, negative 1), "
                    "...] in --field, in the order of the record's negatives; what data.scores_field reads for "
                    "distillation. Every record is written, in order, with all its fields.",
    )
    parser.add_argument("input", metavar="INPUT", help="Q&A records (JSONL, Parquet or CSV), with or without negatives")
    parser.add_argument("output", metavar="OUTPUT", help="JSONL: every input record, in order, with its scores")
    parser.add_argument("--teacher", required=True, metavar="MODEL",
                        help="a sentence-transformers CrossEncoder or an embedding model: a folder or a Hub name")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="auto (default): a CrossEncoder folder is scored as one (predict), any other model by "
                        "the similarity of its query and document embeddings, with its prompts")
    parser.add_argument("--logits", action="store_true",
                        help="a cross-encoder's raw logits, without its activation (the usual scores for "
                        "MarginMSELoss: a sigmoid squeezes the margins of pairs the teacher is sure of)")
    parser.add_argument("--field", default="scores", help="the field written (replaced where it holds a list)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs (or texts) per forward pass (default 32)")
    parser.add_argument("--max-length", type=int, help="tokens per input (default: the teacher's own)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="records read, scored and written at once")
    parser.add_argument("--held-out", type=float, default=0.0, metavar="FRACTION",
                        help="training's data.eval_fraction: those records are written unchanged, without scores")
    parser.add_argument("--query-field", default="question")
    parser.add_argument("--positive-field", default="answer")
    parser.add_argument("--negatives-field", default="negatives",
                        help="the hard negatives scored after the positive (a record without them gets one score)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the code that comes with the model")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_length", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.held_out < 1:
        parser.error(f"--held-out must be in [0, 1), got {args.held_out}")


def _score(args: argparse.Namespace) -> list[str]:
    options = ScoreOptions(
        teacher=args.teacher, input=args.input, output=args.output, kind=args.kind, field=args.field,
        batch_size=args.batch_size, max_length=args.max_length, chunk_size=args.chunk_size, held_out=args.held_out,
        query_field=args.query_field, positive_field=args.positive_field, negatives_field=args.negatives_field,
        trust_remote_code=args.trust_remote_code, logits=args.logits,
    )
    return score(options).lines(args.teacher, args.output)


def main(argv: list[str] | None = None) -> int:
    return run_command(make_parser(), argv, check_args, _score)


if __name__ == "__main__":
    sys.exit(main())
