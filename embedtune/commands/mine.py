"""``embedtune mine``: add hard negatives to Q&A records, mined with a model (see ``embedtune.mining``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from embedtune.data.records import DataError
from embedtune.logs import log_to_console, scrub_console
from embedtune.mining import MineError
from embedtune.mining.negatives import Selection
from embedtune.mining.run import DEFAULT_MODEL, SCORE_BUDGET, MineOptions, mine
from embedtune.mining.teacher import KINDS
from embedtune.model.folder import ModelLoadError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedtune mine",
        description="Add hard negatives to Q&A records: for each question, the documents the model ranks "
                    "closest to it that are not its answer. The corpus is the distinct answers of the input "
                    "plus any --corpus documents.",
    )
    parser.add_argument("--model", required=True, help="model folder (a fine-tuned final_model/ too), or "
                        f"{DEFAULT_MODEL}, which ships with the package")
    parser.add_argument("--input", required=True, help="Q&A records (JSONL, Parquet or CSV)")
    parser.add_argument("--output", required=True, help="JSONL: every input record, in order, with negatives")
    parser.add_argument("--corpus", action="append", metavar="DOCS.jsonl",
                        help="extra documents: records with 'text' (and an optional 'title'); repeatable")
    parser.add_argument("--num-negatives", type=int, default=5, help="negatives per record (default 5)")
    parser.add_argument("--skip-top", type=int, default=0, help="pass over the N closest candidates first")
    parser.add_argument("--held-out", type=float, default=0.0, metavar="FRACTION",
                        help="training's data.eval_fraction: those records get no negatives and their answers "
                        "are never negatives, so evaluation stays untouched by mining")
    margins = parser.add_mutually_exclusive_group()
    margins.add_argument("--margin", type=float, help="keep candidates scored below positive - M")
    margins.add_argument("--relative-margin", type=float, help="keep candidates scored below positive * (1 - R)")
    parser.add_argument("--max-candidates", type=int, default=1000,
                        help="how deep the ranking is searched for candidates that pass the margin (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    parser.add_argument("--chunk-size", type=int, default=4096, help="questions read, encoded and searched at once")
    parser.add_argument("--corpus-chunk-size", type=int, help="documents scored at once (default: a budget of "
                        f"{SCORE_BUDGET:,} scores per chunk)")
    parser.add_argument("--query-max-length", type=int, help="default 64, capped by the model's max length")
    parser.add_argument("--document-max-length", type=int, help="default 256, capped by the model's max length")
    parser.add_argument("--query-prefix", help="default: the model folder's 'query' prompt, else none")
    parser.add_argument("--document-prefix", help="default: the model folder's 'document' prompt, else none")
    parser.add_argument("--query-field", default="question")
    parser.add_argument("--positive-field", default="answer")
    parser.add_argument("--negatives-field", default="negatives", help="the field written (replaced if present)")
    parser.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto",
                        help="auto: faiss when installed and no GPU is used, else torch")
    teacher = parser.add_argument_group("teacher scores, for distillation (see embedtune score)")
    teacher.add_argument("--teacher", metavar="MODEL", help="a CrossEncoder or an embedding model (folder or Hub "
                         "name) that scores each record's answer and mined negatives, written to --scores-field")
    teacher.add_argument("--teacher-kind", choices=KINDS, default="auto",
                         help="auto: told apart by the folder (a CrossEncoder's, else an embedding model's)")
    teacher.add_argument("--teacher-max-ratio", type=float, metavar="R",
                         help="drop candidates the teacher scores above R x the answer's score (e.g. 0.95) as "
                         "likely false negatives; the next candidates take their place")
    teacher.add_argument("--teacher-logits", action="store_true",
                         help="a cross-encoder teacher's raw logits, without its activation (see embedtune score "
                         "--logits); a ratio of logits means little, so not with --teacher-max-ratio")
    teacher.add_argument("--scores-field", default="scores",
                         help="the field the teacher's scores are written to: the answer's, then one per negative; "
                         "without --teacher, a list of scores there is left out (it scored the old negatives)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the code that comes with the model")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="how the corpus embeddings are held (scores are computed in float32)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_negatives", "batch_size", "chunk_size", "corpus_chunk_size", "query_max_length",
                 "document_max_length", "max_candidates"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.skip_top < 0:
        parser.error(f"--skip-top must be 0 or more, got {args.skip_top}")
    if args.margin is not None and not args.margin >= 0:
        parser.error(f"--margin must be 0 or more, got {args.margin}")
    if args.relative_margin is not None and not 0 <= args.relative_margin < 1:
        parser.error(f"--relative-margin must be in [0, 1), got {args.relative_margin}")
    if args.teacher_max_ratio is not None and not args.teacher_max_ratio > 0:
        parser.error(f"--teacher-max-ratio must be above 0, got {args.teacher_max_ratio}")
    if args.teacher_max_ratio is not None and not args.teacher:
        parser.error("--teacher-max-ratio needs --teacher: the model whose scores it compares")
    if args.teacher_logits and not args.teacher:
        parser.error("--teacher-logits needs --teacher: the cross-encoder whose logits are written")
    if args.teacher_logits and args.teacher_max_ratio is not None:
        parser.error("--teacher-max-ratio compares scores as a fraction of the answer's, which logits (of either "
                     "sign) do not allow; filter with the model's own scores, leaving out --teacher-logits")


def options_from(args: argparse.Namespace) -> MineOptions:
    return MineOptions(
        model=args.model, input=args.input, output=args.output, corpus=tuple(args.corpus or ()),
        selection=Selection(args.num_negatives, args.skip_top, args.margin, args.relative_margin,
                            args.max_candidates),
        held_out=args.held_out, batch_size=args.batch_size, chunk_size=args.chunk_size,
        corpus_chunk_size=args.corpus_chunk_size, query_max_length=args.query_max_length,
        document_max_length=args.document_max_length, query_prefix=args.query_prefix,
        document_prefix=args.document_prefix, query_field=args.query_field, positive_field=args.positive_field,
        negatives_field=args.negatives_field, backend=args.backend, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, teacher=args.teacher, teacher_kind=args.teacher_kind,
        teacher_logits=args.teacher_logits,
        teacher_max_ratio=args.teacher_max_ratio, scores_field=args.scores_field,
    )


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None,
                check: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
                work: Callable[[argparse.Namespace], list[str]]) -> int:
    """A mining command (``mine``, ``score``): parse and check the arguments, run ``work``, print the
    lines of its summary. The exit status: 0 done, 1 an error the message explains, 2 bad arguments."""
    scrub_console()  # main also runs without the embedtune command (python -m embedtune.commands.NAME)
    try:
        args = parser.parse_args(argv)
        check(parser, args)
    except SystemExit as exc:  # --help, or a usage error argparse has already explained
        return int(exc.code or 0)
    log_to_console(keep_existing=True)  # progress on stderr; a training run in this process keeps its own
    try:
        lines = work(args)
    except (DataError, MineError, ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(make_parser(), argv, check_args, lambda args: mine(options_from(args)).lines(
        args.num_negatives, args.output, args.teacher_max_ratio, args.scores_field))


if __name__ == "__main__":
    sys.exit(main())
