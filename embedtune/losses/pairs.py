"""Losses on labelled pairs and on triplets, matching sentence-transformers' definitions and defaults.

Each takes an ``Embedded`` batch and keeps the contract of ``embedtune.losses.base``: either the mean
over this process's pairs (ContrastiveLoss, CosineSimilarityLoss, TripletLoss), or a statistic of
the whole global batch that is the same on every process (OnlineContrastiveLoss, CoSENTLoss, which
gather embeddings and labels first). Everything is computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from embedtune.distributed import gather_plain, gather_with_grad, world
from embedtune.losses.base import DataShape, Embedded, no_pairs

Distance = Literal["cosine", "euclidean", "manhattan"]
DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Row-wise distances as sentence-transformers computes them. The two tables differ on purpose:
# ST's SiameseDistanceMetric (contrastive losses) uses F.pairwise_distance, which adds eps=1e-6
# to the difference, and F.cosine_similarity; its TripletDistanceMetric uses a plain vector norm
# and normalize-then-dot. The differences are tiny but matching them keeps values identical.
_SIAMESE: dict[str, DistanceFn] = {
    "cosine": lambda x, y: 1 - F.cosine_similarity(x, y),
    "euclidean": lambda x, y: F.pairwise_distance(x, y, p=2),
    "manhattan": lambda x, y: F.pairwise_distance(x, y, p=1),
}
_TRIPLET: dict[str, DistanceFn] = {
    "cosine": lambda x, y: 1 - (F.normalize(x, p=2, dim=-1) * F.normalize(y, p=2, dim=-1)).sum(dim=-1),
    "euclidean": lambda x, y: torch.linalg.vector_norm(x - y, dim=-1),
    "manhattan": lambda x, y: (x - y).abs().sum(dim=-1),
}


def _distance(table: dict[str, DistanceFn], name: str, loss: str) -> DistanceFn:
    if name not in table:
        raise ValueError(f"{loss}: unknown distance_metric {name!r}, expected one of {sorted(table)}")
    return table[name]


def _labelled(batch: Embedded, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (first, second, labels), or a clear error when the batch carries no labels."""
    if batch.labels is None:
        raise ValueError(f"{loss} needs a label per pair: set data.label_field")
    n = batch.queries.shape[0]
    if batch.labels.numel() != n:
        raise ValueError(f"{loss} needs one label per pair: got {batch.labels.numel()} labels for {n} pairs")
    return batch.queries.float(), batch.positives.float(), batch.labels.reshape(-1).float()


def _gathered(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor,
              gather: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch: embeddings keep their graph, labels need none. Identity in one process."""
    if not gather:
        return first, second, labels
    return gather_with_grad(first)[0], gather_with_grad(second)[0], gather_plain(labels)


class ContrastiveLoss(nn.Module):
    """Hadsell et al. (2006): pull similar pairs (label 1) together, push dissimilar ones (label 0)
    at least ``margin`` apart; ``0.5 * (y * d^2 + (1 - y) * relu(margin - d)^2)`` per pair.

    As in ST, labels other than 0/1 are used as weights as they are. With ``size_average=False``
    the loss is the sum over the global batch (local mean times the global pair count), so that
    under the training loop's share weighting it equals ST's sum on one process holding the batch.
    """

    needs: DataShape = "labelled"

    def __init__(self, distance_metric: Distance = "cosine", margin: float = 0.5, size_average: bool = True) -> None:
        super().__init__()
        self.distance = _distance(_SIAMESE, distance_metric, type(self).__name__)
        self.distance_metric = distance_metric
        self.margin = margin
        self.size_average = size_average

    def forward(self, batch: Embedded) -> torch.Tensor:
        # The global count is a collective: every process takes part, one without pairs too.
        scale = 1 if self.size_average else _global_count(batch.queries.shape[0], batch.queries.device)
        if not batch.queries.shape[0]:
            return no_pairs(batch)
        first, second, labels = _labelled(batch, type(self).__name__)
        distances = self.distance(first, second)
        losses = 0.5 * (labels * distances.pow(2) + (1 - labels) * F.relu(self.margin - distances).pow(2))
        # Without size_average a local sum would break the contract (the loop weights each
        # process by its share): the local mean times the global count is ST's sum instead.
        return losses.mean() * scale


def _global_count(n: int, device: torch.device) -> int:
    if world()[1] == 1:
        return n
    return int(gather_plain(torch.tensor([n], device=device)).sum().item())


class OnlineContrastiveLoss(nn.Module):
    """ContrastiveLoss on the hard pairs only, summed (not averaged) as in ST.

    Hard positives are positives farther apart than the closest negative; hard negatives are
    negatives closer than the farthest positive. The thresholds are batch statistics, so with
    ``gather`` the mining runs on the global batch and every process returns the same value.
    Pairs labelled neither 0 nor 1 are ignored.
    """

    needs: DataShape = "labelled"

    def __init__(self, distance_metric: Distance = "cosine", margin: float = 0.5, gather: bool = True) -> None:
        super().__init__()
        self.distance = _distance(_SIAMESE, distance_metric, type(self).__name__)
        self.distance_metric = distance_metric
        self.margin = margin
        self.gather = gather

    def forward(self, batch: Embedded) -> torch.Tensor:
        first, second, labels = _gathered(*_labelled(batch, type(self).__name__), self.gather)
        distances = self.distance(first, second)
        negatives = distances[labels == 0]
        positives = distances[labels == 1]
        # ST's fallbacks when one side is absent from the batch: the other side's mean.
        # The thresholds only select pairs; they carry no gradient through the comparison.
        hard_negatives = negatives[negatives < (positives.max() if len(positives) else negatives.mean())]
        hard_positives = positives[positives > (negatives.min() if len(negatives) else positives.mean())]
        return hard_positives.pow(2).sum() + F.relu(self.margin - hard_negatives).pow(2).sum()


class CosineSimilarityLoss(nn.Module):
    """Mean squared error between the pair's cosine similarity and its float score (ST's default
    ``loss_fct=MSELoss()``, identity score transformation)."""

    needs: DataShape = "labelled"

    def forward(self, batch: Embedded) -> torch.Tensor:
        if not batch.queries.shape[0]:
            return no_pairs(batch)
        first, second, scores = _labelled(batch, type(self).__name__)
        return F.mse_loss(torch.cosine_similarity(first, second), scores)


class CoSENTLoss(nn.Module):
    """CoSENT: ``log(1 + sum over pairs (i, j) with label_i < label_j of exp(scale * (cos_i - cos_j)))``.

    Every pair of pairs in the batch is compared, so with ``gather`` it runs on the global batch and
    every process returns the same value. Computed as ST does, in O(n log n): sort by label, then
    for each pair a log-sum-exp over the suffix of pairs with a strictly higher label.
    """

    needs: DataShape = "labelled"

    def __init__(self, scale: float = 20.0, gather: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.gather = gather

    def forward(self, batch: Embedded) -> torch.Tensor:
        first, second, labels = _gathered(*_labelled(batch, type(self).__name__), self.gather)
        # normalize-then-dot, as ST's default similarity_fct (util.pairwise_cos_sim).
        scores = self.scale * (F.normalize(first, dim=-1) * F.normalize(second, dim=-1)).sum(dim=-1)
        labels, order = labels.sort()
        scores = scores[order]
        higher_start = torch.searchsorted(labels, labels, right=True)
        # suffix[k] = log sum_{k' >= k} exp(-score_k'); the extra -inf covers "no higher label".
        suffix = torch.logcumsumexp(-scores.flip(0), dim=0).flip(0)
        suffix = torch.cat((suffix, scores.new_full((1,), -torch.inf)))
        terms = scores + suffix[higher_start]
        # The leading zero is the "1 +" inside the log.
        return torch.logsumexp(torch.cat((scores.new_zeros(1), terms)), dim=0)


class TripletLoss(nn.Module):
    """``relu(d(anchor, positive) - d(anchor, negative) + margin)``, mean over local anchors.

    The anchor is the query, the negative the first hard negative of its record. ST's defaults:
    Euclidean distance, margin 5 (ST names it ``triplet_margin``).
    """

    needs: DataShape = "triplets"

    def __init__(self, distance_metric: Distance = "euclidean", margin: float = 5.0) -> None:
        super().__init__()
        self.distance = _distance(_TRIPLET, distance_metric, type(self).__name__)
        self.distance_metric = distance_metric
        self.margin = margin

    def forward(self, batch: Embedded) -> torch.Tensor:
        if not batch.queries.shape[0]:
            return no_pairs(batch)
        anchors, positives = batch.queries.float(), batch.positives.float()
        negatives = _first_negatives(batch, type(self).__name__).float()
        losses = F.relu(self.distance(anchors, positives) - self.distance(anchors, negatives) + self.margin)
        return losses.mean()


def _first_negatives(batch: Embedded, loss: str) -> torch.Tensor:
    """(n, d): the first hard negative of each record, in query order."""
    n = batch.queries.shape[0]
    if batch.negatives is None or batch.negative_owner is None or batch.negatives.shape[0] == 0:
        raise ValueError(f"{loss} needs a hard negative per record: set data.negatives_field")
    m = batch.negatives.shape[0]
    owner = batch.negative_owner.to(device=batch.negatives.device, dtype=torch.long)
    # The lowest row per owner; m marks "none". Does not rely on the negatives being grouped.
    first = torch.full((n,), m, dtype=torch.long, device=owner.device)
    first = first.scatter_reduce(0, owner, torch.arange(m, device=owner.device), reduce="amin")
    missing = int((first == m).sum().item())
    if missing:
        raise ValueError(f"{loss} needs a hard negative per record: {missing} of {n} records in this batch "
                         "have none (set data.negatives_field and keep only records that have one)")
    return batch.negatives[first]
