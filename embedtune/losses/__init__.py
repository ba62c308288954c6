"""The losses, under sentence-transformers' names: a registry, and what each needs from the data.

One module per family: ``ranking`` (in-batch negatives), ``pairs`` (labelled pairs and
triplets), ``distill`` (a teacher's scores), ``matryoshka`` (a wrapper for truncated embeddings);
``base`` holds what they share.
The names a config may give are ``embedtune.config.LOSS_NAMES``; each has a builder here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from embedtune.config import ConfigError, DataConfig, LossConfig
from embedtune.losses.base import DataShape, requires_negatives
from embedtune.losses.distill import DistillKLDivLoss, MarginMSELoss, RankingWithDistillation
from embedtune.losses.matryoshka import MatryoshkaLoss
from embedtune.losses.pairs import ContrastiveLoss, CoSENTLoss, CosineSimilarityLoss, OnlineContrastiveLoss, TripletLoss
from embedtune.losses.ranking import MultipleNegativesRankingLoss


def _ranking(cfg: LossConfig) -> nn.Module:
    return MultipleNegativesRankingLoss(
        scale=cfg.scale, symmetric=cfg.ranks_both_ways(),
        gather=cfg.gather_across_processes, mask_false_negatives=cfg.mask_false_negatives)


def _margin(cfg: LossConfig) -> dict[str, float]:
    return {"margin": cfg.margin} if cfg.margin is not None else {}


def _no_margin(cfg: LossConfig) -> None:
    if cfg.margin is not None:
        raise ConfigError(f"loss.margin does not apply to {cfg.name}: remove it, or choose ContrastiveLoss, "
                          "OnlineContrastiveLoss or TripletLoss")


def _cosine_similarity(cfg: LossConfig) -> nn.Module:
    _no_margin(cfg)
    return CosineSimilarityLoss()


def _cosent(cfg: LossConfig) -> nn.Module:
    _no_margin(cfg)
    return CoSENTLoss(scale=cfg.scale, gather=cfg.gather_across_processes)


LOSSES: dict[str, Callable[[LossConfig], nn.Module]] = {
    "MultipleNegativesRankingLoss": _ranking,
    "MultipleNegativesSymmetricRankingLoss": _ranking,
    "CachedMultipleNegativesRankingLoss": _ranking,  # GradCache is the training step's (loss.mini_batch_size)
    "ContrastiveLoss": lambda cfg: ContrastiveLoss(**_margin(cfg)),
    "OnlineContrastiveLoss": lambda cfg: OnlineContrastiveLoss(**_margin(cfg), gather=cfg.gather_across_processes),
    "CosineSimilarityLoss": _cosine_similarity,
    "CoSENTLoss": _cosent,
    "TripletLoss": lambda cfg: TripletLoss(**_margin(cfg)),
    "MarginMSELoss": lambda cfg: MarginMSELoss(),
    "DistillKLDivLoss": lambda cfg: DistillKLDivLoss(cfg.temperature),
}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module a config names, wrapped in Matryoshka when dimensions are given."""
    loss = LOSSES[cfg.name](cfg)
    if cfg.distill:  # the ranking loss plus a distillation term
        loss = RankingWithDistillation(loss, LOSSES[cfg.distill](cfg), cfg.distill_weight)
    if cfg.matryoshka_dims:
        loss = MatryoshkaLoss(loss, cfg.matryoshka_dims, cfg.matryoshka_weights)
    return loss


def required_data(loss: nn.Module) -> DataShape:
    """What the loss needs from each record (``DataShape``)."""
    return getattr(loss, "needs", "pairs")


def check_loss_data(needs: DataShape, data: DataConfig, name: str) -> None:
    """Refuse, before any work, a loss whose data the config does not provide."""
    if needs == "labelled" and not data.label_field:
        raise ConfigError(f"{name} trains on pairs with a label or score: set data.label_field to the field that "
                          "holds it (1/0 for similar/dissimilar with ContrastiveLoss and OnlineContrastiveLoss, "
                          "a similarity score for CosineSimilarityLoss and CoSENTLoss)")
    if needs in ("scored", "distilled") and not data.scores_field:
        raise ConfigError(f"{name} learns a teacher's scores: set data.scores_field to the field that holds them (a "
                          "list: the positive's score, then one per hard negative; `embedtune score` writes it)")
    if needs == "distilled" and (not data.negatives_field or data.max_negatives < 1):
        raise ConfigError(f"loss.distill={name} learns the teacher's scores of each record's hard negatives: set "
                          "data.negatives_field to the field that lists them (and keep data.max_negatives at 1 or "
                          "more)")
    if requires_negatives(needs) and (not data.negatives_field or data.max_negatives < 1):
        raise ConfigError(f"{name} trains on (anchor, positive, negative) triplets: set data.negatives_field to "
                          "the field with each record's negative (and keep data.max_negatives at 1 or more)")
