"""One training micro-step, forward and backward: plain, or GradCache for batches larger than memory.

A step takes the typed ``TrainBatch``, embeds its queries and documents with the model, computes
the loss on them (weighted by this process's share of the global batch) and backpropagates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embedtune.config import LossConfig
from embedtune.data.collate import TrainBatch
from embedtune.losses.base import Embedded
from embedtune.model.packing import Ragged

Step = Callable[[nn.Module, TrainBatch, nn.Module, float, Any], torch.Tensor]


def embedded(batch: TrainBatch, queries: torch.Tensor, documents: torch.Tensor) -> Embedded:
    """The loss's view of a batch: embeddings plus the labels and text keys that go with them."""
    n = batch.num_positives
    device = queries.device
    if batch.empty:
        # A stand-in pair: zero rows that still hang off the graph, so every weight gets its
        # (zero) gradient and the gathers run on every process.
        rows = torch.zeros(0, dtype=torch.long, device=device)
        labels = torch.zeros(0, device=device) if batch.labels is not None else None
        scores = torch.zeros(0, device=device) if batch.scores is not None else None
        return Embedded(queries=queries[:0], positives=documents[:0], negatives=documents[:0],
                        negative_owner=rows, labels=labels, query_keys=rows, positive_keys=rows, negative_keys=rows,
                        positive_scores=scores, negative_scores=scores)
    document_keys = batch.document_keys.to(device)
    scores = batch.scores.to(device) if batch.scores is not None else None
    return Embedded(queries=queries, positives=documents[:n], negatives=documents[n:],
                    negative_owner=batch.negative_owner.to(device),
                    labels=batch.labels.to(device) if batch.labels is not None else None,
                    query_keys=batch.query_keys.to(device), positive_keys=document_keys[:n],
                    negative_keys=document_keys[n:], positive_scores=None if scores is None else scores[:n],
                    negative_scores=None if scores is None else scores[n:])


def plain_step(model: nn.Module, batch: TrainBatch, loss_fn: nn.Module, share: float,
               accelerator: Any) -> torch.Tensor:
    """Embed queries and documents with gradient, compute the loss, backward."""
    device = accelerator.device
    prepare = accelerator.unwrap_model(model).prepare
    queries = model(prepare(batch.query, device))
    documents = model(prepare(batch.document, device))
    loss = loss_fn(embedded(batch, queries, documents)) * share
    accelerator.backward(loss)
    return loss.detach()


class GradCacheStep:
    """GradCache: the loss of a large batch in the memory of a mini-batch, with exact gradients.

    1. Embed every mini-batch without a graph, remembering the RNG state before each.
    2. Compute the loss on the cached embeddings (gathered across processes as usual) and its
       gradient with respect to them.
    3. Embed each mini-batch again with a graph, replaying its RNG state so dropout draws the same
       masks, and backpropagate the cached gradient through it. DDP synchronizes once, on the
       last mini-batch of the optimizer step.
    """

    def __init__(self, mini_batch_size: int) -> None:
        self.mini_batch_size = mini_batch_size

    def mini_batches(self, texts: Ragged) -> list[Ragged]:
        """The texts cut at their boundaries into mini-batches."""
        size = self.mini_batch_size
        return [texts.select(start, start + size) for start in range(0, texts.rows, size)]

    def __call__(self, model: nn.Module, batch: TrainBatch, loss_fn: nn.Module, share: float,
                 accelerator: Any) -> torch.Tensor:
        device = accelerator.device
        prepare = accelerator.unwrap_model(model).prepare
        # Per side (queries, documents): its mini-batches on the device, and the RNG state before each.
        minis = [[prepare(texts, device) for texts in self.mini_batches(side)] for side in (batch.query, batch.document)]
        states: list[list[RngState]] = [[], []]
        cached = []
        with torch.no_grad():
            for side, side_minis in enumerate(minis):
                outs = []
                for mini in side_minis:
                    states[side].append(RngState.capture(device))
                    outs.append(model(mini))
                cached.append(torch.cat(outs).detach().requires_grad_())
        loss = loss_fn(embedded(batch, cached[0], cached[1])) * share
        grads = torch.autograd.grad(loss, cached)
        after = RngState.capture(device)
        last = (1, len(minis[1]) - 1)
        for side, side_minis in enumerate(minis):
            start = 0
            for index, mini in enumerate(side_minis):
                grad = grads[side][start:start + mini.rows]
                start += mini.rows
                states[side][index].restore(device)
                # Only the very last backward of the step may trigger DDP's gradient all-reduce.
                sync = contextlib.nullcontext() if (side, index) == last else accelerator.no_sync(model)
                with sync:
                    out = model(mini)
                    accelerator.backward((out.float() * grad.float()).sum())
        after.restore(device)
        return loss.detach()


@dataclass
class RngState:
    """The CPU and accelerator RNG states, to replay dropout exactly."""

    cpu: torch.Tensor
    device: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        on_gpu = device.type == "cuda"
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_gpu else None)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.device, device)


def make_step(cfg: LossConfig) -> Step:
    """The forward/backward of one micro-batch: plain, or GradCache when a mini-batch size is set."""
    size = cfg.gradcache_mini_batch()
    return GradCacheStep(size) if size else plain_step
