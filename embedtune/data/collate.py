"""Tokenization of pairs into the typed training batch; runs inside DataLoader workers.

Texts leave the workers ragged: all token ids end to end plus each text's length, with no
padding. ``EmbeddingModel.prepare`` turns that into packed or padded inputs on the device.
``TrainBatch`` is the one contract between the workers, the loop and the training step.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from embedtune.config import ConfigError, DataConfig
from embedtune.data.records import Pair, Reject, text_key
from embedtune.model.folder import ModelFolder
from embedtune.model.packing import LayoutChoice, Ragged

logger = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One process's slice of one micro-batch, tokenized.

    Documents are the positives in pair order, then every hard negative of the slice. The
    collator fills the texts; the stream adds where the slice sits in the global batch.
    """

    query: Ragged
    document: Ragged
    num_positives: int
    negative_owner: torch.Tensor  # (negatives,): for each hard negative, the row of its query
    query_keys: torch.Tensor  # (pairs,): text keys, to find false negatives
    document_keys: torch.Tensor  # (documents,)
    labels: torch.Tensor | None  # (pairs,): a float label or score, for losses on labelled pairs
    # Counted in the worker, so the loop needs no device sync to report them.
    real_tokens: int
    computed_tokens: int  # what the encoder computes in the layouts it takes (padding included)
    scores: torch.Tensor | None = None  # (documents,): the teacher's score of each document for its query
    ids: list[str] = field(default_factory=list)  # this process's pairs
    global_size: int = 0  # pairs in the micro-batch across processes
    step_size: int = 0  # pairs in the global batch (all micro-batches, all processes); 0: no pairs
    all_ids: list[str] | None = None  # every pair of the micro-batch (tracking.log_batch_ids)
    rejects: list[Reject] = field(default_factory=list)  # bad records met while filling the batch
    empty: bool = False  # no pair here: a stand-in pair that weighs nothing keeps collectives in step

    def pin_memory(self) -> TrainBatch:
        """The DataLoader calls this when pinning memory (CUDA)."""
        tensors = {name: getattr(self, name).pin_memory()
                   for name in ("query", "document", "negative_owner", "query_keys", "document_keys")}
        labels = self.labels.pin_memory() if self.labels is not None else None
        scores = self.scores.pin_memory() if self.scores is not None else None
        return replace(self, **tensors, labels=labels, scores=scores)


def query_prefix(data: DataConfig, folder: ModelFolder | None) -> str:
    """What every query starts with: the text of the base model's prompt ``data.query_prompt``
    names, else ``data.query_prefix``. (A record's ``data.prompt_field`` replaces it for that record.)"""
    if data.query_prompt is None:
        return data.query_prefix
    prompts = folder.prompts if folder is not None else {}
    if data.query_prompt not in prompts:
        where = folder.path if folder is not None else "the base model"
        names = ", ".join(repr(name) for name in sorted(prompts)) or "none"
        raise ConfigError(f"data.query_prompt={data.query_prompt!r}: {where} has no prompt of that name (its prompts, "
                          f"in config_sentence_transformers.json: {names}); name one of them, or set data.query_prefix")
    return prompts[data.query_prompt]


PROBE = ["A probe sentence, with punctuation: and ÜNICODE ünïcödé, numbers 3.14 and   spaces?", "x",
         "another one that runs on for a while so that truncation has something to cut " * 3]


class PairCollator:
    """Queries and documents get their own max length and prefix.

    Documents are the positives in batch order followed by every hard negative of the batch,
    so a record may carry any number of negatives.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, query_max_length: int, document_max_length: int,
                 query_prefix: str = "", document_prefix: str = "", padded_chunks: int = 1) -> None:
        self.tokenizer = tokenizer
        # How training lays the texts out (the trainer gives the model's own once it is on its
        # device), for the count of tokens computed.
        self.layouts = LayoutChoice(packed=False, max_chunks=padded_chunks)
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.fast = self._fast_backend(tokenizer)

    @staticmethod
    def _fast_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
        """The Rust tokenizer underneath, called directly: it skips building padded tensors, offsets
        and Python objects per text (about twice the speed). Used only if it gives the very ids
        of the tokenizer's own call."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        fast = copy.deepcopy(backend)
        fast.no_padding()
        for max_length in (8, 512):
            fast.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))
            expected = tokenizer(PROBE, truncation=True, max_length=max_length)["input_ids"]
            if [e.ids for e in fast.encode_batch_fast(PROBE)] != expected:
                logger.info("tokenizing through the tokenizer's own call (its fast path gives other ids)")
                return None
        return fast

    def encode(self, texts: list[str], max_length: int) -> Ragged:
        """Ragged: ``input_ids`` of every text end to end, and each text's ``lengths``."""
        if not texts:
            ids: list[list[int]] = []
        elif self.fast is not None:
            self.fast.enable_truncation(max_length, direction=getattr(self.tokenizer, "truncation_side", "right"))
            ids = [e.ids for e in self.fast.encode_batch_fast(texts)]
        else:
            ids = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return Ragged(torch.from_numpy(flat), torch.from_numpy(lengths))

    def queries(self, texts: list[str], prompts: list[str | None] | None = None) -> Ragged:
        """``prompts``: each text's own instruction (None: the query prefix), prepended instead of the prefix."""
        if prompts is None:
            return self.encode([self.query_prefix + t for t in texts], self.query_max_length)
        return self.encode([(self.query_prefix if p is None else p) + t for t, p in zip(texts, prompts, strict=True)],
                           self.query_max_length)

    def queries_as_given(self, texts: list[str]) -> Ragged:
        """Queries that already carry their prefix or instruction."""
        return self.encode(texts, self.query_max_length)

    def documents(self, texts: list[str]) -> Ragged:
        return self.encode([self.document_prefix + t for t in texts], self.document_max_length)

    def __call__(self, pairs: list[Pair]) -> TrainBatch:
        negatives = [n for p in pairs for n in p.negatives]
        query = self.queries([p.query for p in pairs], [p.prompt for p in pairs])
        document = self.documents([p.positive for p in pairs] + negatives)
        sides = (query.lengths, document.lengths)
        return TrainBatch(
            query=query,
            document=document,
            num_positives=len(pairs),
            negative_owner=torch.tensor([i for i, p in enumerate(pairs) for _ in p.negatives], dtype=torch.long),
            query_keys=torch.tensor([text_key(p.query) for p in pairs], dtype=torch.long),
            document_keys=torch.tensor([text_key(t) for t in [p.positive for p in pairs] + negatives],
                                       dtype=torch.long),
            labels=torch.tensor([p.label for p in pairs], dtype=torch.float)
            if pairs and pairs[0].label is not None else None,
            real_tokens=sum(int(n.sum()) for n in sides),
            computed_tokens=sum(self.layouts.computed_tokens(n) for n in sides),
            scores=document_scores(pairs),
        )


def document_scores(pairs: list[Pair]) -> torch.Tensor | None:
    """The teacher's scores in the documents' order (positives, then every pair's negatives), or
    None when the pairs carry none."""
    if not pairs or any(p.scores is None for p in pairs):
        return None
    values = [p.scores[0] for p in pairs] + [s for p in pairs for s in p.scores[1:]]
    return torch.tensor(values, dtype=torch.float)
