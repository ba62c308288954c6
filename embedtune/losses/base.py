"""What every loss takes and keeps: ``Embedded`` in, a scalar loss out.

The contract every loss keeps: return the mean loss over this process's pairs, or a loss over
the gathered global batch that is the same on every process. The training loop weights it by
the process's share of the global batch, which makes the gradient that of one process holding
the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# What a loss needs from each record: a query and a positive ("pairs"), plus a float label or
# score ("labelled"), plus at least one hard negative ("triplets"), plus hard negatives and a
# teacher's score for the positive and each of them ("scored"), or a teacher's scores for the
# positive and whatever hard negatives the record has, perhaps none ("distilled": an in-batch
# ranking loss with a distillation term, which a record without negatives trains only the first).
DataShape = Literal["pairs", "labelled", "triplets", "scored", "distilled"]


def requires_negatives(needs: DataShape | None) -> bool:
    """Whether a record without a hard negative is a bad record for a loss that needs this."""
    return needs in ("triplets", "scored")


@dataclass
class Embedded:
    """One process's share of a batch, embedded."""

    queries: torch.Tensor  # (n, d): anchors / first texts
    positives: torch.Tensor  # (n, d): their positives / second texts
    negatives: torch.Tensor | None = None  # (m, d): hard negatives, record after record
    negative_owner: torch.Tensor | None = None  # (m,): the local row of the query each negative belongs to
    labels: torch.Tensor | None = None  # (n,): float label or score per pair
    query_keys: torch.Tensor | None = None  # (n,): int64 hash of the normalized query text
    positive_keys: torch.Tensor | None = None  # (n,)
    negative_keys: torch.Tensor | None = None  # (m,)
    positive_scores: torch.Tensor | None = None  # (n,): the teacher's score of each positive (distillation)
    negative_scores: torch.Tensor | None = None  # (m,): and of each hard negative

    def truncated(self, dim: int) -> Embedded:
        """The first ``dim`` dimensions of every embedding (Matryoshka)."""
        cut = {name: getattr(self, name)[:, :dim] if getattr(self, name) is not None else None
               for name in ("queries", "positives", "negatives")}
        return Embedded(**cut, negative_owner=self.negative_owner, labels=self.labels, query_keys=self.query_keys,
                        positive_keys=self.positive_keys, negative_keys=self.negative_keys,
                        positive_scores=self.positive_scores, negative_scores=self.negative_scores)


def mean_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy that is 0 (still on the graph) for a process with no pairs this step."""
    return F.cross_entropy(scores, labels, reduction="sum") / max(scores.shape[0], 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def no_pairs(batch: Embedded) -> torch.Tensor:
    """Zero, on the graph: a process with no pairs in a micro-batch of a small last batch."""
    return batch.queries.float().sum() * 0.0 + batch.positives.float().sum() * 0.0
