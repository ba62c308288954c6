"""Q&A retrieval: does each question find its own answer among all of the run's answers?

    python -m embedtune.examples.qa_retrieval OUTPUT_DIR [--pairs FILE] [--show 3]

The questions are the ones the run held out (training never saw them), or the records of
--pairs FILE (JSONL, Parquet or CSV with the run's question and answer fields), whose answers
join the corpus. It counts the questions whose best-scored answer is their own.
"""

from __future__ import annotations

import sys

from embedtune.commands.search import distinct
from embedtune.data.records import DataError, Reject, read_pairs, resolve_files, text_key
from embedtune.examples._run import load_model, make_parser, open_run, reports_errors, shorten


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = make_parser("qa_retrieval", __doc__)
    parser.add_argument("--pairs", metavar="FILE", help="question/answer records (default: the held-out ones)")
    parser.add_argument("--show", type=int, default=3, help="misses shown")
    args = parser.parse_args(argv)

    run = open_run(args.output_dir)
    model = load_model(run)
    if args.pairs:
        pairs, what = [], "questions of " + args.pairs
        for pair in read_pairs(resolve_files([args.pairs]), run.data):
            if isinstance(pair, Reject):
                raise DataError(pair.message())
            pairs.append(pair)
    else:
        pairs, what = run.held_out()
    answers = distinct(run.answers() + [pair.positive for pair in pairs])
    # The same text up to case and spacing is the same answer (as embedtune counts documents).
    row_of = {text_key(answer): row for row, answer in enumerate(answers)}
    right = [row_of[text_key(pair.positive)] for pair in pairs]

    corpus = model.encode_document(answers, convert_to_tensor=True, show_progress_bar=True)
    queries = model.encode_query([pair.query for pair in pairs], convert_to_tensor=True)
    scores = model.similarity(queries, corpus)  # (questions x answers) cosine similarities
    first = scores.argmax(dim=1).tolist()
    hits = sum(f == r for f, r in zip(first, right))

    print(f"{len(pairs):,} {what}, each against all {len(answers):,} answers")
    print(f"right answer at rank 1: {hits} of {len(pairs)} ({hits / max(len(pairs), 1):.1%})")
    misses = [i for i, (f, r) in enumerate(zip(first, right)) if f != r][:args.show]
    for i in misses:
        own = scores[i, right[i]]
        rank = int((scores[i] > own).sum()) + 1
        print(f"\nQ: {shorten(pairs[i].query)}\n  ranked first ({scores[i, first[i]]:.4f}): "
              f"{shorten(answers[first[i]])}\n  its answer   ({own:.4f}, rank {rank}): {shorten(answers[right[i]])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
