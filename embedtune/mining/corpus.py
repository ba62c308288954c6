"""The corpus mining searches: the input's distinct answers plus any extra documents, read in a
first pass with their texts spooled to disk, then embedded into one preallocated tensor."""

from __future__ import annotations

import itertools
import json
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from embedtune.config import DataConfig
from embedtune.data.collate import PairCollator
from embedtune.data.records import (
    SHOWN,
    DataError,
    Pair,
    Reject,
    decode_json,
    file_format,
    is_held_out,
    line_problem,
    read_file,
    read_records,
    repeated_keys,
    text_key,
)
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.packing import Ragged
from embedtune.retrieval import embed_rows, length_order

ENCODE_BLOCK = 32  # batches of documents read and length-sorted together


# --- the corpus ------------------------------------------------------------------------------


def _document_record(path: str, line: int, raw: Any) -> dict[str, Any] | Reject | None:
    """An extra document's record as a dict, a Reject, or None for a blank line.

    Documents are no Q&A records, so ``parse_record`` (which wants a question and an answer) does
    not apply to them; the reader's own rule for unusable lines does (``line_problem``).
    """
    if not isinstance(raw, str):
        return raw if isinstance(raw, dict) else Reject(path, line, "expected a record", str(raw)[:SHOWN])
    if not raw.strip():
        return None
    problem = line_problem(raw)
    if problem:
        return Reject(path, line, problem, raw[:SHOWN])
    try:
        record = decode_json(raw)
    except json.JSONDecodeError as exc:
        return Reject(path, line, f"not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object "
                      "per line", raw[:SHOWN])
    if not isinstance(record, dict):
        return Reject(path, line, f"expected a JSON object, got {type(record).__name__}", raw[:SHOWN])
    if repeated := sorted(repeated_keys(record) & {"text", "title"}):
        return Reject(path, line, f"the key '{repeated[0]}' appears more than once in the record, and only one "
                      f"value can be used; keep one '{repeated[0]}'", raw[:SHOWN])
    return record


def document_text(path: str, line: int, record: dict[str, Any]) -> str | Reject:
    """An extra document: ``text``, after the BEIR-style ``title`` when there is one."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        keys = ", ".join(sorted(record)[:10]) or "none"
        found = "no 'text' field" if "text" not in record else f"'text' is {text!r:.60}"
        return Reject(path, line, f"{found} (fields here: {keys}); a corpus record needs a non-empty 'text', "
                      "with an optional 'title'", json.dumps(record, default=str)[:SHOWN])
    title = record.get("title")
    return f"{title.strip()} {text}" if isinstance(title, str) and title.strip() else text


def bad_record(reject: Reject, hint: str) -> DataError:
    return DataError(f"bad record: {reject.message()}\n{hint}")


def read_input(files: list[str], cfg: DataConfig) -> Iterator[tuple[dict[str, Any], Pair]]:
    """Every input record with its pair, in file order; the first bad record stops the run.

    The record itself is kept because it is written out whole, with every field it had.
    """
    for item, raw in read_records(files, cfg):
        if isinstance(item, Reject):
            raise bad_record(item, "Fix it: every input record is written to the output, so none is skipped.")
        # Accepted by parse_record: a JSONL line holds one JSON object, a Parquet or CSV row is one already.
        yield (json.loads(raw) if isinstance(raw, str) else raw), item


def read_documents(files: list[str]) -> Iterator[str]:
    for path in files:
        for line, raw in read_file(path, file_format(path, "auto")):
            record = _document_record(path, line, raw)
            if record is None:
                continue
            text = record if isinstance(record, Reject) else document_text(path, line, record)
            if isinstance(text, Reject):
                raise bad_record(text, "Fix it, or leave it out of the corpus file.")
            yield text


class Corpus:
    """The distinct documents: texts in a spool file on disk, a few integers each in memory.

    Rows are in order of first appearance: the input's answers, then the extra documents.
    """

    def __init__(self, spool: IO[bytes], offsets: np.ndarray, keys: np.ndarray, answers: int,
                 same_question: dict[int, frozenset[int]], records: int) -> None:
        self.spool = spool
        self.offsets = offsets  # byte offset of each row's text in the spool
        self.keys = keys  # text_key of each row
        self.answers = answers  # rows that are some record's answer
        self.same_question = same_question  # question key -> rows of its answers, for questions with several
        self.records = records
        self._sorted = np.argsort(keys, kind="stable")
        self.embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self, keys: Sequence[int]) -> list[int]:
        wanted = np.asarray(keys, dtype=np.int64)
        at = np.searchsorted(self.keys, wanted, sorter=self._sorted)
        rows = self._sorted[np.minimum(at, len(self.keys) - 1)]
        if len(rows) and not np.array_equal(self.keys[rows], wanted):
            raise DataError("the input changed while it was being read; run the miner again")
        return rows.tolist()

    def excluded(self, query_key: int, positive_row: int) -> frozenset[int]:
        """A question's own answer and those of other records with the same question."""
        return self.same_question.get(query_key, frozenset()) | {positive_row}

    def texts(self, rows: Sequence[int]) -> dict[int, str]:
        out = {}
        for row in sorted(set(rows), key=lambda r: self.offsets[r]):
            self.spool.seek(int(self.offsets[row]))
            out[row] = json.loads(self.spool.readline())
        return out

    def iter_texts(self) -> Iterator[str]:
        """All rows' texts in row order, read straight through the spool."""
        self.spool.seek(0)
        position, row = 0, 0
        for line in self.spool:
            if row < len(self) and position == self.offsets[row]:
                yield json.loads(line)
                row += 1
            position += len(line)


def gather_corpus(input_files: list[str], corpus_files: list[str], cfg: DataConfig, spool: IO[bytes],
                  held_out: float = 0.0) -> Corpus:
    """The first pass: every record is checked, every document's text spooled and hashed. The
    answers of held-out records (``held_out``: training's data.eval_fraction) stay out of it."""
    offsets, keys, query_keys, answer_keys = array("q"), array("q"), array("q"), array("q")
    position = 0

    def add(text: str) -> int:
        nonlocal position
        data = json.dumps(text).encode("ascii") + b"\n"
        spool.write(data)
        offsets.append(position)
        key = text_key(text)
        keys.append(key)
        position += len(data)
        return key

    for _, pair in tqdm(read_input(input_files, cfg), desc="read", unit=" records", leave=False):
        if is_held_out(pair, held_out):
            continue
        answer_keys.append(add(pair.positive))
        query_keys.append(text_key(pair.query))
    answer_entries = len(offsets)
    for text in read_documents(corpus_files):
        add(text)
    spool.flush()
    if not answer_entries:
        raise DataError(f"{', '.join(input_files)}: no records found; give it one JSON record per line")

    # Distinct by normalized text; a document keeps its first appearance (so answers come first).
    all_keys = np.frombuffer(keys, dtype=np.int64)
    _, first = np.unique(all_keys, return_index=True)
    first.sort()
    corpus = Corpus(spool, np.frombuffer(offsets, dtype=np.int64)[first].copy(), all_keys[first].copy(),
                    int((first < answer_entries).sum()), {}, answer_entries)

    # Questions asked more than once with different answers: each answer is no negative of the others.
    pairs = np.unique(np.stack([np.frombuffer(query_keys, dtype=np.int64),
                                np.frombuffer(answer_keys, dtype=np.int64)], 1), axis=0)
    questions, starts, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    for i in np.flatnonzero(counts > 1).tolist():
        answers = pairs[starts[i]:starts[i] + counts[i], 1]
        corpus.same_question[int(questions[i])] = frozenset(corpus.rows(answers.tolist()))
    return corpus


# --- encoding --------------------------------------------------------------------------------


def encode(model: EmbeddingModel, tokenize: Callable[[list[str]], Ragged], texts: list[str], batch_size: int,
           device: torch.device) -> torch.Tensor:
    """Unit-length float32 embeddings on ``device``, in the order given; texts of similar length
    share a batch. Unit length whatever the model's own ``normalize``: scores are inner products."""
    order = length_order(texts)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        embedded = embed_rows(model, tokenize, texts, order, batch_size, device)
    out = torch.empty_like(embedded)
    out[torch.as_tensor(order, dtype=torch.long, device=device)] = embedded
    return F.normalize(out, dim=-1)


def embed_corpus(corpus: Corpus, model: EmbeddingModel, collate: PairCollator, batch_size: int,
                 device: torch.device, store: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The corpus embeddings, written block by block into one preallocated tensor on ``store``."""
    embeddings = torch.empty(len(corpus), model.dim, dtype=dtype, device=store)
    block: list[str] = []
    done = 0
    with tqdm(total=len(corpus), desc="embed corpus", unit=" docs") as bar:
        for text in itertools.chain(corpus.iter_texts(), [None]):
            if text is not None:
                block.append(text)
                if len(block) < batch_size * ENCODE_BLOCK:
                    continue
            if block:
                embeddings[done:done + len(block)] = encode(model, collate.documents, block, batch_size,
                                                            device).to(store, dtype)
                done += len(block)
                bar.update(len(block))
                block = []
    corpus.embeddings = embeddings
    return embeddings
