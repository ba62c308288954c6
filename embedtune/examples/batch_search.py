"""Batch search: many queries from a file, searched a batch at a time, the hits written as JSONL.

    python -m embedtune.examples.batch_search OUTPUT_DIR [--queries FILE] [--output hits.jsonl]
        [--batch-size 256] [--top-k 5]

FILE holds one query per line (a .txt file) or records with the run's question field (JSONL,
Parquet, CSV; --field names another); by default the run's held-out questions are searched.
Queries are read, embedded and scored a batch at a time, so a file of any length takes the
memory of one batch. Each line written: {"query": ..., "hits": [{"text": ..., "score": ...}]},
the hits best first.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

from embedtune.commands.search import read_field
from embedtune.examples._run import load_model, make_parser, open_run, reports_errors, shorten


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = make_parser("batch_search", __doc__)
    parser.add_argument("--queries", metavar="FILE", help="default: the run's held-out questions")
    parser.add_argument("--field", help="the query records' field (default: the run's question field)")
    parser.add_argument("--output", default="hits.jsonl", help="where the hits go (default hits.jsonl)")
    parser.add_argument("--batch-size", type=int, default=256, help="queries searched at once")
    parser.add_argument("--top-k", type=int, default=5, help="answers kept per query")
    args = parser.parse_args(argv)

    run = open_run(args.output_dir)
    model = load_model(run)
    answers = run.answers()
    corpus = model.encode_document(answers, convert_to_tensor=True, show_progress_bar=True)
    if args.queries:
        queries = read_field([args.queries], args.field or run.data.query_field, "--field")
    else:
        queries = (pair.query for pair in run.held_out()[0])

    started, count, batches = time.perf_counter(), 0, 0
    with open(args.output, "w", encoding="utf-8") as out:
        while batch := list(itertools.islice(queries, args.batch_size)):
            embedded = model.encode_query(batch, convert_to_tensor=True)
            best = model.similarity(embedded, corpus).topk(min(args.top_k, len(answers)), dim=1)
            for query, scores, rows in zip(batch, best.values.tolist(), best.indices.tolist()):
                hits = [{"text": answers[row], "score": round(score, 6)} for score, row in zip(scores, rows)]
                out.write(json.dumps({"query": query, "hits": hits}, ensure_ascii=False) + "\n")
            count, batches = count + len(batch), batches + 1
    seconds = time.perf_counter() - started

    print(f"{count:,} queries searched against {len(answers):,} answers in {batches} batch(es) of up to "
          f"{args.batch_size}, {seconds:.2f} s ({count / max(seconds, 1e-9):,.0f} queries/s)")
    print(f"wrote {args.output}")
    with open(args.output, encoding="utf-8") as f:
        for line in itertools.islice(f, 2):
            first = json.loads(line)
            print(f"  {shorten(first['query'], 60)} -> {first['hits'][0]['score']:.4f} "
                  f"{shorten(first['hits'][0]['text'], 60)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
