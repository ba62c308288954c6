"""GradCache gives the gradients of the uncached loss; false negatives are masked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_pairs

from embedtune.config import LossConfig
from embedtune.data.collate import PairCollator
from embedtune.data.records import Pair
from embedtune.losses import build_loss
from embedtune.losses.base import Embedded
from embedtune.losses.matryoshka import MatryoshkaLoss
from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.training.step import GradCacheStep, plain_step


def tiny(tokenizer_dir: Path, tmp_path: Path, dropout: float) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(5)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def batch_of(tokenizer, n: int = 12) -> dict:
    pairs = [Pair(str(i), r["question"], r["answer"], (f"unrelated text {i}",) if i % 3 == 0 else ())
             for i, r in enumerate(make_pairs(n, seed=11))]
    return PairCollator(tokenizer, 24, 40)(pairs)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.mark.parametrize("mini", [1, 5, 12])
def test_cached_loss_gives_the_uncached_gradients(tokenizer_dir: Path, tmp_path: Path, accelerator, mini: int) -> None:
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    batch, loss_fn = batch_of(tokenizer), MultipleNegativesRankingLoss(symmetric=True)
    plain_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
    plain = grads_of(model)
    cached_loss = GradCacheStep(mini)(model, batch, loss_fn, 1.0, accelerator)
    cached = grads_of(model)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert cached.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["padded", "packed", "padded in chunks"])
def test_dropout_is_replayed_so_the_gradient_is_that_of_the_loss_computed(tokenizer_dir: Path, tmp_path: Path,
                                                                           accelerator, layout: str) -> None:
    """With dropout, the cached step must give the gradient of the very loss it computed: the
    same mini-batches, embedded once with a graph, under the same random masks (padded, packed,
    or padded in length-sorted chunks)."""
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.3)))
    assert model.enable_packing(tokenizer) if layout == "packed" else not model.packed
    model.layout_by_cost = False  # the layout named, whatever the lengths
    model.train()
    batch, loss_fn, step = batch_of(tokenizer), MultipleNegativesRankingLoss(), GradCacheStep(4)
    if layout == "padded in chunks":
        model.padded_chunks = 2
        batch, step = batch_of(tokenizer, n=40), GradCacheStep(32)
        assert len(model.prepare(step.mini_batches(batch.document)[0], torch.device("cpu")).chunks) == 2
    torch.manual_seed(7)
    cached_loss = step(model, batch, loss_fn, 1.0, accelerator)
    cached = grads_of(model)

    torch.manual_seed(7)
    from embedtune.training.step import embedded

    sides = [torch.cat([model(model.prepare(c, torch.device("cpu"))) for c in step.mini_batches(side)])
             for side in (batch.query, batch.document)]
    reference_loss = loss_fn(embedded(batch, *sides))
    reference_loss.backward()
    reference = grads_of(model)
    assert cached_loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The masks really were random: another seed gives other gradients.
    torch.manual_seed(8)
    step(model, batch, loss_fn, 1.0, accelerator)
    other = grads_of(model)
    assert any(not torch.allclose(other[n], g) for n, g in reference.items())


def test_cached_loss_in_bf16_stays_close(tokenizer_dir: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    batch, loss_fn = batch_of(tokenizer), MultipleNegativesRankingLoss()
    with accelerator.autocast():
        plain_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
        plain = grads_of(model)
        cached_loss = GradCacheStep(3)(model, batch, loss_fn, 1.0, accelerator)
        cached = grads_of(model)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=2e-2)
    flat_plain = torch.cat([g.flatten() for g in plain.values()])
    flat_cached = torch.cat([cached[n].flatten() for n in plain])
    assert torch.nn.functional.cosine_similarity(flat_plain, flat_cached, dim=0) > 0.999


def test_duplicate_texts_are_not_counted_as_negatives() -> None:
    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    p[2] = p[0]  # queries 0 and 2 share an answer
    keys = torch.tensor([10, 11, 12, 13])
    positive_keys = torch.tensor([20, 21, 20, 23])
    batch = Embedded(q, p, query_keys=keys, positive_keys=positive_keys, negative_keys=torch.tensor([], dtype=torch.long))
    masked = MultipleNegativesRankingLoss(mask_false_negatives=True)
    loss = masked(batch)
    assert masked.pop_stats() == {"masked_false_negatives": pytest.approx(2 / 12)}
    # By hand: rows 0 and 2 drop each other's (identical) positive from the softmax.
    scores = 20 * torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T
    scores[0, 2] = scores[2, 0] = float("-inf")
    expected = torch.nn.functional.cross_entropy(scores, torch.arange(4))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    unmasked = MultipleNegativesRankingLoss(mask_false_negatives=False)(batch)
    assert unmasked.item() > loss.item()


def test_a_hard_negative_that_is_the_positive_is_masked() -> None:
    torch.manual_seed(1)
    q, p = torch.randn(3, 8), torch.randn(3, 8)
    negatives = torch.stack([p[1], torch.randn(8)])
    batch = Embedded(q, p, negatives, negative_owner=torch.tensor([1, 2]), query_keys=torch.tensor([1, 2, 3]),
                     positive_keys=torch.tensor([7, 8, 9]), negative_keys=torch.tensor([8, 99]))
    loss_fn = MultipleNegativesRankingLoss()
    loss_fn(batch)
    # Query 1: its positive (key 8) also sits among the negatives; that copy is masked.
    assert loss_fn.pop_stats()["masked_false_negatives"] == pytest.approx(1 / (3 * 4))


def test_matryoshka_trains_each_prefix_of_the_embedding() -> None:
    torch.manual_seed(2)
    q, p = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16)
    base = MultipleNegativesRankingLoss(mask_false_negatives=False)
    loss = MatryoshkaLoss(base, [16, 4], [1.0, 0.5])(Embedded(q, p))
    expected = base(Embedded(q, p)) + 0.5 * base(Embedded(q[:, :4], p[:, :4]))
    assert loss.item() == pytest.approx(expected.item())
    built = build_loss(LossConfig(matryoshka_dims=[16, 4], matryoshka_weights=[1.0, 0.5]))
    assert isinstance(built, MatryoshkaLoss) and built.dims == [16, 4]
    with pytest.raises(ValueError, match="exceed the embedding size"):
        MatryoshkaLoss(base, [32])(Embedded(q, p))


def test_the_gradcache_benchmark_prints_its_figures(tiny_model: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "gradcache", "--small", "4", "--large", "16",
                           "--mini", "4", "--query_len", "4", "--doc_len", "8", "--steps", "1", "--model",
                           str(tiny_model)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cached batch 16 uses" in done.stdout and "GradCache takes" in done.stdout
