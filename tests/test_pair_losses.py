"""Our pair and triplet losses give sentence-transformers' values and gradients on the same embeddings.

Every ST loss here has ``compute_loss_from_embeddings``, so the references run ST's own code on
our tensors without a model.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import embedtune.losses.pairs as pair_losses
from embedtune.config import DISTILL_LOSSES, LOSS_NAMES, LossConfig
from embedtune.losses import LOSSES, build_loss, required_data
from embedtune.losses.base import Embedded
from embedtune.losses.pairs import (
    ContrastiveLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    OnlineContrastiveLoss,
    TripletLoss,
)

PAIR_LOSSES = {cls.__name__: cls for cls in (ContrastiveLoss, OnlineContrastiveLoss, CosineSimilarityLoss, CoSENTLoss,
                                             TripletLoss)}

N, DIM = 12, 8


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair_embeddings(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Second = first plus noise of growing size, so the distances spread across any margin."""
    g = generator(seed)
    first = torch.randn(n, DIM, generator=g)
    noise = torch.linspace(0.05, 1.5, n).unsqueeze(1) * torch.randn(n, DIM, generator=g)
    second = first + noise[torch.randperm(n, generator=g)]
    return first.requires_grad_(), second.requires_grad_()


def binary_labels(seed: int = 0, n: int = N) -> torch.Tensor:
    labels = torch.randint(0, 2, (n,), generator=generator(seed + 100)).float()
    labels[:2] = torch.tensor([0.0, 1.0])  # both classes present
    return labels


def scores(seed: int = 0, n: int = N) -> torch.Tensor:
    # Quarter steps, so CoSENT sees tied labels.
    return torch.randint(0, 5, (n,), generator=generator(seed + 200)).float() / 4


def st_losses():
    from sentence_transformers.sentence_transformer import losses

    return losses


def siamese(name: str):
    from sentence_transformers.sentence_transformer.losses.contrastive import SiameseDistanceMetric

    return {"cosine": SiameseDistanceMetric.COSINE_DISTANCE, "euclidean": SiameseDistanceMetric.EUCLIDEAN,
            "manhattan": SiameseDistanceMetric.MANHATTAN}[name]


def triplet_metric(name: str):
    from sentence_transformers.sentence_transformer.losses.triplet import TripletDistanceMetric

    return {"cosine": TripletDistanceMetric.COSINE, "euclidean": TripletDistanceMetric.EUCLIDEAN,
            "manhattan": TripletDistanceMetric.MANHATTAN}[name]


def assert_same(ours: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """Equal value, and equal gradients w.r.t. every input embedding."""
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    want = torch.autograd.grad(expected, inputs, allow_unused=True)
    got = torch.autograd.grad(ours, inputs, allow_unused=True)
    for g, w in zip(got, want):
        assert w is not None and g is not None
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# name -> (ST loss built with the matching settings, our loss, labels for the batch)
LabelledCase = tuple[Callable[[], nn.Module], Callable[[], nn.Module], Callable[[int], torch.Tensor]]


def labelled_cases() -> dict[str, LabelledCase]:
    cases: dict[str, LabelledCase] = {}
    for metric in ("cosine", "euclidean", "manhattan"):
        cases[f"contrastive-{metric}"] = (
            lambda m=metric: st_losses().ContrastiveLoss(None, distance_metric=siamese(m)),
            lambda m=metric: ContrastiveLoss(distance_metric=m), binary_labels)
        cases[f"online-contrastive-{metric}"] = (
            lambda m=metric: st_losses().OnlineContrastiveLoss(None, distance_metric=siamese(m)),
            lambda m=metric: OnlineContrastiveLoss(distance_metric=m), binary_labels)
    cases["contrastive-sum-margin2"] = (
        lambda: st_losses().ContrastiveLoss(None, margin=2.0, size_average=False),
        lambda: ContrastiveLoss(margin=2.0, size_average=False), binary_labels)
    cases["online-contrastive-margin1"] = (
        lambda: st_losses().OnlineContrastiveLoss(None, margin=1.0),
        lambda: OnlineContrastiveLoss(margin=1.0), binary_labels)
    cases["cosine-similarity"] = (lambda: st_losses().CosineSimilarityLoss(None), CosineSimilarityLoss, scores)
    cases["cosent"] = (lambda: st_losses().CoSENTLoss(None), CoSENTLoss, scores)
    cases["cosent-scale5"] = (lambda: st_losses().CoSENTLoss(None, scale=5.0), lambda: CoSENTLoss(scale=5.0), scores)
    return cases


@pytest.mark.parametrize("case", list(labelled_cases()))
@pytest.mark.parametrize("seed", [0, 1])
def test_labelled_losses_match_sentence_transformers(case: str, seed: int) -> None:
    make_reference, make_ours, make_labels = labelled_cases()[case]
    first, second = pair_embeddings(seed=seed)
    labels = make_labels(seed)
    expected = make_reference().compute_loss_from_embeddings([first, second], labels)
    ours = make_ours()(Embedded(queries=first, positives=second, labels=labels))
    assert expected.item() > 0  # a zero loss would make the comparison vacuous
    assert_same(ours, expected, [first, second])


def test_defaults_are_sentence_transformers_defaults() -> None:
    from sentence_transformers.sentence_transformer.losses.contrastive import SiameseDistanceMetric
    from sentence_transformers.sentence_transformer.losses.triplet import TripletDistanceMetric

    losses = st_losses()
    st_contrastive, ours_contrastive = losses.ContrastiveLoss(None), ContrastiveLoss()
    assert st_contrastive.distance_metric == SiameseDistanceMetric.COSINE_DISTANCE
    assert ours_contrastive.distance_metric == "cosine"
    assert (ours_contrastive.margin, ours_contrastive.size_average) == (st_contrastive.margin,
                                                                        st_contrastive.size_average)
    st_online, ours_online = losses.OnlineContrastiveLoss(None), OnlineContrastiveLoss()
    assert st_online.distance_metric == SiameseDistanceMetric.COSINE_DISTANCE
    assert (ours_online.distance_metric, ours_online.margin) == ("cosine", st_online.margin)
    assert CoSENTLoss().scale == losses.CoSENTLoss(None).scale
    st_triplet, ours_triplet = losses.TripletLoss(None), TripletLoss()
    assert st_triplet.distance_metric == TripletDistanceMetric.EUCLIDEAN
    assert (ours_triplet.distance_metric, ours_triplet.margin) == ("euclidean", st_triplet.triplet_margin)


@pytest.mark.parametrize("labels", [torch.ones(N), torch.zeros(N)], ids=["only-positives", "only-negatives"])
def test_online_contrastive_matches_sentence_transformers_with_one_class(labels: torch.Tensor) -> None:
    # ST falls back to the present class's mean as the mining threshold.
    first, second = pair_embeddings(seed=3)
    expected = st_losses().OnlineContrastiveLoss(None, margin=2.0).compute_loss_from_embeddings([first, second],
                                                                                                 labels)
    ours = OnlineContrastiveLoss(margin=2.0)(Embedded(queries=first, positives=second, labels=labels))
    assert expected.item() > 0
    assert_same(ours, expected, [first, second])


def triplet_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Records carry 1 to 3 negatives, record after record; also returns each record's first negative's row."""
    g = generator(seed)
    counts = torch.randint(1, 4, (N,), generator=g)
    owner = torch.repeat_interleave(torch.arange(N), counts)
    first_row = torch.cumsum(counts, 0) - counts
    # Unit-scale vectors so that, with margin 5, some triplets are inside the margin and some not.
    q = torch.randn(N, DIM, generator=g)
    p = q + 1.5 * torch.randn(N, DIM, generator=g)
    negs = q[owner] + 1.5 * torch.randn(len(owner), DIM, generator=g)
    return q.requires_grad_(), p.requires_grad_(), negs.requires_grad_(), owner, first_row


@pytest.mark.parametrize("metric,margin", [("euclidean", 5.0), ("euclidean", 1.0), ("cosine", 0.5),
                                           ("manhattan", 5.0)])
def test_triplet_matches_sentence_transformers_with_each_records_first_negative(metric: str, margin: float) -> None:
    q, p, negs, owner, first_row = triplet_batch(seed=4)
    reference = st_losses().TripletLoss(None, distance_metric=triplet_metric(metric), triplet_margin=margin)
    expected = reference.compute_loss_from_embeddings([q, p, negs[first_row]], labels=None)
    ours = TripletLoss(distance_metric=metric, margin=margin)(
        Embedded(queries=q, positives=p, negatives=negs, negative_owner=owner))
    assert 0 < expected.item()
    assert_same(ours, expected, [q, p, negs])


def test_triplet_finds_first_negatives_in_any_order() -> None:
    q, p, negs, owner, first_row = triplet_batch(seed=5)
    expected = TripletLoss()(Embedded(queries=q, positives=p, negatives=negs, negative_owner=owner))
    # Reverse each record's block order but keep each record's own negatives in order.
    blocks = [torch.nonzero(owner == i).flatten() for i in range(N)]
    perm = torch.cat(blocks[::-1])
    shuffled = TripletLoss()(Embedded(queries=q, positives=p, negatives=negs[perm], negative_owner=owner[perm]))
    assert shuffled.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "OnlineContrastiveLoss", "CosineSimilarityLoss", "CoSENTLoss"])
def test_labelled_losses_say_what_is_missing(name: str) -> None:
    first, second = pair_embeddings()
    with pytest.raises(ValueError, match=f"{name} needs a label per pair: set data.label_field"):
        PAIR_LOSSES[name]()(Embedded(queries=first, positives=second))
    with pytest.raises(ValueError, match="one label per pair"):
        PAIR_LOSSES[name]()(Embedded(queries=first, positives=second, labels=torch.ones(N - 1)))


def test_triplet_says_negatives_are_missing() -> None:
    q, p, negs, owner, _ = triplet_batch(seed=6)
    with pytest.raises(ValueError, match="TripletLoss needs a hard negative per record: set data.negatives_field"):
        TripletLoss()(Embedded(queries=q, positives=p))
    with pytest.raises(ValueError, match="TripletLoss needs a hard negative per record"):
        TripletLoss()(Embedded(queries=q, positives=p, negatives=negs[:0], negative_owner=owner[:0]))
    keep = owner != 3  # record 3 loses its negatives
    with pytest.raises(ValueError, match="1 of 12 records"):
        TripletLoss()(Embedded(queries=q, positives=p, negatives=negs[keep], negative_owner=owner[keep]))


def test_unknown_distance_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown distance_metric 'cosine_distance'"):
        ContrastiveLoss(distance_metric="cosine_distance")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown distance_metric 'dot'"):
        TripletLoss(distance_metric="dot")  # type: ignore[arg-type]


def every_loss_batch(name: str) -> Embedded:
    if name == "TripletLoss":
        q, p, negs, owner, _ = triplet_batch(seed=7)
        return Embedded(queries=q, positives=p, negatives=negs, negative_owner=owner)
    first, second = pair_embeddings(seed=7)
    labels = scores(seed=7) if name in ("CosineSimilarityLoss", "CoSENTLoss") else binary_labels(seed=7)
    return Embedded(queries=first, positives=second, labels=labels)


def to_bf16(batch: Embedded) -> Embedded:
    return Embedded(queries=batch.queries.bfloat16(), positives=batch.positives.bfloat16(),
                    negatives=None if batch.negatives is None else batch.negatives.bfloat16(),
                    negative_owner=batch.negative_owner, labels=batch.labels)


def upcast(batch: Embedded) -> Embedded:
    return Embedded(queries=batch.queries.float(), positives=batch.positives.float(),
                    negatives=None if batch.negatives is None else batch.negatives.float(),
                    negative_owner=batch.negative_owner, labels=batch.labels)


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_bf16_inputs_are_scored_in_fp32(name: str) -> None:
    batch = every_loss_batch(name)
    full = PAIR_LOSSES[name]()(batch)
    half_batch = to_bf16(batch)
    half = PAIR_LOSSES[name]()(half_batch)
    assert half.dtype == torch.float32
    # Exactly the fp32 computation on the rounded inputs: nothing ran in bf16 past the inputs.
    assert half.item() == pytest.approx(PAIR_LOSSES[name]()(upcast(half_batch)).item(), rel=1e-6)
    assert half.item() == pytest.approx(full.item(), rel=2e-2)
    half.backward()
    assert batch.queries.grad is not None and torch.isfinite(batch.queries.grad).all()


class FakeWorld:
    """Stands in for ``world``/``gather_*`` as seen by one rank of a process group over ``shards``.

    A gathered tensor is recognised by value among this rank's shard tensors; the other ranks'
    shards are views of the same global leaves, so gradients reach the global tensors as the
    all-gather backward would.
    """

    def __init__(self, shards: list[dict[str, torch.Tensor]], rank: int) -> None:
        self.shards, self.rank = shards, rank
        self.offset = sum(s["queries"].shape[0] for s in shards[:rank])

    def world(self) -> tuple[int, int]:
        return self.rank, len(self.shards)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        for name, local in self.shards[self.rank].items():
            if local.dtype == tensor.dtype and local.shape == tensor.shape and torch.equal(local, tensor):
                return torch.cat([tensor if i == self.rank else s[name] for i, s in enumerate(self.shards)])
        raise AssertionError("gathered a tensor this rank does not hold")

    def gather_with_grad(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._gather(tensor), self.offset

    def gather_plain(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._gather(tensor).detach()


def run_ranks(monkeypatch: pytest.MonkeyPatch, loss: nn.Module, q: torch.Tensor, p: torch.Tensor,
              labels: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    shards = [{"queries": q[a:b], "positives": p[a:b], "labels": labels[a:b], "count": torch.tensor([b - a])}
              for a, b in zip(bounds, bounds[1:])]
    values = []
    for rank, shard in enumerate(shards):
        fake = FakeWorld(shards, rank)
        for name in ("world", "gather_with_grad", "gather_plain"):
            monkeypatch.setattr(pair_losses, name, getattr(fake, name))
        values.append(loss(Embedded(queries=shard["queries"], positives=shard["positives"], labels=shard["labels"])))
    return values


@pytest.mark.parametrize("case", ["online-contrastive-cosine", "cosent", "contrastive-sum-margin2",
                                  "contrastive-cosine", "cosine-similarity"])
def test_share_weighted_ranks_give_the_one_process_loss(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """The training loop's sum of share-weighted per-rank losses has ST's global value and gradient."""
    make_reference, make_ours, make_labels = labelled_cases()[case]
    q, p = pair_embeddings(seed=8)
    labels = make_labels(8)
    expected = make_reference().compute_loss_from_embeddings([q, p], labels)
    sizes = [7, 5]  # uneven, like the last batch of an epoch
    values = run_ranks(monkeypatch, make_ours(), q, p, labels, sizes)
    if case in ("online-contrastive-cosine", "cosent"):
        # Global statistics: every rank returns the global value.
        for value in values:
            assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    total = sum(value * n / N for value, n in zip(values, sizes))
    assert_same(total, expected, [q, p])


@pytest.mark.parametrize("loss_class", [OnlineContrastiveLoss, CoSENTLoss])
def test_without_gather_each_rank_sees_only_its_shard(monkeypatch: pytest.MonkeyPatch,
                                                      loss_class: type[nn.Module]) -> None:
    q, p = pair_embeddings(seed=9)
    labels = binary_labels(seed=9)
    sizes = [6, 6]
    values = run_ranks(monkeypatch, loss_class(gather=False), q, p, labels, sizes)
    reference = getattr(st_losses(), loss_class.__name__)(None)
    for value, (a, b) in zip(values, [(0, 6), (6, 12)]):
        local = reference.compute_loss_from_embeddings([q[a:b], p[a:b]], labels[a:b])
        assert value.item() == pytest.approx(local.item(), rel=1e-5)
    glob = reference.compute_loss_from_embeddings([q, p], labels)
    assert values[0].item() != pytest.approx(glob.item(), rel=1e-3)


def test_every_loss_a_config_can_name_is_built_under_its_own_name_and_declares_its_data() -> None:
    assert list(LOSSES) == list(LOSS_NAMES)
    for name in LOSS_NAMES:
        loss = build_loss(LossConfig(name=name))
        if name in PAIR_LOSSES:
            assert type(loss) is PAIR_LOSSES[name]
        assert required_data(loss) == ("triplets" if name == "TripletLoss" else "labelled" if name in PAIR_LOSSES
                                       else "scored" if name in DISTILL_LOSSES else "pairs")
