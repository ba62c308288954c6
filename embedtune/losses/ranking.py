"""In-batch negatives: the ranking losses (MNRL, its symmetric and cached variants)."""

from __future__ import annotations

import torch
from torch import nn

from embedtune.distributed import gather_plain, gather_with_grad
from embedtune.losses.base import DataShape, Embedded, cosine, mean_cross_entropy


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives: each query must rank its own positive above every other document.

    Every query is scored against all positives and all hard negatives of the global batch
    (gathered across processes), so the negatives do not shrink as processes are added.
    Similarities and softmax run in fp32 whatever the autocast dtype. With ``symmetric`` each
    positive must also pick its own query among the batch's queries.

    With ``mask_false_negatives``, a document whose text equals the query's own positive, or
    the positive of a duplicate of the query, is not counted as a negative (it is one only by
    accident of batching). The share of masked candidates is kept in ``stats``.
    """

    needs: DataShape = "pairs"

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather: bool = True,
                 mask_false_negatives: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric
        self.gather = gather
        self.mask_false_negatives = mask_false_negatives
        self.stats = {"masked": 0.0, "candidates": 0.0}

    def _all(self, tensor: torch.Tensor | None, grad: bool = True) -> tuple[torch.Tensor | None, int]:
        if tensor is None or not self.gather:
            return tensor, 0
        return gather_with_grad(tensor) if grad else (gather_plain(tensor), 0)

    def forward(self, batch: Embedded) -> torch.Tensor:
        queries, positives = batch.queries.float(), batch.positives.float()
        # Gathered even when this process has none (0 rows): another process may have some, and
        # every process must take part in every gather.
        negatives = batch.negatives.float() if batch.negatives is not None else None
        all_positives, offset = self._all(positives)
        all_negatives, _ = self._all(negatives)
        documents = all_positives if all_negatives is None else torch.cat([all_positives, all_negatives])
        labels = torch.arange(offset, offset + queries.shape[0], device=queries.device)
        scores = self.scale * cosine(queries, documents)
        if self.mask_false_negatives and batch.query_keys is not None:
            doc_keys = self._all(batch.positive_keys, grad=False)[0]
            if all_negatives is not None:
                negative_keys = batch.negative_keys
                if negative_keys is None:  # unknown texts: keys that match nothing
                    negative_keys = -1 - torch.arange(negatives.shape[0], device=negatives.device)
                doc_keys = torch.cat([doc_keys, self._all(negative_keys, grad=False)[0]])
            all_query_keys = self._all(batch.query_keys, grad=False)[0]
            # Same text as the own positive, or the positive of a duplicate of this query.
            false = doc_keys[None, :] == batch.positive_keys[:, None]
            duplicate_queries = all_query_keys[None, :] == batch.query_keys[:, None]
            false[:, : all_positives.shape[0]] |= duplicate_queries
            scores = self._mask(scores, false, labels)
        loss = mean_cross_entropy(scores, labels)
        if self.symmetric:
            all_queries, _ = self._all(queries)
            backward_scores = self.scale * cosine(positives, all_queries)
            if self.mask_false_negatives and batch.query_keys is not None:
                all_query_keys = self._all(batch.query_keys, grad=False)[0]
                all_positive_keys = self._all(batch.positive_keys, grad=False)[0]
                false = ((all_query_keys[None, :] == batch.query_keys[:, None])
                         | (all_positive_keys[None, :] == batch.positive_keys[:, None]))
                backward_scores = self._mask(backward_scores, false, labels)
            loss = (loss + mean_cross_entropy(backward_scores, labels)) / 2
        return loss

    def _mask(self, scores: torch.Tensor, false: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(scores.shape[0], device=scores.device)
        false[rows, labels] = False  # never the true pair itself
        self.stats["masked"] += false.sum().detach()
        self.stats["candidates"] += scores.shape[0] * (scores.shape[1] - 1)
        return scores.masked_fill(false, float("-inf"))

    def pop_stats(self) -> dict[str, float]:
        """The share of in-batch candidates masked as false negatives since the last call."""
        masked, total = self.stats["masked"], self.stats["candidates"]
        self.stats = {"masked": 0.0, "candidates": 0.0}
        return {"masked_false_negatives": float(masked) / total} if total else {}
