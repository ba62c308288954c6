"""Hard negatives mined during training (``train.hard_negatives``): a round embeds the training
pairs' distinct answers and questions with the weights of the moment, gives every training pair
the closest answers of other questions that pass the margin (``negatives.choose_negatives``, the
code ``embedtune mine`` runs), and hands the result to the stream as a ``MinedNegatives`` table.

A round is collective: every process embeds its share of the texts (as evaluation does), every
process gets all embeddings, each chooses the negatives of its share of the pairs, and every
process ends with the whole table. Held-out pairs are not read, so their answers are never a
negative and their questions never mined for. The table is registered with Accelerate's
checkpointing, so a resumed run trains on the negatives the interrupted run had mined.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from embedtune.config import Config
from embedtune.data.collate import PairCollator
from embedtune.data.records import Pair, pair_key, read_pairs, resolve_files, text_key, trains_on
from embedtune.data.stream import process_slice
from embedtune.mining.negatives import Selection, choose_negatives
from embedtune.retrieval import RetrievalSet, set_encoder

logger = logging.getLogger(__name__)

SCORE_BUDGET = 1 << 25  # query x document scores held at once while searching


class MinedNegatives:
    """The latest round's negatives: for each training pair (by ``pair_key``), rows of ``texts``.

    Kept as two tensors and a list of texts, which is also its checkpointed state (read back with
    weights_only). ``step`` is the optimizer step whose weights mined it; -1 before any round.
    """

    def __init__(self) -> None:
        self.step = -1
        self.keys = torch.empty(0, dtype=torch.long)  # sorted
        self.rows = torch.empty(0, 0, dtype=torch.int32)  # (pairs, num); -1: no negative in that slot
        self.texts: list[str] = []
        self._index: np.ndarray | None = None
        self._text_keys: list[int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "keys": self.keys, "rows": self.rows, "texts": list(self.texts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.keys, self.rows, self.texts = int(state["step"]), state["keys"], state["rows"], state["texts"]
        self._index = None
        self._text_keys = None

    def set(self, step: int, keys: list[int], rows: list[list[int]], texts: list[str], num: int) -> None:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        padded = [rows[i][:num] + [-1] * (num - len(rows[i][:num])) for i in order]
        table = torch.tensor(padded, dtype=torch.int32).reshape(len(keys), num)
        self.load_state_dict({"step": step, "keys": torch.tensor([keys[i] for i in order], dtype=torch.long),
                              "rows": table, "texts": texts})

    def negatives_of(self, pair: Pair) -> tuple[str, ...] | None:
        """The pair's mined negatives, best first; None when no round has covered it."""
        if self.step < 0 or not len(self.keys):
            return None
        at = self._find(pair)
        return None if at is None else tuple(self.texts[r] for r in self.rows[at].tolist() if r >= 0)

    def _find(self, pair: Pair) -> int | None:
        return self._find_key(pair_key(pair.query, pair.positive))

    def _find_key(self, key: int) -> int | None:
        if self._index is None:
            self._index = self.keys.numpy()
        at = int(np.searchsorted(self._index, key))
        return None if at == len(self._index) or self._index[at] != key else at

    def negative_keys(self, pair: Pair) -> list[int]:
        """The text keys of the pair's mined negatives (none when no round has covered it)."""
        return self.negative_keys_of(pair_key(pair.query, pair.positive))

    def negative_keys_of(self, key: int) -> list[int]:
        """``negative_keys`` of the pair whose ``pair_key`` is ``key``."""
        if self.step < 0 or not len(self.keys):
            return []
        if self._text_keys is None:
            self._text_keys = [text_key(t) for t in self.texts]
        at = self._find_key(key)
        return [] if at is None else [self._text_keys[r] for r in self.rows[at].tolist() if r >= 0]

    def apply(self, pair: Pair) -> Pair:
        """``pair`` with its mined negatives in place of its own (unchanged when it has none mined)."""
        found = self.negatives_of(pair)
        return pair if found is None else replace(pair, negatives=found)


@dataclass
class RoundFigures:
    pairs: int
    corpus: int
    seconds: float
    found: float  # mean negatives per pair
    short: int  # pairs with fewer than asked (the margin left too few)


def training_pairs(cfg: Config) -> list[Pair]:
    """The distinct training pairs (held-out ones never), in file order; bad records are the stream's to report."""
    seen: set[int] = set()
    pairs = []
    for item in read_pairs(resolve_files(cfg.data.train_files), cfg.data):
        if isinstance(item, Pair) and trains_on(item, cfg.data):
            key = pair_key(item.query, item.positive)
            if key not in seen:
                seen.add(key)
                pairs.append(item)
    return pairs


def mine_round(model: torch.nn.Module, collate: PairCollator, cfg: Config, accelerator: Any, step: int,
               table: MinedNegatives) -> RoundFigures:
    """One round (collective): ``table`` holds the negatives of every training pair afterwards."""
    settings = cfg.train.hard_negatives
    assert settings is not None
    started = time.perf_counter()
    pairs = training_pairs(cfg)
    rows: dict[int, int] = {}  # answer text key -> corpus row
    corpus: list[str] = []
    for pair in pairs:
        key = text_key(pair.positive)
        if key not in rows:
            rows[key] = len(corpus)
            corpus.append(pair.positive)
    # Every answer of a question (and the answer itself) is never its negative.
    answers_of: dict[int, set[int]] = {}
    for pair in pairs:
        answers_of.setdefault(text_key(pair.query), set()).add(rows[text_key(pair.positive)])
    prompts = [p.prompt for p in pairs]
    texts = RetrievalSet([p.query for p in pairs], corpus, [], [], prompts if any(x is not None for x in prompts)
                         else [])
    encode = set_encoder(model, collate, texts, settings.batch_size, accelerator)
    queries = encode(texts.queries, "query")
    documents = encode(corpus, "document")
    # Each process chooses for its share of the pairs, on its device; every process gets the whole.
    share = process_slice(len(pairs), accelerator.num_processes, accelerator.process_index)
    device = accelerator.device
    margin, relative = settings.margins()
    selection = Selection(num_negatives=settings.num, skip_top=settings.skip_top, margin=margin,
                          relative_margin=relative, max_candidates=settings.max_candidates)
    mine = pairs[share]
    chosen: list[list[int]] = []
    if mine:
        positive_rows = [rows[text_key(p.positive)] for p in mine]
        excluded = [frozenset(answers_of[text_key(p.query)]) for p in mine]
        chunk = max(1024, SCORE_BUDGET // max(len(mine), 1))
        chosen, _ = choose_negatives(queries[share].to(device), documents.to(device), positive_rows, excluded,
                                     selection, chunk)
    if accelerator.num_processes > 1:
        chosen = [rows_of_pair for part in gather_object([chosen]) for rows_of_pair in part]
    table.set(step, [pair_key(p.query, p.positive) for p in pairs], chosen, corpus, settings.num)
    found = [len(c) for c in chosen]
    return RoundFigures(len(pairs), len(corpus), time.perf_counter() - started,
                        sum(found) / max(len(found), 1), sum(n < settings.num for n in found))
