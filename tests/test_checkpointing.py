"""Gradient checkpointing (model.gradient_checkpointing) trades compute for memory and nothing else:
the same gradients in every layout, with dropout, with GradCache, and the same run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_gradcache import batch_of, grads_of, tiny

from embedtune.config import ConfigError
from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.training.devices import checkpoint_activations
from embedtune.training.step import GradCacheStep, plain_step


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def step_grads(model: EmbeddingModel, batch, step, accelerator, seed: int = 7) -> tuple[float, dict]:
    torch.manual_seed(seed)
    loss = step(model, batch, MultipleNegativesRankingLoss(symmetric=True), 1.0, accelerator)
    return loss.item(), grads_of(model)


def saved_activations(model: EmbeddingModel, batch) -> int:
    """Bytes the autograd graph keeps for the backward pass of one forward."""
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(model.prepare(batch.document, torch.device("cpu"))).sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(kept)


@pytest.mark.parametrize("layout", ["padded", "padded in chunks", "packed"])
@pytest.mark.parametrize("cached", [False, True])
def test_checkpointing_gives_the_same_gradients_with_dropout(tokenizer_dir: Path, tmp_path: Path, accelerator,
                                                             layout: str, cached: bool) -> None:
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.3)))
    batch = batch_of(tokenizer, n=40)
    model.layout_by_cost = False  # the layout named, whatever the lengths
    if layout == "packed":
        assert model.enable_packing(tokenizer)
    elif layout == "padded in chunks":
        model.padded_chunks = 2
    model.train()
    step = GradCacheStep(8) if cached else plain_step
    kept_before = saved_activations(model, batch)
    loss, grads = step_grads(model, batch, step, accelerator)
    checkpoint_activations(model.encoder)
    kept_after = saved_activations(model, batch)
    assert kept_after < kept_before / 2  # the layers' activations are no longer kept
    checkpointed_loss, checkpointed = step_grads(model, batch, step, accelerator)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert checkpointed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The masks are random: another seed gives another gradient, so the match above is not trivial.
    _, other = step_grads(model, batch, step, accelerator, seed=8)
    assert any(not torch.allclose(other[n], g) for n, g in grads.items())


def test_a_run_with_checkpointing_trains_the_same_weights(train_args: list[str], tmp_path: Path) -> None:
    from embedtune.commands.train import main

    def run(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        args = list(train_args)
        args[args.index("--output_dir") + 1] = str(out)
        assert main(args + ["tracking.report_to=none", "train.max_steps=3", *extra]) == 0
        return load_file(out / "final_model" / "model.safetensors")

    plain = run(tmp_path / "plain")
    checkpointed = run(tmp_path / "checkpointed", "model.gradient_checkpointing=true")
    assert plain.keys() == checkpointed.keys()
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    log = (tmp_path / "checkpointed" / "logs" / "train.log").read_text()
    assert "gradient checkpointing on" in log
    losses = [json.loads(line).get("loss") for line in (tmp_path / "plain" / "training_metrics.jsonl").open()]
    assert any(loss is not None for loss in losses)


def test_a_model_that_cannot_checkpoint_is_refused_naming_the_key(tiny_model: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = EmbeddingModel.from_pretrained(str(tiny_model))
    monkeypatch.setattr(type(model.encoder), "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="model.gradient_checkpointing=false"):
        checkpoint_activations(model.encoder)
