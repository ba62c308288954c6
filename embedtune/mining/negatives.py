"""Choosing hard negatives: the nearest documents to each question (FAISS or torch, chunk by
chunk with a running top-k), passed through the rules that keep false negatives out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from embedtune.mining import MineError

GROWTH = 8  # how much deeper a search goes when the margin left a question short


# --- choosing negatives from ranked candidates -----------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which candidates become negatives once a question's own answers are left out."""

    num_negatives: int = 5
    skip_top: int = 0
    margin: float | None = None  # keep scores below positive - margin
    relative_margin: float | None = None  # keep scores below positive * (1 - relative_margin)
    max_candidates: int = 1000  # how deep a search may go to find survivors of the margin

    def threshold(self, positive_score: float) -> float:
        if self.margin is not None:
            return positive_score - self.margin
        if self.relative_margin is not None:
            return positive_score * (1 - self.relative_margin)
        return math.inf


def pick(ids: Sequence[int], scores: Sequence[float], excluded: set[int] | frozenset[int], threshold: float,
         selection: Selection) -> list[int]:
    """One question's negatives from its candidates, best first.

    The skip counts ranks among the candidates that are not the question's own answers, before
    the margin: it passes over the closest documents whatever their score.
    """
    chosen: list[int] = []
    skipped = 0
    for row, score in zip(ids, scores):
        if row < 0 or row in excluded:
            continue
        if skipped < selection.skip_top:
            skipped += 1
            continue
        if score < threshold:
            chosen.append(row)
            if len(chosen) == selection.num_negatives:
                break
    return chosen


# --- search ----------------------------------------------------------------------------------


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(name: str, device: torch.device) -> str:
    """auto: FAISS when installed and the search runs on the CPU; torch otherwise (and on a GPU)."""
    if name == "faiss" and not faiss_available():
        raise MineError("--backend faiss: faiss is not installed (pip install faiss-cpu), or use --backend torch")
    if name == "auto":
        return "faiss" if device.type == "cpu" and faiss_available() else "torch"
    return name


def _order(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best first, equal scores by corpus row: the same order whichever search found them."""
    ids, by_id = ids.sort(dim=1, stable=True)
    scores = scores.gather(1, by_id)
    scores, by_score = scores.sort(dim=1, descending=True, stable=True)
    return scores, ids.gather(1, by_score)


def search(queries: torch.Tensor, corpus: torch.Tensor, k: int, corpus_chunk: int,
           backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` corpus rows with the highest inner product per query, best first: (scores, rows).

    The corpus is scored ``corpus_chunk`` rows at a time and merged into a running top-k, so at
    most (queries x corpus_chunk) scores exist at once. Queries are float32 on the corpus' device.
    Equal scores come out by corpus row; which of several equal scores make the cut at the k-th
    place is up to the search.
    """
    k = min(k, len(corpus))
    best_scores = torch.empty(len(queries), 0, device=queries.device)
    best_ids = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    if k == 0 or not len(queries):
        return best_scores, best_ids
    for start in range(0, len(corpus), corpus_chunk):
        block = corpus[start:start + corpus_chunk].to(torch.float32)  # a view when already float32
        take = min(k, len(block))
        if backend == "faiss":
            import faiss

            found, rows = faiss.knn(queries.contiguous().numpy(), block.contiguous().numpy(), take,
                                    metric=faiss.METRIC_INNER_PRODUCT)
            scores, ids = torch.from_numpy(found), torch.from_numpy(rows).long()
        else:
            scores, ids = (queries @ block.T).topk(take, dim=1)
        ids = ids + start
        if best_ids.shape[1]:
            scores, ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1)
            scores, keep = scores.topk(min(k, scores.shape[1]), dim=1)
            ids = ids.gather(1, keep)
        best_scores, best_ids = scores, ids
    return _order(best_scores, best_ids)


def choose_negatives(queries: torch.Tensor, corpus: torch.Tensor, positive_rows: Sequence[int],
                     excluded: Sequence[set[int] | frozenset[int]], selection: Selection, corpus_chunk: int,
                     backend: str = "torch") -> tuple[list[list[int]], list[float]]:
    """Each query's negatives (corpus rows, best first) and its positive's score.

    The first search fetches just enough candidates for the skip and the excluded rows. When a
    margin leaves a question short, its search goes deeper (up to ``max_candidates``), so the
    negatives are those of a full ranking rather than whatever a shallow pool had left.
    """
    rows = torch.as_tensor(list(positive_rows), dtype=torch.long, device=corpus.device)
    positive = (queries * corpus[rows].to(torch.float32)).sum(-1).tolist() if len(rows) else []
    thresholds = [selection.threshold(s) for s in positive]
    chosen: list[list[int]] = [[] for _ in range(len(queries))]
    todo = list(range(len(queries)))
    if not todo:
        return chosen, positive
    needed = selection.num_negatives + selection.skip_top + max(len(e) for e in excluded)
    depth, deepest = needed, max(needed, selection.max_candidates)
    while todo:
        depth = min(depth, deepest, len(corpus))
        index = torch.as_tensor(todo, device=queries.device)
        scores, ids = search(queries[index], corpus, depth, corpus_chunk, backend)
        short = []
        for q, q_scores, q_ids in zip(todo, scores.tolist(), ids.tolist()):
            chosen[q] = pick(q_ids, q_scores, excluded[q], thresholds[q], selection)
            if len(chosen[q]) < selection.num_negatives and depth < min(deepest, len(corpus)):
                short.append(q)
        todo, depth = short, depth * GROWTH
    return chosen, positive
