"""Semantic search: embed the run's answers once, then find the best ones for a few questions.

    python -m embedtune.examples.semantic_search OUTPUT_DIR ["a question" ...] [--top-k 3]

Without questions, three that the run held out (that training never saw) are asked.
"""

from __future__ import annotations

import sys

from embedtune.examples._run import load_model, make_parser, open_run, reports_errors, shorten


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = make_parser("semantic_search", __doc__)
    parser.add_argument("questions", nargs="*", metavar="QUESTION", help="default: three held-out questions")
    parser.add_argument("--top-k", type=int, default=3, help="answers shown per question")
    args = parser.parse_args(argv)

    run = open_run(args.output_dir)
    model = load_model(run)
    answers = run.answers()
    questions = args.questions or [pair.query for pair in run.held_out()[0][:3]]

    # Each side gets its own prompt: the query and document prefixes the model was trained with.
    corpus = model.encode_document(answers, convert_to_tensor=True, show_progress_bar=True)
    queries = model.encode_query(questions, convert_to_tensor=True)
    scores = model.similarity(queries, corpus)  # cosine similarity, one row per question
    best = scores.topk(min(args.top_k, len(answers)), dim=1)  # best first

    print(f"{len(answers):,} answers searched\n")
    for question, values, rows in zip(questions, best.values.tolist(), best.indices.tolist()):
        print(f"Q: {question}")
        for rank, (score, row) in enumerate(zip(values, rows), 1):
            print(f"  {rank}. {score:.4f}  {shorten(answers[row])}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
