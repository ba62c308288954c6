"""A vector database: the run's answers in an embedded LanceDB table (no server), searched with questions.

    pip install 'embedtune[vectordb]'
    python -m embedtune.examples.vector_db OUTPUT_DIR ["a question" ...] [--db DIR] [--top-k 3]

The table holds each answer with its embedding (document prompt); a question is embedded with
the query prompt and the table returns its nearest rows by cosine distance. --db keeps the
database in DIR (a folder of Lance files); without it, it lives in a temporary folder.
"""

from __future__ import annotations

import sys
import tempfile

from embedtune.examples._run import load_model, make_parser, need, open_run, reports_errors, shorten


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = make_parser("vector_db", __doc__)
    parser.add_argument("questions", nargs="*", metavar="QUESTION", help="default: three held-out questions")
    parser.add_argument("--db", help="the database folder (default: a temporary one)")
    parser.add_argument("--top-k", type=int, default=3, help="answers shown per question")
    args = parser.parse_args(argv)
    lancedb = need("lancedb", "vectordb")

    run = open_run(args.output_dir)
    model = load_model(run)
    answers = run.answers()
    questions = args.questions or [pair.query for pair in run.held_out()[0][:3]]
    vectors = model.encode_document(answers, show_progress_bar=True)  # float32, one row per answer

    with tempfile.TemporaryDirectory(prefix="lancedb-") as scratch:
        db = lancedb.connect(args.db or scratch)
        db.drop_table("answers", ignore_missing=True)  # a fresh table on every run
        table = db.create_table("answers", data=[{"text": text, "vector": vector}
                                                 for text, vector in zip(answers, vectors)])
        print(f"LanceDB table 'answers' in {args.db or 'a temporary folder'}: {table.count_rows():,} rows\n")
        for question in questions:
            # A table this size is searched exhaustively; table.create_index() adds an approximate
            # index for millions of rows.
            hits = (table.search(model.encode_query(question)).distance_type("cosine")
                    .limit(args.top_k).to_list())
            print(f"Q: {question}")
            for rank, hit in enumerate(hits, 1):
                print(f"  {rank}. {1 - hit['_distance']:.4f}  {shorten(hit['text'])}")  # cosine similarity
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
