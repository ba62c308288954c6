"""An index of the training files, so that any position of an epoch can be read without the rest.

With ``data.order: indexed`` the files are cut into blocks: ``data.block_records`` lines of an
uncompressed JSONL file (found by their byte offsets), a row group of a Parquet file, or a whole
compressed file (which cannot be entered in the middle). One pass over each file, once, learns
each block's place, how many of its records are training pairs and which (a bit per record: bad
records and held-out pairs are not), where each training pair's line lies (JSONL), and the bad
records themselves. The index of each file is
kept in ``data.index_dir`` (by default ``output_dir/data_index``), under a name made from the
file's path, size and modification time and the settings that decide what a training pair is, so
a later run or a resumed one reads no record before its first step, and a changed file is indexed
again.

``EpochOrder`` is the order of one epoch over that index: the blocks in a seeded random order,
taken in windows of at least ``data.shuffle_buffer`` training pairs, the pairs of each window in a
seeded random order. Position ``p`` of the epoch maps to a block and a record in constant time
(plus a shuffle of one window), whatever came before it, so a reader reads and parses only its
own pairs (the lines of a JSONL file where the index places them; a compressed file or a Parquet
row group from the machine's ``data.block_cache``, where it is decompressed or decoded once), and
a resumed run starts where it stopped without reading what came before. The order depends on
(data, seed, epoch) only.
"""

from __future__ import annotations

import array
import bisect
import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

import fsspec

from embedtune.config import Config, DataConfig
from embedtune.data.records import (
    DataError,
    Pair,
    Reject,
    _compression_suffix,
    _open_binary,
    _read_lines,
    decoded_line,
    document_tokens,
    file_format,
    file_origin,
    pair_key,
    parse_record,
    text_key,
    trains_on,
)

logger = logging.getLogger(__name__)

INDEX_VERSION = 6
# The order's own version: 1 shuffled each window with Python's random (checkpoints that do not say
# which resume with it), 2 with NumPy's legacy generator, 50 times faster: every reader shuffles
# every window.
INDEXED_ORDER = 2
INDEX_FOLDER = "data_index"  # in output_dir, unless data.index_dir says where
# The settings that decide which records are training pairs, and so what an index holds.
PAIR_SETTINGS = ("format", "query_field", "positive_field", "negatives_field", "label_field", "source_field",
                 "prompt_field", "max_negatives", "max_negatives_per_record", "max_record_bytes", "eval_fraction",
                 "block_records")
REJECTS_KEPT = 10_000  # bad records an index keeps per file (the count is always exact)
READ_RETRIES = 5  # a block read that fails is tried this many times more
READ_BACKOFF_S = 1.0  # before the first retry; doubled before each next one
MAX_SOURCES = 65535  # source codes are two bytes
# What a reader keeps of what it has worked out, at most, so that its memory does not grow with the data.
PAYLOAD_BYTES_KEPT = 8 << 20  # blocks' payloads
OFFSET_BYTES_KEPT = 8 << 20  # blocks' training pairs' record numbers
LAYOUT_BYTES_KEPT = 16 << 20  # windows' orders
CACHE_WAIT_S = 300  # how long a reader waits for another to fetch what both need, before fetching it too
READ_CHUNK_BYTES = 8 << 20  # bytes copied at a time into the block cache
RANGE_GAP_BYTES = 4 << 10  # a reader reads two lines in one read when no more than this lies between them


@dataclass(slots=True)
class Block:
    """Records of one file that are read together. Which of them are training pairs, and their
    lengths, are its payload: ``DataIndex.payload`` reads it when needed."""

    file: int  # its file, by position in the index's list
    start: int  # JSONL: byte offset of its first line; Parquet: row group number; compressed: 0
    stop: int  # JSONL: byte offset past its last line; -1: to the end of the file
    first: int  # line (or row) number of its first record
    lines: int  # records (lines or rows) in it
    count: int  # training pairs in it
    payload: int  # where its payload starts in its file's: a bit per record (set: a training pair),
    # then a byte per training pair, its document length as ``length_code`` (data.group_by_length),
    # then two bytes per training pair, its source's code (0: none; else a name of its file's ``sources``)
    sources: list[list[int]]  # [code, training pairs] per source code in it
    span: int = 0  # JSONL: its bytes (decompressed), whose places its training pairs' lines have in the
    # payload, after the rest: their offsets from its start (4 bytes each, 8 from 4 GiB), then their sizes
    # (4 bytes each, the newline included); Parquet: 0, and no places

    def offset_width(self) -> int:
        return 4 if self.span < 1 << 32 else 8

    def payload_size(self, keys: bool, ranged: bool) -> int:
        places = self.offset_width() + 4 if ranged else 0
        return (self.lines + 7) // 8 + ((19 if keys else 3) + places) * self.count


class Payload(NamedTuple):
    """What the index holds of a block's records (see ``Block``)."""

    bits: bytes  # a bit per record: a training pair or not
    lengths: bytes  # a length code per training pair
    codes: array.array  # a source code per training pair
    keys: array.array | None  # each training pair's answer key and pair key, one after the other
    starts: array.array | None  # JSONL: each training pair's line, as its byte offset from the block's start
    sizes: array.array | None  # and its size in bytes


@dataclass
class FileIndex:
    path: str
    fmt: str
    blocks: list[Block]
    rejects: list[Reject]
    bad: int  # bad records in the file (all of them, even past REJECTS_KEPT)
    sources: list[str] = field(default_factory=list)  # the source names its records give; code i + 1 is sources[i]
    keys: bool = False  # whether the payloads hold each pair's answer key and pair key (for in-batch mining)
    stamp: str = ""  # the file's size and modification time when it was indexed
    payload: bytes | None = None  # the blocks' payloads, when held in memory
    payload_file: str | None = None  # else where they are kept

    def to_json(self) -> dict[str, Any]:
        """Everything but the payload."""
        return {"version": INDEX_VERSION, "path": self.path, "format": self.fmt, "bad": self.bad,
                "sources": self.sources, "keys": self.keys, "stamp": self.stamp,
                "blocks": [[b.start, b.stop, b.first, b.lines, b.count, b.payload, b.sources, b.span]
                           for b in self.blocks],
                "rejects": [[r.file, r.line, r.reason, r.raw] for r in self.rejects]}

    @classmethod
    def from_json(cls, data: dict[str, Any], file: int, payload: bytes | None, payload_file: str | None) -> FileIndex:
        blocks = [Block(file, *values) for values in data["blocks"]]
        return cls(data["path"], data["format"], blocks, [Reject(*r) for r in data["rejects"]], data["bad"],
                   data["sources"], data["keys"], data["stamp"], payload, payload_file)

    def source(self, code: int) -> str | None:
        return self.sources[code - 1] if code else None


class DataIndex:
    """Every training file's blocks; ``blocks`` lists them all in file order. The blocks' payloads
    stay in the index's files and are read as needed (the last ``PAYLOAD_BYTES_KEPT`` kept), so a
    reader's memory does not grow with the data."""

    def __init__(self, files: list[FileIndex], built: int = 0) -> None:
        self.files = files
        self.blocks = [b for f in files for b in f.blocks]
        self.built = built  # files indexed by this call (the others came from the cache)
        self._payloads = Kept(PAYLOAD_BYTES_KEPT)

    def __getstate__(self) -> dict[str, Any]:  # for DataLoader workers started by spawn
        return {"files": self.files, "built": self.built}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"], state["built"])  # type: ignore[misc]

    @property
    def total(self) -> int:
        """Training pairs in an epoch."""
        return sum(b.count for b in self.blocks)

    @property
    def rejects(self) -> list[Reject]:
        return [r for f in self.files for r in f.rejects]

    @property
    def bad(self) -> int:
        return sum(f.bad for f in self.files)

    def sizes(self) -> dict[str | None, int]:
        """Each source's training pairs (by the name its records give; None: none given)."""
        sizes: dict[str | None, int] = {}
        for b in self.blocks:
            for code, n in b.sources:
                name = self.files[b.file].source(code)
                sizes[name] = sizes.get(name, 0) + n
        return sizes

    def payload(self, block: int) -> Payload:
        """What the index holds of ``block``'s records."""
        found = self._payloads.get(block)
        if found is not None:
            return found
        b = self.blocks[block]
        file = self.files[b.file]
        ranged = file.fmt == "json"
        size = b.payload_size(file.keys, ranged)
        if file.payload is not None:
            data = file.payload[b.payload:b.payload + size]
        else:
            with open(file.payload_file, "rb") as f:  # type: ignore[arg-type]
                f.seek(b.payload)
                data = f.read(size)
            if len(data) != size:
                raise DataError(f"{file.payload_file}: the index of {file.path} is cut short; delete it to index the "
                                "file again")
        head, n = (b.lines + 7) // 8, b.count
        arrays: list[array.array | None] = []
        at = head + 3 * n
        wide = b.offset_width() == 8
        for typecode, each, wanted in (("q", 16, file.keys), ("Q" if wide else "I", 8 if wide else 4, ranged),
                                       ("I", 4, ranged)):  # bytes per training pair
            values = array.array(typecode, data[at:at + each * n]) if wanted else None
            at += each * n if wanted else 0
            arrays.append(values)
        codes = array.array("H", data[head + n:head + 3 * n])
        if sys.byteorder != "little":
            for values in (codes, *arrays):
                if values is not None:
                    values.byteswap()
        found = Payload(data[:head], data[head:head + n], codes, *arrays)
        self._payloads.put(block, found, len(data))
        return found

    def offsets(self, block: int) -> array.array:
        """The training pairs' record numbers within ``block``, in order."""
        bits = self.payload(block).bits
        return array.array("I", (i for i in range(self.blocks[block].lines) if bits[i >> 3] >> (i & 7) & 1))


def index_place(cfg: Config) -> tuple[str, bool]:
    """Where a run keeps its files' indexes (``data.index_dir``, or ``output_dir/data_index``), and
    whether they hold the pairs' keys (in-batch mining groups by them)."""
    hard = cfg.train.hard_negatives
    return cfg.data.index_dir or os.path.join(cfg.output_dir, INDEX_FOLDER), bool(hard and hard.in_batch)


def settings_key(cfg: DataConfig, require_negatives: bool, keys: bool = False) -> dict[str, Any]:
    settings = {name: getattr(cfg, name) for name in PAIR_SETTINGS}
    settings["keys"] = keys
    # Held-out pairs are carved off only when there are no eval files.
    settings["eval_fraction"] = 0.0 if cfg.eval_files else cfg.eval_fraction
    settings["require_negatives"] = require_negatives
    if cfg.scores_field:  # (only then: the indexes of runs without teacher scores keep their keys)
        settings["scores_field"] = cfg.scores_field
    return settings


def _stamp(path: str) -> dict[str, Any]:
    """What says a file is the one indexed: its size and modification time (or its ETag)."""
    try:
        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from exc
    changed = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "created")
                    if info.get(k) is not None), None)
    return {"size": info.get("size"), "changed": str(changed)}


def _cache_name(path: str, settings: dict[str, Any]) -> str:
    key = json.dumps({"version": INDEX_VERSION, "path": path, "file": _stamp(path), "settings": settings},
                     sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest() + ".json"


def length_code(tokens: int) -> int:
    """A document length in one byte: 16 steps per doubling (about 4% apart), for sorting by length."""
    return min(255, round(16 * math.log2(1 + tokens)))


class Kept:
    """The most recently used values, up to ``limit`` bytes (as their owners count them; the last
    one is kept whatever its size). Safe to share between a reading thread and its owner."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            found = self.items.get(key)
            if found is None:
                return None
            self.items.move_to_end(key)
            return found[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        with self.lock:
            if key in self.items:
                return
            self.items[key] = (value, size)
            self.size += size
            while self.size > self.limit and len(self.items) > 1:
                _, (_, dropped) = self.items.popitem(last=False)
                self.size -= dropped


class _Bits:
    """A file's blocks and their payload, as it is read."""

    def __init__(self, keys: bool, ranged: bool) -> None:
        self.payload = bytearray()
        self.blocks: list[Block] = []
        self.names: dict[str, int] = {}  # source name -> code
        self.with_keys, self.ranged = keys, ranged
        self._new()

    def _new(self) -> None:
        self.bits, self.lengths, self.lines, self.count = bytearray(), bytearray(), 0, 0
        self.codes = array.array("H")
        self.keys = array.array("q")
        self.starts, self.sizes = array.array("Q"), array.array("I")

    def add(self, pair: Pair | None, start: int = 0, size: int = 0) -> None:
        """The next record: a training pair or None; for JSONL its line's offset from the block's
        start and its size."""
        if self.lines % 8 == 0:
            self.bits.append(0)
        if pair is not None:
            self.bits[-1] |= 1 << (self.lines % 8)
            self.lengths.append(length_code(document_tokens(pair)))
            code = 0
            if pair.source is not None:
                code = self.names.setdefault(pair.source, len(self.names) + 1)
                if code > MAX_SOURCES:
                    raise DataError(f"more than {MAX_SOURCES:,} sources in one file (data.source_field); a source "
                                    "names a kind of text, not a record")
            self.codes.append(code)
            if self.with_keys:
                self.keys.extend((text_key(pair.positive), pair_key(pair.query, pair.positive)))
            if self.ranged:
                self.starts.append(start)
                self.sizes.append(size)  # a training pair's line is at most max_record_bytes (< 4 GiB)
            self.count += 1
        self.lines += 1

    def cut(self, start: int, stop: int, first: int, span: int = 0) -> None:
        """The records added since the last cut make a block."""
        counts: dict[int, int] = {}
        for code in self.codes:
            counts[code] = counts.get(code, 0) + 1
        block = Block(0, start, stop, first, self.lines, self.count, len(self.payload),
                      [[c, n] for c, n in sorted(counts.items())], span)
        self.blocks.append(block)
        parts = [self.codes, self.keys]
        if self.ranged:
            parts += [self.starts if block.offset_width() == 8 else array.array("I", self.starts), self.sizes]
        if sys.byteorder != "little":
            for values in parts:
                values.byteswap()
        self.payload += self.bits + self.lengths + b"".join(values.tobytes() for values in parts)
        self._new()


def index_file(path: str, cfg: DataConfig, require_negatives: bool = False, keys: bool = False) -> FileIndex:
    """One file's blocks, read once (see the module's docstring)."""
    fmt = file_format(path, cfg.format)
    rejects: list[Reject] = []
    bad = 0

    def judge(item: Pair | Reject | None) -> Pair | None:
        """The training pair, or None."""
        nonlocal bad
        if isinstance(item, Reject):
            bad += 1
            if len(rejects) < REJECTS_KEPT:
                rejects.append(item)
            return None
        return item if item is not None and trains_on(item, cfg) else None

    bits = _Bits(keys, ranged=fmt == "json")
    origin = file_origin(path, cfg)
    if fmt == "json":
        whole = bool(_compression_suffix(path))
        start, first, end = 0, 1, 0  # the block's first byte and line; the end of the last line read
        for number, line, stop in _read_lines(path, cfg.max_record_bytes):
            bits.add(judge(parse_record(path, number, line, cfg, require_negatives, origin)), end - start, stop - end)
            end = stop
            if not whole and bits.lines == cfg.block_records:
                bits.cut(start, end, first, end - start)
                start, first = end, number + 1
        if bits.lines:
            bits.cut(start, -1 if whole else end, first, end - start)
    elif fmt == "parquet":
        number = 0
        for group, rows in enumerate(_row_groups(path)):
            for row in rows:
                number += 1
                bits.add(judge(parse_record(path, number, row, cfg, require_negatives, origin)))
            bits.cut(group, -1, number - bits.lines + 1)
    else:
        raise DataError(f"{path}: data.order=indexed reads JSONL and Parquet files, and this one is {fmt}; convert "
                        "it to JSONL or Parquet, or set data.order=stream")
    return FileIndex(path, fmt, bits.blocks, rejects, bad, list(bits.names), keys, json.dumps(_stamp(path)),
                     bytes(bits.payload))


def _parquet(path: str) -> Any:
    import pyarrow.parquet as pq

    if named := _compression_suffix(path):
        raise DataError(f"{path}: a Parquet file compressed as a whole ({named}) cannot be read; decompress it")
    try:
        return pq.ParquetFile(fsspec.open(path, "rb").open())
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as parquet: {type(exc).__name__}: {exc}; fix the file or convert it "
                        "to JSONL") from exc


def _row_groups(path: str) -> Iterable[list[dict[str, Any]]]:
    file = _parquet(path)
    for group in range(file.num_row_groups):
        yield file.read_row_group(group).to_pylist()


def _index_one(args: tuple[str, DataConfig, bool, str | None, bool]
               ) -> tuple[dict[str, Any], bytes | None, str | None, bool]:
    """A file's index: its JSON, its payload (None when it stays in its file), the payload's file,
    and whether it was built now rather than read from the cache."""
    path, cfg, require_negatives, cache_dir, keys = args
    cached = (os.path.join(cache_dir, _cache_name(path, settings_key(cfg, require_negatives, keys))) if cache_dir
              else None)
    payload_file = f"{cached.removesuffix('.json')}.bin" if cached else None
    if cached and os.path.exists(cached):
        try:
            with open(cached, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") == INDEX_VERSION and data.get("path") == path and os.path.exists(payload_file):
                return data, None, payload_file, False
        except (OSError, ValueError):
            pass  # unreadable: built again, and written over
    # Read again from its start when it fails: a dropped connection, a throttle.
    built = retried(lambda: index_file(path, cfg, require_negatives, keys), path, "indexing")
    data = built.to_json()
    if not cached:
        return data, built.payload, None, True
    # The payload first, then the JSON that says it is complete; names of their own while written,
    # as other processes may be writing the same index.
    for target, content in ((payload_file, built.payload), (cached, json.dumps(data).encode())):
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(content)  # type: ignore[arg-type]
        os.replace(tmp, target)  # type: ignore[arg-type]
    return data, None, payload_file, True


def build_index(files: list[str], cfg: DataConfig, cache_dir: str | None, require_negatives: bool = False,
                workers: int = 1, keys: bool = False) -> DataIndex:
    """The index of ``files``, each from the cache or read once, ``workers`` files at a time. With
    no ``cache_dir``, the payloads are held in memory. ``keys``: with each pair's answer key and
    pair key, which in-batch mining (``train.hard_negatives.in_batch``) groups by."""
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    jobs = [(path, cfg, require_negatives, cache_dir, keys) for path in files]
    if workers > 1 and len(files) > 1:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(files)), mp_context=context) as pool:
            results = list(pool.map(_index_one, jobs))
    else:
        results = [_index_one(job) for job in jobs]
    index = DataIndex([FileIndex.from_json(data, i, payload, where)
                       for i, (data, payload, where, _) in enumerate(results)],
                      built=sum(built for *_, built in results))
    if index.built:
        logger.info("indexed %d of %d training file(s): %s training pairs in %s blocks", index.built, len(files),
                    f"{index.total:,}", f"{len(index.blocks):,}")
    return index


def partition(links: list[list[int]], size: int) -> list[int]:
    """The window's pairs (by index) in batch order: each batch starts from the first unplaced
    pair in stream order and grows by the unplaced pair with the most links into it (ties by
    stream order), or, with none linked, the next unplaced pair."""
    placed, layout = [False] * len(links), []
    cursor = 0
    while cursor < len(links):
        if placed[cursor]:
            cursor += 1
            continue
        gain: dict[int, int] = {}
        batch = 0
        pick = cursor
        while batch < size:
            placed[pick] = True
            layout.append(pick)
            batch += 1
            gain.pop(pick, None)
            for j in links[pick]:
                if not placed[j]:
                    gain[j] = gain.get(j, 0) + 1
            if gain:
                pick = min(gain, key=lambda j: (-gain[j], j))
            else:
                while cursor < len(links) and placed[cursor]:
                    cursor += 1
                if cursor == len(links):
                    break
                pick = cursor
    return layout


class SourceWeights:
    """``data.source_weights`` over an index: a pair of a source of weight ``w = k + f`` comes ``k``
    times, and ``round(f * n)`` of the source's ``n`` pairs once more: those whose place among the
    source's pairs (in the index's file order), shifted by a seeded offset that changes with the
    epoch, falls on an even spread. How many copies a block holds follows from the counts in the
    index alone; which pairs, from its payload."""

    def __init__(self, index: DataIndex, weights: dict[str, float], seed: int, epoch: int) -> None:
        import random

        self.index = index
        sizes = index.sizes()
        self.rule: dict[str | None, tuple[int, int, int, int]] = {}  # name -> (whole, extra, n, shift)
        for name, n in sizes.items():
            weight = weights.get(name, 1.0) if name is not None else 1.0
            whole, part = int(weight), weight - int(weight)
            shift = random.Random(f"{seed}:{epoch}:source-weight:{name}").randrange(n) if part and n else 0
            self.rule[name] = (whole, round(part * n), n, shift)
        # Where each block's pairs of each source start among that source's pairs.
        self.first: list[dict[str | None, int]] = []
        seen: dict[str | None, int] = {}
        for b in index.blocks:
            self.first.append({})
            for code, n in b.sources:
                name = index.files[b.file].source(code)
                self.first[-1][name] = seen.get(name, 0)
                seen[name] = seen.get(name, 0) + n

    def _extra(self, name: str | None, start: int, stop: int) -> int:
        """How many of the source's pairs ``start`` to ``stop`` (its own count) get one more copy."""
        _, extra, n, shift = self.rule[name]
        if not extra:
            return 0

        def chosen(a: int, b: int) -> int:  # within [0, n): the telescoping count of the spread
            return b * extra // n - a * extra // n

        a, b = (start + shift) % n, (start + shift) % n + (stop - start)
        return chosen(a, min(b, n)) + (chosen(0, b - n) if b > n else 0)

    def count(self, block: int) -> int:
        """Training pairs of ``block`` in the epoch, copies counted."""
        return sum(self.by_source(block).values())

    def by_source(self, block: int) -> dict[str | None, int]:
        """Training pairs of ``block`` in the epoch by source, copies counted."""
        b = self.index.blocks[block]
        counts: dict[str | None, int] = {}
        for code, n in b.sources:
            name = self.index.files[b.file].source(code)
            start = self.first[block][name]
            counts[name] = counts.get(name, 0) + self.rule[name][0] * n + self._extra(name, start, start + n)
        return counts

    def copies(self, block: int) -> list[int]:
        """How many times each training pair of ``block`` comes in the epoch."""
        b = self.index.blocks[block]
        file = self.index.files[b.file]
        seen: dict[str | None, int] = {}
        out = []
        for code in self.index.payload(block).codes:
            name = file.source(code)
            j = self.first[block][name] + seen.get(name, 0)
            seen[name] = seen.get(name, 0) + 1
            out.append(self.rule[name][0] + self._extra(name, j, j + 1))
        return out


class EpochOrder:
    """One epoch's order over an index (see the module's docstring): ``locate(p)`` says which block
    and which of its records is position ``p``, for ``0 <= p < total``.

    With ``group`` (``data.group_by_length``) the training order is that one regrouped: the pairs of
    every ``group`` x ``batch`` positions are sorted by document length (stable), cut into batches,
    the full batches put in a seeded random order and each shuffled within, a last partial one
    last, as the streamed order does. ``source(q)`` says which position of the order above is
    position ``q`` of the training order; it lies in the same span of ``group`` x ``batch``.

    With ``by_source`` (``data.batch_by_source``) every global batch is drawn from one source:
    each source's pairs, in the order above, are cut into batches; the full batches of all sources
    go in a seeded random order (so sources come in proportion to their size), and what is left of
    each source (less than a batch) is cut into the last batches, in source order, the last one
    partial, as the streamed order does. ``source(q)`` may then lie anywhere in the epoch
    (``monotone`` is false), though about as far into it as ``q``.
    """

    def __init__(self, index: DataIndex, seed: int, epoch: int, shuffle: bool, window: int,
                 group: int | None = None, batch: int = 1, weights: dict[str, float] | None = None,
                 by_source: bool = False, neighbours: tuple[int, Any] | None = None,
                 version: int = INDEXED_ORDER) -> None:
        import random

        self.index, self.shuffle, self.version = index, shuffle, version
        self.seed, self.epoch = seed, epoch
        # The span of positions regrouped together: by length, or by mined negatives (a window of
        # train.hard_negatives.window batches and the table of the latest round).
        self.neighbours = neighbours[1] if neighbours else None
        self.batch, self.span = batch, (neighbours[0] if neighbours else group or 0) * batch
        self._groups: OrderedDict[int, list[int]] = OrderedDict()
        self.weights = SourceWeights(index, weights, seed, epoch) if weights else None
        counts = [self.weights.count(i) if self.weights else b.count for i, b in enumerate(index.blocks)]
        order = [i for i, n in enumerate(counts) if n]
        if shuffle:
            random.Random(f"{seed}:{epoch}:blocks").shuffle(order)
        # Windows of whole blocks holding at least `window` training pairs each (the last one less).
        self.windows: list[list[int]] = []
        self.starts: list[int] = []
        total, held = 0, window
        for b in order:
            if held >= window or not shuffle:
                self.windows.append([])
                self.starts.append(total)
                held = 0
            self.windows[-1].append(b)
            held += counts[b]
            total += counts[b]
        self.total = total
        self._layouts = Kept(LAYOUT_BYTES_KEPT)  # window -> (permutation, blocks, ordinals)
        self._offsets = Kept(OFFSET_BYTES_KEPT)
        self.monotone = not by_source
        self._by_name = Kept(LAYOUT_BYTES_KEPT)
        if by_source:
            self._by_source(batch)

    def _by_source(self, batch: int) -> None:
        """The batches of one source each (see the class docstring), from the index's counts."""
        import random

        # Each source's pairs before each window, copies counted.
        before: dict[str | None, list[int]] = {}
        for number, blocks in enumerate(self.windows):
            for b in blocks:
                counts = self.weights.by_source(b) if self.weights else {
                    self.index.files[self.index.blocks[b].file].source(code): n for code, n in self.index.blocks[b].sources}
                for name, n in counts.items():
                    column = before.setdefault(name, [0] * (len(self.windows) + 1))
                    column[number + 1] += n
        for column in before.values():
            for number in range(len(self.windows)):
                column[number + 1] += column[number]
        self.names = sorted(before, key=str)
        self.before = [before[name] for name in self.names]
        sizes = [column[-1] for column in self.before]
        labels = array.array("I", (i for i, n in enumerate(sizes) for _ in range(n // batch)))
        random.Random(f"{self.seed}:{self.epoch}:source-batches").shuffle(labels)  # type: ignore[arg-type]
        taken = [0] * len(sizes)
        self.labels, self.nth = labels, array.array("I", [0]) * len(labels)
        for k, label in enumerate(labels):
            self.nth[k] = taken[label]
            taken[label] += 1
        # What is left of each source, in source order: where each one's rest starts in the tail.
        self.rest_starts = [0]
        for n in sizes:
            self.rest_starts.append(self.rest_starts[-1] + n - n // batch * batch)
        self.sizes = sizes

    def _of_source(self, index: int, ordinal: int) -> int:
        """The position above of the ``ordinal``-th pair of source ``self.names[index]``."""
        column = self.before[index]
        number = bisect.bisect_right(column, ordinal) - 1
        return self.starts[number] + self._source_positions(number, index)[ordinal - column[number]]

    def _source_positions(self, number: int, index: int) -> array.array:
        """The places in window ``number`` (in its permuted order) of the pairs of source ``index``."""
        key = (number, index)
        found = self._by_name.get(key)
        if found is None:
            permutation, blocks, ordinals = self._window_layout(number)
            name = self.names[index]
            codes = {b: self.index.payload(b).codes for b in self.windows[number]}
            file = {b: self.index.files[self.index.blocks[b].file] for b in self.windows[number]}
            found = array.array("I", (x for x, e in enumerate(permutation)
                                      if file[blocks[e]].source(codes[blocks[e]][ordinals[e]]) == name))
            self._by_name.put(key, found, 4 * len(found))
        return found

    def _window_layout(self, number: int) -> tuple[array.array, array.array, array.array]:
        """Window ``number``: a permutation of its entries, and the entries (block, training pair) in
        block order, as two arrays; with ``data.source_weights`` a pair comes as many times as it is
        repeated."""
        layout = self._layouts.get(number)
        if layout is None:
            import random

            blocks, ordinals = array.array("I"), array.array("I")
            for b in self.windows[number]:
                if self.weights is None:
                    count = self.index.blocks[b].count
                    blocks.extend(itertools.repeat(b, count))
                    ordinals.extend(range(count))
                else:
                    for k, copies in enumerate(self.weights.copies(b)):
                        blocks.extend(itertools.repeat(b, copies))
                        ordinals.extend(itertools.repeat(k, copies))
            key = f"{self.seed}:{self.epoch}:window:{number}"
            if not self.shuffle:
                order = array.array("I", range(len(blocks)))
            elif self.version == 1:  # the first indexed order: Python's shuffle, about 1 us a pair
                shuffled = list(range(len(blocks)))
                random.Random(key).shuffle(shuffled)
                order = array.array("I", shuffled)
            else:  # NumPy's legacy generator, whose stream is frozen: about 20 ns a pair
                import numpy as np

                seed = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype="<u4")
                order = array.array("I", np.random.RandomState(seed).permutation(len(blocks)).astype(np.uint32).tobytes())
            layout = (order, blocks, ordinals)
            self._layouts.put(number, layout, 12 * len(blocks))
        return layout

    def locate(self, position: int) -> tuple[int, int]:
        """(block, which of its training pairs) at ``position`` of the epoch."""
        number = bisect.bisect_right(self.starts, position) - 1
        permutation, blocks, ordinals = self._window_layout(number)
        entry = permutation[position - self.starts[number]]
        return blocks[entry], ordinals[entry]

    def record(self, block: int, ordinal: int) -> int:
        """Which record of ``block`` (counted from 0) its ``ordinal``-th training pair is."""
        offsets = self._offsets.get(block)
        if offsets is None:  # the reading thread and the one that lays out batches both ask: Kept locks
            offsets = self.index.offsets(block)
            self._offsets.put(block, offsets, 4 * len(offsets))
        return offsets[ordinal]

    def earliest(self, position: int) -> int:
        """The first position above that ``source`` may give for ``position`` (``monotone`` orders)."""
        return position - position % self.span if self.span else position

    def source(self, position: int) -> int:
        """The position above (blocks and windows) that is ``position`` of the training order."""
        if not self.monotone:
            k, i = divmod(position, self.batch)
            if k < len(self.labels):
                return self._of_source(self.labels[k], self.nth[k] * self.batch + i)
            rest = position - len(self.labels) * self.batch
            index = bisect.bisect_right(self.rest_starts, rest) - 1
            return self._of_source(index, self.sizes[index] // self.batch * self.batch + rest - self.rest_starts[index])
        if not self.span:
            return position
        start = self.earliest(position)
        arranged = self._groups.get(start)
        if arranged is None:
            arranged = self._groups[start] = self._arrange(start)
            if len(self._groups) > 2:
                self._groups.popitem(last=False)
        return start + arranged[position - start]

    def _arrange(self, start: int) -> list[int]:
        """The span from ``start`` in training order, as offsets into it (see the class docstring)."""
        import random

        size = min(self.span, self.total - start)
        located = [self.locate(p) for p in range(start, start + size)]
        if self.neighbours is None:
            codes = [self.index.payload(block).lengths[ordinal] for block, ordinal in located]
            ordered, purpose = sorted(range(size), key=codes.__getitem__), "length-groups"
        else:
            ordered, purpose = self._linked(located), "neighbour-groups"
        rng = random.Random(f"{self.seed}:{self.epoch}:{purpose}:{start // self.span}")
        full = size // self.batch * self.batch
        cut = [ordered[i:i + self.batch] for i in range(0, full, self.batch)]
        rng.shuffle(cut)
        if full < size:
            cut.append(ordered[full:])
        for batch in cut:
            rng.shuffle(batch)
        return [offset for batch in cut for offset in batch]

    def _linked(self, located: list[tuple[int, int]]) -> list[int]:
        """A span's pairs in batch order, linked by the mined negatives: two pairs are linked when
        one's mined negative is the other's answer, and ``partition`` puts linked pairs together."""
        keys = []
        for block, ordinal in located:
            found = self.index.payload(block).keys
            if found is None:
                raise DataError("the index was built without the pairs' keys that train.hard_negatives.in_batch "
                                "needs; it is built with them when the run mines in-batch negatives")
            keys.append((found[2 * ordinal], found[2 * ordinal + 1]))
        answered_by: dict[int, list[int]] = {}
        for i, (answer, _) in enumerate(keys):
            answered_by.setdefault(answer, []).append(i)
        links: list[set[int]] = [set() for _ in keys]
        for i, (_, pair) in enumerate(keys):
            for key in self.neighbours.negative_keys_of(pair):  # type: ignore[union-attr]
                for j in answered_by.get(key, ()):
                    if j != i:
                        links[i].add(j)
                        links[j].add(i)
        return partition([sorted(linked) for linked in links], self.batch)

    def pair_id(self, position: int) -> str:
        """The id of the pair at ``position`` of the training order (its file and line), from the
        index alone."""
        block, ordinal = self.locate(self.source(position))
        b = self.index.blocks[block]
        return f"{self.index.files[b.file].path}:{b.first + self.record(block, ordinal)}"


class BlockCache:
    """``data.block_cache``: a folder on one machine where its readers (every DataLoader worker of
    every process there) keep what they fetch of the training files, in a form each reader can take
    its own records from: the bytes of a block of an uncompressed JSONL file, a compressed file
    decompressed, a Parquet file and each of its row groups decoded (as an Arrow file, which a reader
    maps into memory and takes its rows from). Each is made once per machine rather than once per
    reader: the first reader to need it takes a lock file, writes it and renames it into place, the
    others wait for it. The least recently used are removed when the folder passes ``limit`` bytes."""

    def __init__(self, folder: str, limit: int) -> None:
        self.folder, self.limit = folder, limit
        os.makedirs(folder, exist_ok=True)

    @staticmethod
    def name(file: FileIndex, *what: Any) -> str:
        """The entry for ``what`` of ``file`` as it was indexed."""
        return hashlib.sha1("|".join(map(str, (file.path, file.stamp, *what))).encode()).hexdigest()

    def local(self, name: str, fill: Callable[[str], None]) -> str:
        """The local path of entry ``name``, which ``fill(path)`` writes when no reader has yet."""
        target = os.path.join(self.folder, name)
        if os.path.exists(target):
            os.utime(target)  # recently used
            return target
        lock = f"{target}.lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            owner = True
        except FileExistsError:
            owner = False
            waited = time.monotonic()
            while os.path.exists(lock) and not os.path.exists(target):
                if time.monotonic() - waited > CACHE_WAIT_S:  # its maker died: make it here
                    break
                time.sleep(0.02)
            if os.path.exists(target):
                return target
        try:
            tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                fill(tmp)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        finally:
            if owner:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)
        self._trim()
        return target

    def _trim(self) -> None:
        entries = []
        for entry in os.scandir(self.folder):
            if not entry.name.endswith((".lock", ".tmp")):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size


def _copy(source: IO[bytes], target: str, size: int | None = None) -> None:
    """``size`` bytes of ``source`` (all of it: None) into the file ``target``."""
    with open(target, "wb") as f:
        if size is None:
            shutil.copyfileobj(source, f, READ_CHUNK_BYTES)
            return
        while size > 0 and (data := source.read(min(size, READ_CHUNK_BYTES))):
            f.write(data)
            size -= len(data)


def _fetch(path: str, start: int, stop: int | None, target: str) -> None:
    """The bytes ``[start, stop)`` of ``path`` as stored (to its end: None) into ``target``."""
    with fsspec.open(path, "rb", compression=None) as remote:
        remote.seek(start)
        _copy(remote, target, None if stop is None else stop - start)


def _decompress(path: str, target: str) -> None:
    with _open_binary(path) as source:
        _copy(source, target)


def retried(action: Callable[[], Any], path: str, doing: str, reset: Callable[[], None] | None = None) -> Any:
    """``action()``, tried again when it fails (object storage drops connections and throttles),
    after 1, 2, 4... seconds, each time logged, ``READ_RETRIES`` times; a problem of the file
    itself (a ``DataError`` that names it, with no cause) is not tried again. The last failure is
    raised as it is."""
    for attempt in range(READ_RETRIES + 1):
        try:
            return action()
        except Exception as exc:
            if isinstance(exc, DataError) and exc.__cause__ is None or attempt == READ_RETRIES:
                raise
            cause = exc.__cause__ if isinstance(exc, DataError) else exc
            wait = READ_BACKOFF_S * 2 ** attempt
            logger.warning("%s: %s failed (%s: %s); trying again in %.0f s", path, doing, type(cause).__name__,
                           str(cause)[:200], wait)
            if reset is not None:
                reset()
            time.sleep(wait)
    raise AssertionError("unreachable")


Raw = tuple[str, int, Any]  # a record as read: its file, its line (or row) number, the line or row


class BlockReader:
    """Reads the training pairs it is asked for, and no other record: of a JSONL file the bytes of
    their lines (their places are in the index), of a Parquet file their rows of the row group
    (decoded whole, unless the machine's block cache holds it decoded). Counts what it did."""

    def __init__(self, index: DataIndex, cfg: DataConfig, require_negatives: bool = False) -> None:
        self.index, self.cfg, self.require_negatives = index, cfg, require_negatives
        self.cache = BlockCache(cfg.block_cache, cfg.block_cache_bytes) if cfg.block_cache else None
        self.parsed = 0  # records parsed
        self.scanned = 0  # records read to reach them (lines read, rows decoded)
        self.bytes_read = 0  # JSONL bytes read (decompressed), from the files or the machine's cache
        self.blocks_read = 0
        self._parquet: OrderedDict[int, Any] = OrderedDict()
        self._origins: dict[str, Any] = {}  # each file's file_origin, looked up once

    def read(self, order: EpochOrder, wanted: dict[int, list[int]]) -> dict[tuple[int, int], Raw]:
        """The records at (block, ordinal) for each block's wanted ordinals, still unparsed (``parse``
        makes each a pair when it is needed, so a window's first micro-batch waits for the reading
        of the window, not the parsing of all of it)."""
        found: dict[tuple[int, int], Raw] = {}
        for block, ordinals in sorted(wanted.items()):
            records = {order.record(block, k): k for k in set(ordinals)}
            b = self.index.blocks[block]
            path = self.index.files[b.file].path
            for record, raw in self._records(block, records):
                found[block, records[record]] = (path, b.first + record, raw)
            missing = [r for r, k in records.items() if (block, k) not in found]
            if missing:  # the file is shorter than when it was indexed
                raise DataError(self._changed(path, b.first + min(missing)))
        return found

    def read_at(self, order: EpochOrder, located: dict[int, tuple[int, int]]) -> dict[int, Raw]:
        """``read`` for positions of the epoch, each located as (block, ordinal): the record at each."""
        wanted: dict[int, list[int]] = {}
        for block, ordinal in located.values():
            wanted.setdefault(block, []).append(ordinal)
        records = self.read(order, wanted) if wanted else {}
        return {p: records[where] for p, where in located.items()}

    def parse(self, record: Raw) -> Pair:
        """The training pair a record ``read`` gave is."""
        path, line, raw = record
        self.parsed += 1
        if path not in self._origins:
            self._origins[path] = file_origin(path, self.cfg)
        item = parse_record(path, line, raw, self.cfg, self.require_negatives, self._origins[path])
        if not isinstance(item, Pair) or not trains_on(item, self.cfg):
            raise DataError(self._changed(path, line))
        return item

    def _changed(self, path: str, line: int) -> str:
        return (f"{path}: line {line} is no longer the training pair the index of the file says it is; the file "
                f"changed after it was indexed. Delete {self.cfg.index_dir or 'output_dir/data_index'} to index the "
                "files again.")

    def _records(self, block: int, wanted: dict[int, int]) -> list[tuple[int, Any]]:
        """(record number in the block, raw line or row) of the wanted records (record number ->
        training pair ordinal), read again when a read fails (``retried``)."""
        b = self.index.blocks[block]
        path = self.index.files[b.file].path
        counted = self.scanned, self.bytes_read

        def reset() -> None:
            self.scanned, self.bytes_read = counted
            self._parquet.pop(b.file, None)  # its connection may be what broke

        self.blocks_read += 1
        try:
            return retried(lambda: list(self._read_block(block, wanted)), path, "reading", reset)
        except Exception as exc:
            if isinstance(exc, DataError) and exc.__cause__ is None:
                raise
            cause = exc.__cause__ if isinstance(exc, DataError) else exc
            raise DataError(f"{path}: block {block} (from line or row {b.first}) could not be read in "
                            f"{READ_RETRIES + 1} tries; the last error: {type(cause).__name__}: {cause}") from exc

    def _read_block(self, block: int, wanted: dict[int, int]) -> Iterable[tuple[int, Any]]:
        b = self.index.blocks[block]
        file = self.index.files[b.file]
        if file.fmt == "json":
            yield from self._lines(block, wanted)
            return
        rows = sorted(wanted)
        if self.cache is not None:  # the row group decoded once on this machine; each reader takes its rows
            local = self.cache.local(f"{BlockCache.name(file, 'row group', b.start)}.arrow",
                                     functools.partial(self._decode_row_group, file, b.start))
            import pyarrow as pa

            with pa.memory_map(local) as source:
                taken = pa.ipc.open_file(source).read_all().take(rows).to_pylist()
            self.scanned += len(rows)
            yield from zip(rows, taken)
            return
        group = self._parquet_file(b.file, file.path).read_row_group(b.start)
        self.scanned += group.num_rows
        yield from zip(rows, group.take(rows).to_pylist())

    def _parquet_file(self, number: int, path: str) -> Any:
        parquet = self._parquet.get(number)
        if parquet is None:
            parquet = self._parquet[number] = _parquet(path)
            if len(self._parquet) > 4:
                self._parquet.popitem(last=False)
        return parquet

    def _decode_row_group(self, file: FileIndex, group: int, target: str) -> None:
        import pyarrow as pa

        name = f"{BlockCache.name(file, 'file')}-{os.path.basename(file.path.rstrip('/'))}"
        local = self.cache.local(name, functools.partial(_fetch, file.path, 0, None))  # type: ignore[union-attr]
        table = _parquet(local).read_row_group(group)
        with pa.OSFile(target, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    def _lines(self, block: int, wanted: dict[int, int]) -> Iterable[tuple[int, str]]:
        """The wanted lines of a JSONL block, each read where the index places it: near ones in one
        read, the bytes between them passed over (a compressed file is decompressed up to the last
        one, unless the machine's block cache holds it decompressed)."""
        b = self.index.blocks[block]
        file = self.index.files[b.file]
        payload = self.index.payload(block)
        path, base = file.path, b.start  # a compressed file is one block, from 0
        if self.cache is not None:  # this machine's copy: the block, or the compressed file decompressed
            if b.stop == -1:
                path = self.cache.local(BlockCache.name(file, "decompressed"), functools.partial(_decompress, file.path))
            else:
                path = self.cache.local(BlockCache.name(file, b.start, b.stop),
                                        functools.partial(_fetch, file.path, b.start, b.stop))
            base = 0
        places = sorted((payload.starts[k], payload.sizes[k], record) for record, k in wanted.items())
        through = path == file.path and b.stop == -1  # a compressed file decompressed from its start
        with _open_binary(path) as f:
            for group in _near(places, RANGE_GAP_BYTES):
                low = group[0][0] - (1 if base + group[0][0] > 0 else 0)  # from the newline before the first line
                high = group[-1][0] + group[-1][1] + 1  # to a byte past the last (none at the end of the file)
                f.seek(base + low)
                data = f.read(high - low)
                if not through:
                    self.bytes_read += len(data)
                    self.scanned += data.count(b"\n", group[0][0] - low, group[-1][0] + group[-1][1] - low)
                for start, size, record in group:
                    at = start - low
                    raw = data[at:at + size]
                    whole = (len(raw) == size and (at == 0 or data[at - 1] == 10)
                             and (raw.endswith(b"\n") or at + size == len(data)))
                    line = decoded_line(raw.removesuffix(b"\n"), b.first + record) if whole else None
                    if line is None:  # cut, moved or no longer text: not what was indexed
                        raise DataError(self._changed(file.path, b.first + record))
                    yield record, line
            if through:  # every byte and line up to the last one wanted
                self.bytes_read += f.tell()
                self.scanned += max(wanted) + 1


def _near(places: list[tuple[int, int, int]], gap: int) -> Iterable[list[tuple[int, int, int]]]:
    """(start, size, record) places, ascending, in runs read together: no more than ``gap`` bytes
    between one and the next."""
    run: list[tuple[int, int, int]] = []
    for place in places:
        if run and place[0] - 1 > run[-1][0] + run[-1][1] + 1 + gap:
            yield run
            run = []
        run.append(place)
    if run:
        yield run


def window_records(cfg: DataConfig) -> int:
    """Training pairs a window of the indexed order holds at least (``data.shuffle_buffer``)."""
    return max(1, cfg.shuffle_buffer)
