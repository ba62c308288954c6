"""Losses on pooled embeddings. Each is a small module: embeddings in, scalar loss out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedtune.distributed import gather_with_grad


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives: each query must rank its own positive above every other document.

    Every query is scored against all positives and all hard negatives of the global batch
    (gathered across processes), so the negatives do not shrink as processes are added.
    Similarities and softmax run in fp32 whatever the autocast dtype. With ``symmetric`` each
    positive must also pick its own query among the batch's queries.
    """

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric
        self.gather = gather

    def forward(self, queries: torch.Tensor, positives: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        queries, positives = queries.float(), positives.float()
        all_positives, offset = gather_with_grad(positives) if self.gather else (positives, 0)
        documents = all_positives
        if negatives is not None and negatives.shape[0]:
            all_negatives = gather_with_grad(negatives.float())[0] if self.gather else negatives.float()
            documents = torch.cat([all_positives, all_negatives])
        labels = torch.arange(offset, offset + queries.shape[0], device=queries.device)
        scores = self.scale * _cosine(queries, documents)
        loss = F.cross_entropy(scores, labels)
        if self.symmetric:
            all_queries = gather_with_grad(queries)[0] if self.gather else queries
            backward_scores = self.scale * _cosine(positives, all_queries)
            loss = (loss + F.cross_entropy(backward_scores, labels)) / 2
        return loss


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def build_loss(name: str, scale: float, symmetric: bool, gather: bool = True) -> nn.Module:
    if name == "MultipleNegativesSymmetricRankingLoss":
        symmetric = True
    if name in ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss"):
        return MultipleNegativesRankingLoss(scale=scale, symmetric=symmetric, gather=gather)
    raise ValueError(f"unknown loss {name!r}")
