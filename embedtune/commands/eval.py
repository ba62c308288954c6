"""``embedtune eval MODEL``: retrieval metrics of a model on Q&A pairs or on BEIR-style files.

Run it under ``accelerate launch -m embedtune eval ...`` to split the encoding across processes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from accelerate import Accelerator

from embedtune.config import DataConfig
from embedtune.data.collate import PairCollator
from embedtune.data.records import DataError
from embedtune.data.split import eval_pairs
from embedtune.distributed import cpu_processes
from embedtune.logs import log_to_console, scrub_console, write_report
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import ModelLoadError
from embedtune.retrieval import (
    EvalResult,
    RetrievalSet,
    example_columns,
    example_rows,
    metrics_table,
    run_retrieval,
    set_encoder,
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtune eval", description=__doc__)
    parser.add_argument("model", help="a model folder (e.g. OUTPUT_DIR/final_model) or "
                        "sentence-transformers/all-MiniLM-L6-v2")
    data = parser.add_argument_group("data: Q&A pairs, or queries / corpus / qrels")
    data.add_argument("--qa", nargs="+", metavar="FILE", help="Q&A files: each question against all answers")
    data.add_argument("--held-out", type=float, default=None, metavar="FRACTION",
                      help="only the pairs training holds out with data.eval_fraction=FRACTION")
    data.add_argument("--queries", help="BEIR-style queries JSONL (_id, text, optional source)")
    data.add_argument("--corpus", help="BEIR-style corpus JSONL (_id, text, optional title)")
    data.add_argument("--qrels", help="relevance judgements: TSV query-id, corpus-id, score (or JSONL)")
    data.add_argument("--query-field", default="question")
    data.add_argument("--positive-field", default="answer")
    data.add_argument("--source-field", default="source")
    data.add_argument("--prompt-field", default=None,
                      help="a field with each question's own instruction, used instead of the query prefix")
    data.add_argument("--max-queries", type=int, default=1_000_000)
    data.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                      help="a bad Q&A record stops the evaluation (error) or is skipped with a warning")
    enc = parser.add_argument_group("encoding")
    enc.add_argument("--batch-size", type=int, default=64)
    enc.add_argument("--query-max-length", type=int, default=64)
    enc.add_argument("--document-max-length", type=int, default=256)
    enc.add_argument("--query-prefix", default=None, help="default: the model's saved query prompt")
    enc.add_argument("--document-prefix", default=None, help="default: the model's saved document prompt")
    enc.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    enc.add_argument("--trust-remote-code", action="store_true", help="run the code that comes with the model")
    out = parser.add_argument_group("output")
    out.add_argument("--k", type=int, default=10, help="cutoff of nDCG and MRR")
    out.add_argument("--json", metavar="PATH", help="also write the metrics (and worst queries) as JSON")
    out.add_argument("--examples", type=int, default=5, help="worst queries to print")
    return parser


def load_set(args: argparse.Namespace) -> RetrievalSet:
    """The queries, corpus and judgements the arguments name."""
    if args.qa:
        cfg = DataConfig(train_files=args.qa, eval_files=[] if args.held_out else args.qa,
                         eval_fraction=args.held_out or 0.0, query_field=args.query_field,
                         positive_field=args.positive_field, source_field=args.source_field or None,
                         prompt_field=args.prompt_field,
                         max_eval_queries=args.max_queries, on_bad_record=args.on_bad_record)
        data_set = RetrievalSet.from_pairs(eval_pairs(cfg))
    else:
        data_set = RetrievalSet.from_files(args.queries, args.corpus, args.qrels, args.max_queries)
    if not len(data_set):
        raise DataError("no query to evaluate: the files hold no usable pair (or none is held out)")
    return data_set


def print_result(args: argparse.Namespace, data_set: RetrievalSet, result: EvalResult) -> None:
    print(f"{args.model}: {len(data_set)} queries, {len(data_set.corpus)} documents")
    print(metrics_table(result.metrics))
    rows = example_rows(result, data_set, args.examples, args.k)
    worst = [dict(zip(example_columns(args.k), row)) for row in rows if row[0] == "worst"]

    def line(text: str | None) -> str:
        return " ".join((text or "").split())[:110]

    for row in worst:
        print(f"\nworst: {line(row['query'])}\n  relevant, ranked {row['rank'] or '>100'}: {line(row['relevant'])}"
              f"\n  ranked first ({row['score 1']}): {line(row['top 1'])}")
    if args.json:
        write_report(args.json, {"model": args.model, "queries": len(data_set), "documents": len(data_set.corpus),
                                 "metrics": result.metrics, "worst": worst})


def main(argv: list[str] | None = None) -> int:
    scrub_console()  # main also runs without the embedtune command (python -m embedtune.commands.eval)
    parser = make_parser()
    args = parser.parse_args(argv)
    if bool(args.qa) == bool(args.queries or args.corpus or args.qrels):
        parser.error("give either --qa FILE..., or --queries, --corpus and --qrels")
    if args.queries and not (args.corpus and args.qrels):
        parser.error("--queries, --corpus and --qrels go together")
    log_to_console(logging.WARNING)

    accelerator = Accelerator(cpu=cpu_processes(), mixed_precision=args.mixed_precision)
    try:
        data_set = load_set(args)
        model, tokenizer = EmbeddingModel.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folder = model.folder
    collate = PairCollator(tokenizer, args.query_max_length, args.document_max_length,
                           folder.query_prompt if args.query_prefix is None else args.query_prefix,
                           folder.document_prompt if args.document_prefix is None else args.document_prefix)
    model.to(accelerator.device)

    encode = set_encoder(model, collate, data_set, args.batch_size, accelerator)
    result = run_retrieval(encode, data_set, args.k, compute=accelerator.is_main_process)
    if result is not None:
        print_result(args, data_set, result)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
