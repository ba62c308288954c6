"""Retrieval metrics on held-out pairs: each query against the corpus of held-out answers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from embedtune.data import Pair

Encoder = Callable[[list[str], str], torch.Tensor]  # (texts, "query" | "document") -> embeddings


@dataclass
class RetrievalSet:
    queries: list[str]
    corpus: list[str]
    relevant: list[set[int]]  # per query, the corpus indices that answer it

    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair]) -> RetrievalSet:
        """Identical answers become one corpus entry, relevant to every query they answer."""
        index: dict[str, int] = {}
        corpus: list[str] = []
        relevant: list[set[int]] = []
        for pair in pairs:
            if pair.positive not in index:
                index[pair.positive] = len(corpus)
                corpus.append(pair.positive)
            relevant.append({index[pair.positive]})
        return cls([p.query for p in pairs], corpus, relevant)

    def __len__(self) -> int:
        return len(self.queries)


def metrics_from_scores(scores: torch.Tensor, relevant: list[set[int]], k: int = 10) -> dict[str, float]:
    """nDCG@k, MRR@k and Recall@k, averaged over queries, for binary relevance."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
    ndcg = mrr = recall = 0.0
    for ranked, rel in zip(top, relevant):
        hits = [i for i, doc in enumerate(ranked) if doc in rel]
        dcg = sum(1 / math.log2(i + 2) for i in hits)
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(rel), k)))
        ndcg += dcg / ideal
        mrr += 1 / (hits[0] + 1) if hits else 0.0
        recall += len(hits) / len(rel)
    n = max(len(relevant), 1)
    return {f"ndcg@{k}": ndcg / n, f"mrr@{k}": mrr / n, f"recall@{k}": recall / n}


def encode_texts(model: torch.nn.Module, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                 texts: list[str], batch_size: int, accelerator: Any) -> torch.Tensor:
    """Embed texts in eval mode, split across processes; every process gets all rows (fp32, CPU).

    Texts are sorted by length so batches carry little padding, and dealt out in turn so every
    process gets a similar share of long and short ones.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    mine = order[accelerator.process_index::accelerator.num_processes]
    dim = accelerator.unwrap_model(model).dim
    local = torch.empty(len(mine), dim, device=accelerator.device)
    was_training = model.training
    model.eval()
    # Every process runs as many forward passes as the busiest one: under FSDP a forward pass
    # is collective, and a process that stopped early would leave the others waiting.
    passes = math.ceil(math.ceil(len(texts) / accelerator.num_processes) / batch_size)
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, passes * batch_size, batch_size):
            rows = mine[start:start + batch_size]
            chunk = [texts[i] for i in rows] or texts[:1]  # an idle process embeds one text for nothing
            inputs = {k: v.to(accelerator.device) for k, v in tokenize(chunk).items()}
            out = model(**inputs).float()
            if rows:
                local[start:start + len(rows)] = out
    model.train(was_training)
    rows = torch.tensor(mine, dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
        rows = accelerator.gather(accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
    out = torch.empty(len(texts), dim)
    kept = rows >= 0
    out[rows[kept].cpu()] = local[kept].cpu()
    return out


def evaluate(encode: Encoder, data: RetrievalSet, k: int = 10, compute: bool = True) -> dict[str, float]:
    """Encoding is collective (every process calls this); the metrics are computed where ``compute``."""
    queries = encode(data.queries, "query")
    corpus = encode(data.corpus, "document")
    if not compute:
        return {}
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(corpus, dim=-1).T
    return metrics_from_scores(scores, data.relevant, k)


def format_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """A plain before/after table for the console and the log."""
    rows = [f"{'metric':<12}{'before':>10}{'after':>10}{'change':>10}"]
    for name, value in after.items():
        old = before.get(name) if before else None
        rows.append(f"{name:<12}{'' if old is None else f'{old:.4f}':>10}{value:>10.4f}"
                    f"{'' if old is None else f'{value - old:+.4f}':>10}")
    return "\n".join(rows)
