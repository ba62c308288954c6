"""Matryoshka: any loss on embeddings cut to several sizes, so truncated embeddings still work."""

from __future__ import annotations

import torch
from torch import nn

from embedtune.losses.base import Embedded


class MatryoshkaLoss(nn.Module):
    """The weighted sum of a loss on the first d dimensions of the embeddings, for each d.

    The model learns embeddings that still work when cut short (smaller indexes, faster search).
    """

    def __init__(self, loss: nn.Module, dims: list[int], weights: list[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.dims = dims
        self.weights = weights or [1.0] * len(dims)
        self.needs = loss.needs

    def forward(self, batch: Embedded) -> torch.Tensor:
        if max(self.dims) > batch.queries.shape[1]:
            raise ValueError(f"loss.matryoshka_dims {self.dims} exceed the embedding size {batch.queries.shape[1]}")
        return sum(w * self.loss(batch.truncated(d)) for d, w in zip(self.dims, self.weights))

    def pop_stats(self) -> dict[str, float]:
        return self.loss.pop_stats() if hasattr(self.loss, "pop_stats") else {}
