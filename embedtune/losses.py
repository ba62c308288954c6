"""Losses on pooled embeddings. Each is a small module: ``Embedded`` in, scalar loss out.

The contract every loss keeps: return the mean loss over this process's pairs, or a loss over
the gathered global batch that is the same on every process. The training loop weights it by
the process's share of the global batch, which makes the gradient that of one process holding
the whole batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from embedtune.config import ConfigError, DataConfig, LossConfig
from embedtune.distributed import gather_plain, gather_with_grad

# What a loss needs from each record: a query and a positive ("pairs"), plus a float label or
# score ("labelled"), or plus at least one hard negative ("triplets").
DataShape = Literal["pairs", "labelled", "triplets"]


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

    def truncated(self, dim: int) -> Embedded:
        """The first ``dim`` dimensions of every embedding (Matryoshka)."""
        cut = {name: getattr(self, name)[:, :dim] if getattr(self, name) is not None else None
               for name in ("queries", "positives", "negatives")}
        return Embedded(**cut, negative_owner=self.negative_owner, labels=self.labels, query_keys=self.query_keys,
                        positive_keys=self.positive_keys, negative_keys=self.negative_keys)


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives: each query must rank its own positive above every other document.

    Every query is scored against all positives and all hard negatives of the global batch
    (gathered across processes), so the negatives do not shrink as processes are added.
    Similarities and softmax run in fp32 whatever the autocast dtype. With ``symmetric`` each
    positive must also pick its own query among the batch's queries.

    With ``mask_false_negatives``, a document whose text equals the query's own positive, or
    the positive of a duplicate of the query, is not counted as a negative (it is one only by
    accident of batching). The share of masked candidates is kept in ``stats``.
    """

    needs: DataShape = "pairs"

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather: bool = True,
                 mask_false_negatives: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric
        self.gather = gather
        self.mask_false_negatives = mask_false_negatives
        self.stats = {"masked": 0.0, "candidates": 0.0}

    def _all(self, tensor: torch.Tensor | None, grad: bool = True) -> tuple[torch.Tensor | None, int]:
        if tensor is None or not self.gather:
            return tensor, 0
        return gather_with_grad(tensor) if grad else (gather_plain(tensor), 0)

    def forward(self, batch: Embedded) -> torch.Tensor:
        queries, positives = batch.queries.float(), batch.positives.float()
        # Gathered even when this process has none (0 rows): another process may have some, and
        # every process must take part in every gather.
        negatives = batch.negatives.float() if batch.negatives is not None else None
        all_positives, offset = self._all(positives)
        all_negatives, _ = self._all(negatives)
        documents = all_positives if all_negatives is None else torch.cat([all_positives, all_negatives])
        labels = torch.arange(offset, offset + queries.shape[0], device=queries.device)
        scores = self.scale * _cosine(queries, documents)
        if self.mask_false_negatives and batch.query_keys is not None:
            doc_keys = self._all(batch.positive_keys, grad=False)[0]
            if all_negatives is not None:
                negative_keys = batch.negative_keys
                if negative_keys is None:  # unknown texts: keys that match nothing
                    negative_keys = -1 - torch.arange(negatives.shape[0], device=negatives.device)
                doc_keys = torch.cat([doc_keys, self._all(negative_keys, grad=False)[0]])
            all_query_keys = self._all(batch.query_keys, grad=False)[0]
            # Same text as the own positive, or the positive of a duplicate of this query.
            false = doc_keys[None, :] == batch.positive_keys[:, None]
            duplicate_queries = all_query_keys[None, :] == batch.query_keys[:, None]
            false[:, : all_positives.shape[0]] |= duplicate_queries
            scores = self._mask(scores, false, labels)
        loss = _mean_cross_entropy(scores, labels)
        if self.symmetric:
            all_queries, _ = self._all(queries)
            backward_scores = self.scale * _cosine(positives, all_queries)
            if self.mask_false_negatives and batch.query_keys is not None:
                all_query_keys = self._all(batch.query_keys, grad=False)[0]
                all_positive_keys = self._all(batch.positive_keys, grad=False)[0]
                false = ((all_query_keys[None, :] == batch.query_keys[:, None])
                         | (all_positive_keys[None, :] == batch.positive_keys[:, None]))
                backward_scores = self._mask(backward_scores, false, labels)
            loss = (loss + _mean_cross_entropy(backward_scores, labels)) / 2
        return loss

    def _mask(self, scores: torch.Tensor, false: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(scores.shape[0], device=scores.device)
        false[rows, labels] = False  # never the true pair itself
        self.stats["masked"] += false.sum().detach()
        self.stats["candidates"] += scores.shape[0] * (scores.shape[1] - 1)
        return scores.masked_fill(false, float("-inf"))

    def pop_stats(self) -> dict[str, float]:
        """The share of in-batch candidates masked as false negatives since the last call."""
        masked, total = self.stats["masked"], self.stats["candidates"]
        self.stats = {"masked": 0.0, "candidates": 0.0}
        return {"masked_false_negatives": float(masked) / total} if total else {}


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


def _mean_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy that is 0 (still on the graph) for a process with no pairs this step."""
    return F.cross_entropy(scores, labels, reduction="sum") / max(scores.shape[0], 1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


RANKING = {"MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
           "CachedMultipleNegativesRankingLoss"}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module a config names, wrapped in Matryoshka when dimensions are given."""
    from embedtune.pair_losses import PAIR_LOSSES

    if cfg.name in RANKING:
        loss: nn.Module = MultipleNegativesRankingLoss(
            scale=cfg.scale, symmetric=cfg.symmetric or cfg.name == "MultipleNegativesSymmetricRankingLoss",
            gather=cfg.gather_across_processes, mask_false_negatives=cfg.mask_false_negatives)
    else:
        kwargs = {"margin": cfg.margin} if cfg.margin is not None else {}
        if cfg.name == "CoSENTLoss":
            kwargs["scale"] = cfg.scale
        if cfg.name in ("OnlineContrastiveLoss", "CoSENTLoss"):
            kwargs["gather"] = cfg.gather_across_processes
        loss = PAIR_LOSSES[cfg.name](**kwargs)
    if cfg.matryoshka_dims:
        loss = MatryoshkaLoss(loss, cfg.matryoshka_dims, cfg.matryoshka_weights)
    return loss


def check_data_shape(loss: nn.Module, data: DataConfig, name: str) -> None:
    """Refuse, before any work, a loss whose data the config does not provide."""
    if loss.needs == "labelled" and not data.label_field:
        raise ConfigError(f"{name} trains on pairs with a label or score: set data.label_field to the field that "
                          "holds it (1/0 for similar/dissimilar with ContrastiveLoss and OnlineContrastiveLoss, "
                          "a similarity score for CosineSimilarityLoss and CoSENTLoss)")
    if loss.needs == "triplets" and (not data.negatives_field or data.max_negatives < 1):
        raise ConfigError(f"{name} trains on (anchor, positive, negative) triplets: set data.negatives_field to "
                          "the field with each record's negative (and keep data.max_negatives at 1 or more)")
    data._require_negatives = loss.needs == "triplets"


# --- one training micro-step: forward and backward --------------------------------------------


def embedded(batch: dict, queries: torch.Tensor, documents: torch.Tensor) -> Embedded:
    n = batch["num_positives"]
    device = queries.device
    if batch.get("empty"):
        # A stand-in pair: zero rows that still hang off the graph, so every weight gets its
        # (zero) gradient and the gathers run on every process.
        rows = torch.zeros(0, dtype=torch.long, device=device)
        labels = torch.zeros(0, device=device) if "labels" in batch else None
        return Embedded(queries=queries[:0], positives=documents[:0], negatives=documents[:0],
                        negative_owner=rows, labels=labels, query_keys=rows, positive_keys=rows, negative_keys=rows)
    keys = {k: batch[k].to(device) for k in ("query_keys", "document_keys", "negative_owner")}
    return Embedded(queries=queries, positives=documents[:n], negatives=documents[n:],
                    negative_owner=keys["negative_owner"],
                    labels=batch["labels"].to(device) if "labels" in batch else None,
                    query_keys=keys["query_keys"], positive_keys=keys["document_keys"][:n],
                    negative_keys=keys["document_keys"][n:])


def plain_step(model: nn.Module, batch: dict, loss_fn: nn.Module, share: float, accelerator: Any) -> torch.Tensor:
    """Embed queries and documents with gradient, compute the loss, backward."""
    device = accelerator.device
    prepare = accelerator.unwrap_model(model).prepare
    queries = model(**prepare(batch["query"], device))
    documents = model(**prepare(batch["document"], device))
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

    def _chunks(self, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Ragged inputs (as the collator gives them) cut at the texts' boundaries."""
        lengths, ids = inputs["lengths"], inputs["input_ids"]
        bounds = [0, *lengths.cumsum(0).tolist()]
        return [{"input_ids": ids[bounds[start]:bounds[min(start + self.mini_batch_size, len(lengths))]],
                 "lengths": lengths[start:start + self.mini_batch_size]}
                for start in range(0, len(lengths), self.mini_batch_size)]

    def __call__(self, model: nn.Module, batch: dict, loss_fn: nn.Module, share: float,
                 accelerator: Any) -> torch.Tensor:
        device = accelerator.device
        prepare = accelerator.unwrap_model(model).prepare
        parts = [[prepare(c, device) for c in self._chunks(batch[side])] for side in ("query", "document")]
        states: list[list[RngState]] = [[], []]
        cached = []
        with torch.no_grad():
            for side, chunks in enumerate(parts):
                outs = []
                for chunk in chunks:
                    states[side].append(RngState.capture(device))
                    outs.append(model(**chunk))
                cached.append(torch.cat(outs).detach().requires_grad_())
        loss = loss_fn(embedded(batch, cached[0], cached[1])) * share
        grads = torch.autograd.grad(loss, cached)
        after = RngState.capture(device)
        last = (1, len(parts[1]) - 1)
        for side, chunks in enumerate(parts):
            start = 0
            for index, chunk in enumerate(chunks):
                rows = chunk["rows"] if "rows" in chunk else chunk["input_ids"].shape[0]
                grad = grads[side][start:start + rows]
                start += rows
                states[side][index].restore(device)
                # Only the very last backward of the step may trigger DDP's gradient all-reduce.
                sync = contextlib.nullcontext() if (side, index) == last else accelerator.no_sync(model)
                with sync:
                    out = model(**chunk)
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


def make_step(cfg: LossConfig) -> Any:
    """The forward/backward of one micro-batch: plain, or GradCache when a mini-batch size is set."""
    size = cfg.mini_batch_size
    if cfg.name == "CachedMultipleNegativesRankingLoss" and size is None:
        size = 32
    return GradCacheStep(size) if size else plain_step
