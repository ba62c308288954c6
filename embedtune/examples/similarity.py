"""Similarity: the cosine similarity of every question with every answer, as a matrix.

    python -m embedtune.examples.similarity OUTPUT_DIR [--query TEXT ...] [--document TEXT ...]

By default, three held-out questions and their own answers: each question should score its own
answer (the diagonal) above the others. The best of each row is marked with *.
"""

from __future__ import annotations

import sys

from embedtune.examples._run import load_model, make_parser, open_run, reports_errors, shorten


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = make_parser("similarity", __doc__)
    parser.add_argument("--query", action="append", help="a question (repeatable); default: three held-out ones")
    parser.add_argument("--document", action="append", help="an answer (repeatable); default: their answers")
    args = parser.parse_args(argv)

    run = open_run(args.output_dir)
    model = load_model(run)
    if not (args.query and args.document):
        pairs = run.held_out()[0][:3]
    queries = args.query or [pair.query for pair in pairs]
    documents = args.document or [pair.positive for pair in pairs]

    # Questions and answers each with their own prompt, as the model was trained.
    matrix = model.similarity(model.encode_query(queries), model.encode_document(documents))

    print("      " + " ".join(f"{f'D{j}':>8}" for j in range(1, len(documents) + 1)))
    for i, row in enumerate(matrix.tolist(), 1):
        best = max(range(len(row)), key=row.__getitem__)
        print((f"Q{i:<5}" + "".join(f"{value:>8.4f}{'*' if j == best else ' '}" for j, value in enumerate(row))).rstrip())
    print()
    for i, text in enumerate(queries, 1):
        print(f"Q{i}: {shorten(text)}")
    for j, text in enumerate(documents, 1):
        print(f"D{j}: {shorten(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
