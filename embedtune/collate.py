"""Tokenization of pairs into model inputs; runs inside DataLoader workers."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from embedtune.data import Pair, text_key


class PairCollator:
    """Queries and documents get their own max length and prefix; padding is to the longest.

    Documents are the positives in batch order followed by every hard negative of the batch,
    so a record may carry any number of negatives.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, query_max_length: int, document_max_length: int,
                 query_prefix: str = "", document_prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def queries(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode([self.query_prefix + t for t in texts], self.query_max_length)

    def documents(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode([self.document_prefix + t for t in texts], self.document_max_length)

    def __call__(self, pairs: list[Pair]) -> dict[str, Any]:
        negatives = [n for p in pairs for n in p.negatives]
        query = self.queries([p.query for p in pairs])
        document = self.documents([p.positive for p in pairs] + negatives)
        masks = (query["attention_mask"], document["attention_mask"])
        out: dict[str, Any] = {
            "query": query,
            "document": document,
            # Counted here, in the worker, so the loop needs no device sync to report them.
            "real_tokens": sum(int(m.sum()) for m in masks),
            "padded_tokens": sum(m.numel() for m in masks),
            "num_positives": len(pairs),
            # For each negative, the row of its query; and text keys to find false negatives.
            "negative_owner": torch.tensor([i for i, p in enumerate(pairs) for _ in p.negatives], dtype=torch.long),
            "query_keys": torch.tensor([text_key(p.query) for p in pairs], dtype=torch.long),
            "document_keys": torch.tensor([text_key(t) for t in [p.positive for p in pairs] + negatives],
                                          dtype=torch.long),
        }
        if pairs and pairs[0].label is not None:
            out["labels"] = torch.tensor([p.label for p in pairs], dtype=torch.float)
        return out
