"""Our ranking loss gives sentence-transformers' values and gradients on the same embeddings."""

from __future__ import annotations

import pytest
import torch

from embedtune.config import LossConfig
from embedtune.losses import build_loss
from embedtune.losses.base import Embedded
from embedtune.losses.ranking import MultipleNegativesRankingLoss


def embeddings(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("negatives_per_query", [0, 2])
def test_matches_sentence_transformers_mnrl_value_and_gradient(negatives_per_query: int) -> None:
    from sentence_transformers.sentence_transformer import losses as st_losses

    q, p = embeddings(6, 16, seed=0), embeddings(6, 16, seed=1)
    negs = [embeddings(6, 16, seed=2 + i) for i in range(negatives_per_query)]
    reference = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    expected = reference.compute_loss_from_embeddings([q, p, *negs], labels=None)
    expected_grads = torch.autograd.grad(expected, [q, p, *negs])

    # Our layout: the negatives of the batch follow the positives, in any order.
    flat_negatives = torch.cat(negs) if negs else None
    ours = MultipleNegativesRankingLoss(scale=20.0)(Embedded(q, p, flat_negatives))
    grads = torch.autograd.grad(ours, [q, p, *negs])
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_symmetric_matches_sentence_transformers() -> None:
    from sentence_transformers.sentence_transformer import losses as st_losses

    q, p = embeddings(5, 8, seed=3), embeddings(5, 8, seed=4)
    expected = st_losses.MultipleNegativesSymmetricRankingLoss(model=None, scale=20.0).compute_loss_from_embeddings(
        [q, p], labels=None)
    ours = build_loss(LossConfig(name="MultipleNegativesSymmetricRankingLoss"))(Embedded(q, p))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_batch_of_perfect_matches_costs_almost_nothing() -> None:
    q = torch.nn.functional.normalize(torch.eye(4, 8), dim=-1)
    loss = MultipleNegativesRankingLoss(scale=50.0)(Embedded(q, q.clone()))
    assert loss.item() < 1e-6


def test_bf16_inputs_are_scored_in_fp32() -> None:
    q, p = embeddings(4, 8, seed=5), embeddings(4, 8, seed=6)
    full = MultipleNegativesRankingLoss()(Embedded(q, p))
    half = MultipleNegativesRankingLoss()(Embedded(q.bfloat16(), p.bfloat16()))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)
