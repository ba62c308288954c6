"""Hard-negative mining: ``embedtune mine`` gives every Q&A record the documents that the model
ranks closest to its question without being its answer.

The corpus is the distinct answers of the input (distinct by normalized text, ``text_key``) plus
any extra documents. Two passes over the input keep memory bounded: the first reads every record
(a bad one stops the run here, before any encoding) and spools the documents' texts to a file on
disk; the corpus is then embedded in batches into one preallocated (documents x dim) tensor,
which is all that stays in memory besides a few integers per document. The second pass streams
the questions in chunks, searches each chunk against the corpus chunk by chunk with a running
top-k (the full score matrix is never built), and writes the records out as it goes.

Guards against false negatives: a question's own answer and every document with the same
normalized text never count, nor do the answers of other records with the same question;
``skip_top`` passes over the closest remaining candidates, and a margin keeps only candidates
scored clearly below the answer. Candidates are taken in rank order (ties by corpus row), so the
FAISS and torch searches pick the same negatives up to ties in score.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
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
    file_format,
    line_problem,
    read_file,
    read_records,
    resolve_files,
    text_key,
)
from embedtune.data.split import is_held_out
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import read_model_folder, resolve_model_path
from embedtune.model.packing import Ragged
from embedtune.retrieval import embed_rows, length_order

if sys.platform != "win32":
    import resource  # for the peak memory in the log; Windows has no such module

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SCORE_BUDGET = 1 << 25  # query x document scores held at once (128 MiB in float32)
ENCODE_BLOCK = 32  # batches of documents read and length-sorted together
GROWTH = 8  # how much deeper a search goes when the margin left a question short


class MineError(ValueError):
    """A mining run that cannot start (bad options, output over an input); the message says why."""


# --- choosing negatives from ranked candidates -----------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which candidates become negatives once a question's own answers are left out."""

    num_negatives: int = 5
    skip_top: int = 0
    margin: float | None = None  # keep scores below positive - margin
    relative_margin: float | None = None  # keep scores below positive * (1 - relative_margin)
    max_candidates: int = 1000  # how deep a search may go to find survivors of the margin

    def threshold(self, positive_score: float) -> float:
        if self.margin is not None:
            return positive_score - self.margin
        if self.relative_margin is not None:
            return positive_score * (1 - self.relative_margin)
        return math.inf


def pick(ids: Sequence[int], scores: Sequence[float], excluded: set[int] | frozenset[int], threshold: float,
         selection: Selection) -> list[int]:
    """One question's negatives from its candidates, best first.

    The skip counts ranks among the candidates that are not the question's own answers, before
    the margin: it passes over the closest documents whatever their score.
    """
    chosen: list[int] = []
    skipped = 0
    for row, score in zip(ids, scores):
        if row < 0 or row in excluded:
            continue
        if skipped < selection.skip_top:
            skipped += 1
            continue
        if score < threshold:
            chosen.append(row)
            if len(chosen) == selection.num_negatives:
                break
    return chosen


# --- search ----------------------------------------------------------------------------------


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(name: str, device: torch.device) -> str:
    """auto: FAISS when installed and the search runs on the CPU; torch otherwise (and on a GPU)."""
    if name == "faiss" and not faiss_available():
        raise MineError("--backend faiss: faiss is not installed (pip install faiss-cpu), or use --backend torch")
    if name == "auto":
        return "faiss" if device.type == "cpu" and faiss_available() else "torch"
    return name


def _order(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best first, equal scores by corpus row: the same order whichever search found them."""
    ids, by_id = ids.sort(dim=1, stable=True)
    scores = scores.gather(1, by_id)
    scores, by_score = scores.sort(dim=1, descending=True, stable=True)
    return scores, ids.gather(1, by_score)


def search(queries: torch.Tensor, corpus: torch.Tensor, k: int, corpus_chunk: int,
           backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` corpus rows with the highest inner product per query, best first: (scores, rows).

    The corpus is scored ``corpus_chunk`` rows at a time and merged into a running top-k, so at
    most (queries x corpus_chunk) scores exist at once. Queries are float32 on the corpus' device.
    Equal scores come out by corpus row; which of several equal scores make the cut at the k-th
    place is up to the search.
    """
    k = min(k, len(corpus))
    best_scores = torch.empty(len(queries), 0, device=queries.device)
    best_ids = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    if k == 0 or not len(queries):
        return best_scores, best_ids
    for start in range(0, len(corpus), corpus_chunk):
        block = corpus[start:start + corpus_chunk].to(torch.float32)  # a view when already float32
        take = min(k, len(block))
        if backend == "faiss":
            import faiss

            found, rows = faiss.knn(queries.contiguous().numpy(), block.contiguous().numpy(), take,
                                    metric=faiss.METRIC_INNER_PRODUCT)
            scores, ids = torch.from_numpy(found), torch.from_numpy(rows).long()
        else:
            scores, ids = (queries @ block.T).topk(take, dim=1)
        ids = ids + start
        if best_ids.shape[1]:
            scores, ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1)
            scores, keep = scores.topk(min(k, scores.shape[1]), dim=1)
            ids = ids.gather(1, keep)
        best_scores, best_ids = scores, ids
    return _order(best_scores, best_ids)


def choose_negatives(queries: torch.Tensor, corpus: torch.Tensor, positive_rows: Sequence[int],
                     excluded: Sequence[set[int] | frozenset[int]], selection: Selection, corpus_chunk: int,
                     backend: str = "torch") -> tuple[list[list[int]], list[float]]:
    """Each query's negatives (corpus rows, best first) and its positive's score.

    The first search fetches just enough candidates for the skip and the excluded rows. When a
    margin leaves a question short, its search goes deeper (up to ``max_candidates``), so the
    negatives are those of a full ranking rather than whatever a shallow pool had left.
    """
    rows = torch.as_tensor(list(positive_rows), dtype=torch.long, device=corpus.device)
    positive = (queries * corpus[rows].to(torch.float32)).sum(-1).tolist() if len(rows) else []
    thresholds = [selection.threshold(s) for s in positive]
    chosen: list[list[int]] = [[] for _ in range(len(queries))]
    todo = list(range(len(queries)))
    if not todo:
        return chosen, positive
    needed = selection.num_negatives + selection.skip_top + max(len(e) for e in excluded)
    depth, deepest = needed, max(needed, selection.max_candidates)
    while todo:
        depth = min(depth, deepest, len(corpus))
        index = torch.as_tensor(todo, device=queries.device)
        scores, ids = search(queries[index], corpus, depth, corpus_chunk, backend)
        short = []
        for q, q_scores, q_ids in zip(todo, scores.tolist(), ids.tolist()):
            chosen[q] = pick(q_ids, q_scores, excluded[q], thresholds[q], selection)
            if len(chosen[q]) < selection.num_negatives and depth < min(deepest, len(corpus)):
                short.append(q)
        todo, depth = short, depth * GROWTH
    return chosen, positive


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
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Reject(path, line, f"not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object "
                      "per line", raw[:SHOWN])
    if not isinstance(record, dict):
        return Reject(path, line, f"expected a JSON object, got {type(record).__name__}", raw[:SHOWN])
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


# --- settings from the model folder ----------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    query_prefix: str = ""
    document_prefix: str = ""
    max_seq_length: int | None = None


def model_defaults(name: str) -> ModelDefaults:
    """Prompts and max length that a model folder was saved with (embedtune saves the training
    prefixes as the sentence-transformers ``query`` and ``document`` prompts)."""
    folder = read_model_folder(name)
    return ModelDefaults(folder.query_prompt, folder.document_prompt, folder.max_seq_length)


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MineOptions:
    """What a mining run is asked for; ``embedtune mine`` builds it from its flags."""

    model: str
    input: str
    output: str
    corpus: tuple[str, ...] = ()  # files of extra documents
    selection: Selection = field(default_factory=Selection)
    held_out: float = 0.0  # training's data.eval_fraction
    batch_size: int = 64  # texts per forward pass
    chunk_size: int = 4096  # questions read, encoded and searched at once
    corpus_chunk_size: int | None = None  # documents scored at once; None: SCORE_BUDGET scores per chunk
    query_max_length: int | None = None  # None: DataConfig's, capped by the model's max length
    document_max_length: int | None = None
    query_prefix: str | None = None  # None: the model folder's prompt
    document_prefix: str | None = None
    query_field: str = "question"
    positive_field: str = "answer"
    negatives_field: str = "negatives"  # written, replaced where present
    backend: str = "auto"  # auto, faiss or torch
    dtype: str = "float16"  # how the corpus embeddings are held: float16 or float32

    @property
    def data(self) -> DataConfig:
        # Negatives already in the input are not read (they are replaced), so they cannot reject a record.
        return DataConfig(query_field=self.query_field, positive_field=self.positive_field)

    @property
    def corpus_chunk(self) -> int:
        return self.corpus_chunk_size or max(1024, SCORE_BUDGET // self.chunk_size)


@dataclass(frozen=True)
class Setup:
    """The model side of a run, and where the search runs."""

    model: EmbeddingModel
    collate: PairCollator
    device: torch.device  # where the model runs
    backend: str  # faiss or torch
    store: torch.device  # where the corpus embeddings are held: the CPU for FAISS
    dtype: torch.dtype  # of the corpus embeddings


@dataclass
class Summary:
    records: int = 0
    corpus: int = 0
    answers: int = 0
    negatives: int = 0
    short_margin: int = 0  # fewer than asked: the margin (within max_candidates) left too few
    short_corpus: int = 0  # fewer than asked: the corpus has too few other documents
    replaced: int = 0  # records whose negatives field was there already
    held_out: int = 0  # records passed through without negatives (--held-out)
    seconds: float = 0.0

    def count(self, got: int, asked: int, available: int) -> None:
        """One record's negatives; ``available``: the documents that could have been its negatives."""
        self.negatives += got
        if got < asked:
            if available < asked and got == max(available, 0):
                self.short_corpus += 1
            else:
                self.short_margin += 1

    def lines(self, asked: int, output: str) -> list[str]:
        mean = self.negatives / max(self.records, 1)
        rate = self.records / max(self.seconds, 1e-9)
        lines = [f"mined {self.records} records against {self.corpus} documents ({self.answers} answers, "
                 f"{self.corpus - self.answers} extra) in {self.seconds:.1f} s ({rate:.1f} records/s)",
                 f"negatives per record: {mean:.2f} on average ({asked} asked)"]
        short = self.short_margin + self.short_corpus
        if short:
            lines.append(f"{short} records got fewer than {asked}: {self.short_margin} because of the margin, "
                         f"{self.short_corpus} because the corpus has too few other documents")
        if self.held_out:
            lines.append(f"{self.held_out} held-out records passed through without negatives")
        if self.replaced:
            lines.append(f"{self.replaced} records had negatives already; they were replaced")
        lines.append(f"wrote {output}")
        return lines


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Line breaks to str.splitlines, which JSON leaves unescaped: escaped, so any reader sees one line.
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, default=str).translate(LINE_BREAKS)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate from a \ud8xx escape: keep the escapes
        return json.dumps(record, default=str).encode("ascii") + b"\n"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_options(options: MineOptions) -> tuple[list[str], list[str]]:
    """The input files and the extra documents' files, or a MineError for options that would
    overwrite an input or a record's question or answer."""
    inputs = resolve_files([options.input])
    extra = resolve_files(list(options.corpus))
    for path in inputs + extra:
        if "://" not in path and _same_file(path, options.output):
            raise MineError(f"--output {options.output} is an input file; write the mined records elsewhere")
    if options.negatives_field in (options.query_field, options.positive_field):
        raise MineError(f"--negatives-field {options.negatives_field!r} would overwrite the question or the answer")
    return inputs, extra


def load_model(options: MineOptions) -> Setup:
    """The model in eval mode on its device, with its folder's prompts and max length where the
    options give none; the search backend is checked before the model loads."""
    model_path = resolve_model_path(options.model)
    defaults = model_defaults(model_path)
    cap = defaults.max_seq_length or 1 << 30
    query_prefix = defaults.query_prefix if options.query_prefix is None else options.query_prefix
    document_prefix = defaults.document_prefix if options.document_prefix is None else options.document_prefix
    query_max = options.query_max_length or min(DataConfig().query_max_length, cap)
    document_max = options.document_max_length or min(DataConfig().document_max_length, cap)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = choose_backend(options.backend, device)
    store = torch.device("cpu") if backend == "faiss" else device
    dtype = {"float16": torch.float16, "float32": torch.float32}[options.dtype]

    model, tokenizer = EmbeddingModel.from_pretrained(model_path)
    model.to(device).eval()
    collate = PairCollator(tokenizer, query_max, document_max, query_prefix, document_prefix)
    logger.info("model %s on %s, %s search; prefixes %r / %r, max length %d / %d", options.model, device, backend,
                query_prefix, document_prefix, query_max, document_max)
    return Setup(model, collate, device, backend, store, dtype)


def prepare_corpus(inputs: list[str], extra: list[str], spool: IO[bytes], options: MineOptions, setup: Setup,
                   started: float) -> tuple[Corpus, torch.Tensor]:
    """The first pass over the input, then the corpus embeddings (``started``: when the run began)."""
    corpus = gather_corpus(inputs, extra, options.data, spool, options.held_out)
    logger.info("%d records, corpus of %d documents (%d answers, %d extra), read in %.1f s", corpus.records,
                len(corpus), corpus.answers, len(corpus) - corpus.answers, time.perf_counter() - started)
    phase = time.perf_counter()
    embeddings = embed_corpus(corpus, setup.model, setup.collate, options.batch_size, setup.device, setup.store,
                              setup.dtype)
    logger.info("corpus embedded in %.1f s (%.0f documents/s), %.0f MiB of %s embeddings",
                time.perf_counter() - phase, len(corpus) / max(time.perf_counter() - phase, 1e-9),
                embeddings.numel() * embeddings.element_size() / 2**20, options.dtype)
    return corpus, embeddings


def mine_chunk(chunk: list[tuple[dict[str, Any], Pair]], corpus: Corpus, embeddings: torch.Tensor, setup: Setup,
               options: MineOptions, summary: Summary) -> None:
    """Give every record of ``chunk`` its negatives, in place, and count them in ``summary``."""
    field_name, selection = options.negatives_field, options.selection
    kept = []
    for record, pair in chunk:
        summary.replaced += field_name in record
        if is_held_out(pair, options.held_out):
            # Held-out records pass through without negatives: evaluation never sees mining.
            record[field_name] = []
            summary.held_out += 1
        else:
            kept.append((record, pair))
    pairs = [pair for _, pair in kept]
    chosen: list[list[int]] = []
    excluded: list[frozenset[int]] = []
    if pairs:
        queries = encode(setup.model, setup.collate.queries, [p.query for p in pairs], options.batch_size,
                         setup.device)
        positive_rows = corpus.rows([text_key(p.positive) for p in pairs])
        excluded = [corpus.excluded(text_key(p.query), row) for p, row in zip(pairs, positive_rows)]
        chosen, _ = choose_negatives(queries.to(setup.store), embeddings, positive_rows, excluded, selection,
                                     options.corpus_chunk, setup.backend)
    texts = corpus.texts([row for rows in chosen for row in rows])
    for (record, _), rows, skip in zip(kept, chosen, excluded):
        record[field_name] = [texts[row] for row in rows]
        summary.count(len(rows), selection.num_negatives, len(corpus) - len(skip) - selection.skip_top)
    summary.records += len(kept)


def write_mined(inputs: list[str], corpus: Corpus, embeddings: torch.Tensor, setup: Setup, options: MineOptions,
                summary: Summary) -> None:
    """The second pass: the input in chunks, each record written out with its negatives, in order.

    Written beside the output and renamed over it at the end: a failed run leaves no half file.
    """
    folder = os.path.dirname(os.path.abspath(options.output))
    temp = os.path.join(folder, f".{os.path.basename(options.output)}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as out, tqdm(total=corpus.records, desc="mine", unit=" records") as bar:
            for chunk in _chunks(read_input(inputs, options.data), options.chunk_size):
                mine_chunk(chunk, corpus, embeddings, setup, options, summary)
                for record, _ in chunk:
                    out.write(_json_line(record))
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, options.output)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def log_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        logger.info("peak GPU memory %.0f MiB", torch.cuda.max_memory_allocated() / 2**20)
    if sys.platform != "win32":
        logger.info("peak memory (RSS) %.0f MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def mine(options: MineOptions) -> Summary:
    """Mine negatives for every record of ``options.input`` and write them to ``options.output``."""
    started = time.perf_counter()
    inputs, extra = check_options(options)
    setup = load_model(options)
    folder = os.path.dirname(os.path.abspath(options.output))
    os.makedirs(folder, exist_ok=True)
    summary = Summary()
    with tempfile.TemporaryFile(dir=folder, prefix=".mine-spool-") as spool:
        corpus, embeddings = prepare_corpus(inputs, extra, spool, options, setup, started)
        summary.corpus, summary.answers = len(corpus), corpus.answers
        phase = time.perf_counter()
        write_mined(inputs, corpus, embeddings, setup, options, summary)
    summary.seconds = time.perf_counter() - started
    logger.info("questions encoded, searched and written in %.1f s", time.perf_counter() - phase)
    log_peak_memory(setup.device)
    return summary
