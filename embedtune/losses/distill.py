"""Distillation: the student learns a teacher's scores of each query's positive and hard negatives.

The teacher (a cross-encoder or a stronger embedder) scored every training pair's positive and
negatives beforehand (``data.scores_field``, written by ``embedtune score``). The losses match
sentence-transformers' ``MarginMSELoss`` and ``DistillKLDivLoss``, with their default similarity,
the dot product, and their values wherever every pair has the same number of negatives (which is
all they take); a pair with another number weighs as much as any other pair (each pair's own mean).
Both are a mean over this process's pairs, so the training loop's share weighting makes them exact
over processes and under GradCache like the other losses. Computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedtune.losses.base import DataShape, Embedded, no_pairs


def _has_negatives(batch: Embedded) -> bool:
    """Pairs with negatives to learn from (a process may have none in a small last batch)."""
    return batch.queries.shape[0] > 0 and batch.negatives is not None and batch.negatives.shape[0] > 0


def _scored(batch: Embedded, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 student scores of (positives, negatives) and the teacher's, by the dot product."""
    if batch.positive_scores is None or batch.negative_scores is None:
        raise ValueError(f"{loss} needs the teacher's scores of each pair: set data.scores_field")
    owner = batch.negative_owner
    queries = batch.queries.float()
    positive = (queries * batch.positives.float()).sum(-1)
    negative = (queries[owner] * batch.negatives.float()).sum(-1)
    return positive, negative, batch.positive_scores.float(), batch.negative_scores.float()


def _per_pair_mean(values: torch.Tensor, owner: torch.Tensor, pairs: int) -> torch.Tensor:
    """The mean of each pair's values (its negatives'), then the mean over pairs."""
    counts = torch.bincount(owner, minlength=pairs).clamp(min=1).to(values.dtype)
    sums = torch.zeros(pairs, dtype=values.dtype, device=values.device).index_add(0, owner, values)
    return (sums / counts).sum() / max(pairs, 1)


class MarginMSELoss(nn.Module):
    """Hofstätter et al. (2020): the student's margin between a query's positive and each of its
    negatives regresses onto the teacher's, ``mean((s(q,p) - s(q,n) - (t_p - t_n))^2)``."""

    needs: DataShape = "scored"

    def forward(self, batch: Embedded) -> torch.Tensor:
        if not _has_negatives(batch):
            return no_pairs(batch)
        pairs, owner = batch.queries.shape[0], batch.negative_owner
        positive, negative, teacher_positive, teacher_negative = _scored(batch, type(self).__name__)
        errors = (positive[owner] - negative - (teacher_positive[owner] - teacher_negative)) ** 2
        return _per_pair_mean(errors, owner, pairs)


class DistillKLDivLoss(nn.Module):
    """KL divergence from the teacher's softmax over a query's positive and negatives to the
    student's, both at ``temperature``, times ``temperature**2`` (sentence-transformers' scaling)."""

    needs: DataShape = "scored"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, batch: Embedded) -> torch.Tensor:
        if not _has_negatives(batch):
            return no_pairs(batch)
        pairs, owner = batch.queries.shape[0], batch.negative_owner
        positive, negative, teacher_positive, teacher_negative = _scored(batch, type(self).__name__)
        # Each pair's candidates in a row (the positive first), padded with -inf: negatives come
        # pair after pair, so a negative's column is its place among its own pair's.
        counts = torch.bincount(owner, minlength=pairs)
        starts = torch.cumsum(counts, 0) - counts
        columns = 1 + torch.arange(owner.shape[0], device=owner.device) - starts[owner]
        width = 1 + int(counts.max())
        student = positive.new_full((pairs, width), float("-inf"))
        teacher = student.clone()
        student[:, 0], teacher[:, 0] = positive, teacher_positive
        student[owner, columns], teacher[owner, columns] = negative, teacher_negative
        present = torch.isfinite(teacher)
        log_student = torch.log_softmax(student / self.temperature, dim=1).masked_fill(~present, 0.0)
        teacher_probs = torch.softmax(teacher / self.temperature, dim=1)
        # batchmean: the KL summed over each pair's candidates, averaged over pairs.
        kl = F.kl_div(log_student, teacher_probs, reduction="sum") / pairs
        return kl * self.temperature**2


class RankingWithDistillation(nn.Module):
    """An in-batch ranking loss plus ``weight`` times a distillation loss (``loss.distill``). A pair
    without hard negatives (mining with a margin can leave one with none) trains the ranking term
    only; the distillation term is still a mean over all the pairs, so it stays exact over
    processes and mini-batches."""

    needs: DataShape = "distilled"

    def __init__(self, ranking: nn.Module, distill: nn.Module, weight: float) -> None:
        super().__init__()
        self.ranking, self.distill, self.weight = ranking, distill, weight
        self._reset()

    def _reset(self) -> None:
        # Each term's sum over this process's loss calls (kept on the device: no sync per step), and
        # how many calls had pairs (the ranking term) or pairs with negatives (the distillation term).
        self.sums: list[torch.Tensor | float] = [0.0, 0.0]
        self.calls = [0, 0]

    def forward(self, batch: Embedded) -> torch.Tensor:
        ranking, distill = self.ranking(batch), self.distill(batch)
        for i, counts in enumerate((batch.queries.shape[0] > 0, _has_negatives(batch))):
            if counts:
                self.sums[i] = self.sums[i] + (ranking, distill)[i].detach().float()
                self.calls[i] += 1
        return ranking + self.weight * distill

    def pop_stats(self) -> dict[str, float]:
        """The ranking loss's own figures, and each term's mean over this process's loss calls since
        the last call (the distillation term unweighted: the loss is ranking + weight x distill)."""
        stats = self.ranking.pop_stats()
        for name, total, calls in zip(("ranking_loss", "distill_loss"), self.sums, self.calls, strict=True):
            if calls:
                stats[name] = float(total) / calls
        self._reset()
        return stats
