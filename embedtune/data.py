"""Streaming Q&A records in a deterministic global order.

Files are read with ``datasets`` in streaming mode, one file at a time, so every record keeps its
file and line for error messages. The order of pairs depends only on (files, seed, epoch): the
files are shuffled per epoch, then a seeded buffer shuffle runs over the concatenated stream.
The stream is cut into global batches, each global batch into ``gradient_accumulation_steps``
micro-batches, and each micro-batch into one slice per process. DataLoader worker ``w`` builds
micro-batches ``u`` with ``u % num_workers == w``, which the DataLoader's round-robin hands back
in order, so neither the number of workers nor of processes changes what is trained on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import datasets
import torch
from torch.utils.data import IterableDataset, get_worker_info

from embedtune.config import DataConfig

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "embedtune:"
PREFLIGHT_RECORDS = 1000
READ_CHUNK = 1000
POSITIVE_LABEL = 0.5  # labelled pairs at or above this count as question and answer for evaluation
MAX_REJECTS_SHOWN = 5


class DataError(ValueError):
    """Bad input, named by file and line; the message tells the user what to change."""


@dataclass(frozen=True)
class Pair:
    id: str
    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    label: float | None = None
    source: str | None = None  # for metrics per source


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    reason: str
    raw: str

    def message(self) -> str:
        return f"{self.file}, line {self.line}: {self.reason}"


@dataclass
class Batch:
    """One process's slice of one micro-batch, still as text (tokenized by the collator)."""

    index: int  # micro-batch number in the epoch
    pairs: list[Pair]
    global_size: int  # pairs in the whole micro-batch across processes
    step_size: int  # pairs in the whole global batch (all micro-batches, all processes)
    rejects: list[Reject] = field(default_factory=list)
    stand_in: Pair | None = None  # a pair of the global batch, for a process whose slice is empty


# --- files -----------------------------------------------------------------------------------


def resolve_files(patterns: list[str]) -> list[str]:
    """Expand globs, packaged data (``embedtune:resources/...``) and URLs; refuse missing files."""
    files: list[str] = []
    for pattern in patterns:
        if pattern.startswith(PACKAGE_PREFIX):
            rel = pattern[len(PACKAGE_PREFIX):]
            path = resources.files("embedtune").joinpath(rel)
            if not path.is_file():
                raise DataError(f"{pattern}: no such file inside the embedtune package")
            files.append(str(path))
        elif "://" in pattern:
            files.append(pattern)  # fsspec URL; datasets reports if it cannot be opened
        elif any(ch in pattern for ch in "*?["):
            matched = sorted(glob.glob(pattern, recursive=True))
            if not matched:
                raise DataError(f"{pattern}: the pattern matches no file; check the path (cwd is {os.getcwd()})")
            files.extend(matched)
        else:
            if not os.path.isfile(pattern):
                raise DataError(f"{pattern}: file not found; check the path (cwd is {os.getcwd()})")
            if os.path.getsize(pattern) == 0:
                raise DataError(f"{pattern}: the file is empty; give it one JSON record per line")
            files.append(pattern)
    return files


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    return "json"


def _read_file(path: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, raw line or row dict) from one file, streamed."""
    # .iter() rather than plain iteration: inside a DataLoader worker, datasets would otherwise
    # hand each worker a share of the files, and our workers each need the whole ordered stream.
    if fmt == "json":
        # The text builder yields every line, blank ones included, so the count is the line
        # number; JSON is parsed here so a bad line is named rather than failing the file.
        stream = datasets.load_dataset(
            "text", data_files=[path], split="train", streaming=True, encoding_errors="replace"
        )
        number = 0
        for chunk in stream.iter(batch_size=READ_CHUNK):
            for line in chunk["text"]:
                number += 1
                yield number, line
    else:
        stream = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True)
        number = 1 if fmt == "csv" else 0  # CSV line 1 is the header
        chunks = stream.iter(batch_size=READ_CHUNK)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except Exception as exc:  # the parser's own error: name the file, keep its message
                raise DataError(f"{path}: cannot be read as {fmt} after row {number - (fmt == 'csv')}: "
                                f"{type(exc).__name__}: {exc}; fix the file or convert it to JSONL") from exc
            columns = list(chunk)
            for values in zip(*(chunk[c] for c in columns)):
                number += 1
                yield number, dict(zip(columns, values))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def parse_record(path: str, line: int, raw: Any, cfg: DataConfig) -> Pair | Reject | None:
    """A Pair, a Reject saying what to fix, or None for a blank JSONL line."""
    if isinstance(raw, str):
        if not raw.strip():
            return None
        if "\ufffd" in raw:
            return Reject(path, line, "not valid UTF-8; re-encode the file as UTF-8", raw)
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            return Reject(path, line, f"not valid JSON ({exc.msg} at column {exc.colno}); "
                          "write one JSON object per line", raw[:2000])
    else:
        record = raw
    shown = raw[:2000] if isinstance(raw, str) else json.dumps(raw, default=str)[:2000]
    if not isinstance(record, dict):
        return Reject(path, line, f"expected a JSON object, got {type(record).__name__}", shown)
    for role, name in (("query", cfg.query_field), ("positive", cfg.positive_field)):
        if name not in record:
            keys = ", ".join(sorted(record)[:10]) or "none"
            return Reject(path, line, f"no '{name}' field for the {role} (fields here: {keys}); "
                          f"add it or set data.{role}_field", shown)
        if _text(record[name]) is None:
            return Reject(path, line, f"'{name}' must be a non-empty string, got {record[name]!r:.60}", shown)
    negatives: tuple[str, ...] = ()
    if cfg.negatives_field and record.get(cfg.negatives_field) is not None:
        value = record[cfg.negatives_field]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or any(_text(v) is None for v in items):
            return Reject(path, line, f"'{cfg.negatives_field}' must be a string or a list of "
                          "non-empty strings", shown)
        negatives = tuple(items[: cfg.max_negatives])
    if cfg._require_negatives and not negatives:
        return Reject(path, line, f"the loss trains on triplets and this record has no hard negative in "
                      f"'{cfg.negatives_field}'; add one or choose a loss that trains on pairs", shown)
    label = None
    if cfg.label_field:
        value = record.get(cfg.label_field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return Reject(path, line, f"'{cfg.label_field}' must be a number (the pair's label or score), "
                          f"got {value!r:.60}", shown)
        label = float(value)
    source = record.get(cfg.source_field) if cfg.source_field else None
    return Pair(f"{path}:{line}", record[cfg.query_field], record[cfg.positive_field], negatives, label,
                None if source is None else str(source))


def read_pairs(files: list[str], cfg: DataConfig) -> Iterator[Pair | Reject]:
    for path in files:
        fmt = file_format(path, cfg.format)
        for line, raw in _read_file(path, fmt):
            item = parse_record(path, line, raw, cfg)
            if item is not None:
                yield item


# --- held-out split --------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def text_key(text: str) -> int:
    """A 63-bit hash of the normalized text: equal keys mean the same text (false negatives)."""
    return int.from_bytes(hashlib.sha1(_normalize(text).encode("utf-8")).digest()[:8], "big") >> 1


def is_held_out(pair: Pair, fraction: float) -> bool:
    """Stable per query text: duplicates of a question land on the same side, on any machine."""
    if fraction <= 0:
        return False
    digest = hashlib.sha1(_normalize(pair.query).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def eval_pairs(cfg: DataConfig) -> list[Pair]:
    """The held-out pairs: the eval files, or the hashed fraction carved off the train stream."""
    carved = not cfg.eval_files
    if carved and cfg.eval_fraction <= 0:
        return []
    files = resolve_files(cfg.train_files if carved else cfg.eval_files)
    seen: set[str] = set()
    pairs: list[Pair] = []
    for item in read_pairs(files, cfg):
        if isinstance(item, Reject) and not carved:  # carved rejects are the training stream's to report
            if cfg.on_bad_record == "error":
                raise DataError(format_stream_reject(item))
            logger.warning("held-out record skipped: %s", item.message())
        if not isinstance(item, Pair) or (carved and not is_held_out(item, cfg.eval_fraction)):
            continue
        if item.label is not None and item.label < POSITIVE_LABEL:
            continue  # a dissimilar pair is no question with its answer
        key = _normalize(item.query)
        if key not in seen:
            seen.add(key)
            pairs.append(item)
            if len(pairs) >= cfg.max_eval_queries:
                break
    return pairs


# --- checks before training ------------------------------------------------------------------


def preflight(cfg: DataConfig) -> list[Reject]:
    """Read the first records of every file so a broken file stops the run before any work."""
    rejects: list[Reject] = []
    for pattern_list in (cfg.train_files, cfg.eval_files):
        for path in resolve_files(pattern_list):
            good = bad = 0
            for count, item in enumerate(read_pairs([path], cfg)):
                if isinstance(item, Reject):
                    rejects.append(item)
                    bad += 1
                else:
                    good += 1
                if count + 1 >= PREFLIGHT_RECORDS:
                    break
            if good == 0 and not bad:
                raise DataError(f"{path}: no records found; give it one JSON record per line")
    if rejects and cfg.on_bad_record == "error":
        raise DataError(format_rejects(rejects))
    return rejects


def format_rejects(rejects: list[Reject]) -> str:
    lines = [f"{len(rejects)} bad record(s) in the first {PREFLIGHT_RECORDS} of each file:"]
    lines += [f"  {r.message()}" for r in rejects[:MAX_REJECTS_SHOWN]]
    if len(rejects) > MAX_REJECTS_SHOWN:
        lines.append(f"  ... and {len(rejects) - MAX_REJECTS_SHOWN} more")
    lines.append("Fix these records, or set data.on_bad_record=skip to skip them "
                 "(they are then kept in output_dir/rejected.jsonl).")
    return "\n".join(lines)


def count_train_pairs(cfg: DataConfig) -> int:
    """The training pairs of one epoch, counted exactly (parsed and split, not tokenized)."""
    carve = not cfg.eval_files
    return sum(1 for item in read_pairs(resolve_files(cfg.train_files), cfg)
               if isinstance(item, Pair) and not (carve and is_held_out(item, cfg.eval_fraction)))


# --- the ordered stream ----------------------------------------------------------------------


def _rng(seed: int, epoch: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{purpose}")


def ordered_pairs(cfg: DataConfig, seed: int, epoch: int) -> Iterator[Pair | Reject]:
    """All training pairs of one epoch in their global order; rejects pass straight through."""
    files = resolve_files(cfg.train_files)
    carve = not cfg.eval_files
    if cfg.shuffle:
        _rng(seed, epoch, "files").shuffle(files)
    source = read_pairs(files, cfg)
    if not cfg.shuffle:
        for item in source:
            if isinstance(item, Reject) or not (carve and is_held_out(item, cfg.eval_fraction)):
                yield item
        return
    rng = _rng(seed, epoch, "buffer")
    buffer: list[Pair] = []
    for item in source:
        if isinstance(item, Reject):
            yield item
            continue
        if carve and is_held_out(item, cfg.eval_fraction):
            continue
        if len(buffer) < cfg.shuffle_buffer:
            buffer.append(item)
            continue
        slot = rng.randrange(len(buffer))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def micro_batch_sizes(size: int, accumulation: int) -> list[int]:
    """Split a global batch into equal micro-batches (sizes differ by at most one)."""
    base, extra = divmod(size, accumulation)
    return [base + (i < extra) for i in range(accumulation)]


def process_slice(size: int, num_processes: int, rank: int) -> slice:
    base, extra = divmod(size, num_processes)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class PairBatches(IterableDataset):
    """Yields this process's slice of each micro-batch, tokenized by ``collate`` in the worker.

    ``set_position(epoch, done)`` starts the epoch after its first ``done`` global batches: the
    records before are read again (the order must be rebuilt) but not tokenized.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, accumulation: int, seed: int,
                 collate: Any, num_processes: int = 1, rank: int = 0, all_ids: bool = False) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.collate = collate
        self.num_processes = num_processes
        self.rank = rank
        self.all_ids = all_ids
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, done: int) -> None:
        self.epoch, self.skip = epoch, done

    def global_batches(self) -> Iterator[tuple[list[Pair], list[Reject]]]:
        """The epoch's global batches with the bad records met while filling each."""
        pending: list[Pair] = []
        rejects: list[Reject] = []
        for item in ordered_pairs(self.cfg, self.seed, self.epoch):
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                yield pending, rejects
                pending, rejects = [], []
        # The last, partial global batch is used whatever the number of processes (a process
        # whose slice is empty still takes part in the step), unless drop_last says otherwise.
        if pending and not self.cfg.drop_last:
            yield pending, rejects
            return
        if pending:
            logger.info("dropped the last %d pairs of epoch %d (a partial global batch)", len(pending), self.epoch)
        if rejects:
            yield [], rejects

    def micro_batches(self) -> Iterator[Batch]:
        """Every micro-batch of the epoch from the start position (all processes), as text."""
        index = 0
        for number, (pairs, rejects) in enumerate(self.global_batches()):
            if number < self.skip:
                continue
            start = 0
            for part, size in enumerate(micro_batch_sizes(len(pairs), self.accumulation) if pairs else [0]):
                yield Batch(index, pairs[start:start + size], size, len(pairs), rejects if part == 0 else [],
                            pairs[0] if pairs else None)
                index += 1
                start += size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for batch in self.micro_batches():
            if batch.index % workers != worker:
                continue
            mine = batch.pairs[process_slice(len(batch.pairs), self.num_processes, self.rank)]
            if mine or batch.stand_in is None:
                out = self.collate(mine) if mine else {}
            else:
                # Nothing for this process in this micro-batch (a small last batch): it still runs
                # the step, on a stand-in pair whose loss weighs nothing, so collectives match.
                out = {**self.collate([batch.stand_in]), "empty": True}
            out["index"] = batch.index
            out["global_size"] = batch.global_size
            out["step_size"] = batch.step_size
            out["ids"] = [p.id for p in mine]
            if self.all_ids:
                out["all_ids"] = [p.id for p in batch.pairs]
            # Every process sees the rejects (so all stop together under on_bad_record=error);
            # only the main process writes them.
            out["rejects"] = list(batch.rejects)
            yield out


def format_stream_reject(reject: Reject) -> str:
    return (f"bad record: {reject.message()}\nFix it, or set data.on_bad_record=skip to skip "
            "bad records (they are then kept in output_dir/rejected.jsonl).")


def _worker_init(worker_id: int) -> None:
    # A preemption signal goes to every process of the job; the workers leave it to the main
    # process, which finishes its step, saves and then shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def auto_workers(num_workers: int | None) -> int:
    """``data.num_workers``, or when unset: the cores left after one per training process on this
    machine, shared among those processes, between 1 and 8 each."""
    if num_workers is not None:
        return num_workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // local - 1))


def make_loader(dataset: PairBatches, num_workers: int | None, pin_memory: bool) -> torch.utils.data.DataLoader:
    num_workers = auto_workers(num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole, already collated micro-batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        # Its own generator: starting an iterator would otherwise draw from the global torch RNG,
        # and a resumed run (which starts one mid-epoch) would get other dropout masks.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_worker_init,
    )
