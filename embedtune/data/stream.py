"""The training stream: every pair of an epoch in one deterministic global order, cut into batches.

The order of pairs depends only on (files, seed, epoch): the files are shuffled per epoch, then
a seeded buffer shuffle runs over the concatenated stream. The stream is cut into global batches
(with ``data.group_by_length``, every N of them are re-cut by document length and reordered, by
the seed), each global batch into ``gradient_accumulation_steps`` micro-batches, and each
micro-batch into one slice per process. DataLoader worker ``w`` builds micro-batches ``u`` with
``u % num_workers == w``, which the DataLoader's round-robin hands back in order, so neither the
number of workers nor of processes changes what is trained on. A global batch with more text
than ``data.max_batch_chars`` stops the run before it is tokenized.

With ``data.order=indexed`` the order is ``index.EpochOrder``'s instead, over the files' index:
the same cut into global batches, micro-batches and slices, but each worker reads only the pairs
of its own micro-batches (``indexed_batches``), and the text limit applies to each process's share.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import concurrent.futures
import itertools
import logging
import multiprocessing.util  # noqa: F401 - registers multiprocessing's exit handler before ours
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.sharedctypes import RawValue
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from embedtune.config import DataConfig
from embedtune.data.collate import TrainBatch
from embedtune.data.index import (
    INDEXED_ORDER,
    BlockReader,
    DataIndex,
    EpochOrder,
    Raw,
    partition,
    window_records,
)
from embedtune.data.records import (
    DataError,
    Pair,
    Reject,
    document_tokens,
    read_pairs,
    resolve_files,
    text_key,
    trains_on,
)
from embedtune.data.split import plan_data
from embedtune.distributed import cores_per_process

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """One micro-batch of the indexed order, as positions of the epoch."""

    offset: int  # its first position
    size: int  # its pairs, all processes
    step_size: int  # the pairs of its global batch
    mine: range  # this process's positions in it

    @property
    def needed(self) -> range:
        """The positions this process reads for it: its own, or, when it has none, one stand-in pair
        whose loss weighs nothing (the micro-batch's first, or for an empty micro-batch at the end of
        a global batch, that batch's last), read from the same windows as its neighbours."""
        if self.mine:
            return self.mine
        return range(self.offset, self.offset + 1) if self.size else range(self.offset - 1, self.offset)


@dataclass
class MicroBatch:
    """One micro-batch of all processes, still as text (each process tokenizes its own slice)."""

    index: int  # micro-batch number in the epoch
    pairs: list[Pair]
    global_size: int  # pairs in the whole micro-batch across processes
    step_size: int  # pairs in the whole global batch (all micro-batches, all processes)
    rejects: list[Reject] = field(default_factory=list)
    stand_in: Pair | None = None  # a pair of the global batch, for a process whose slice is empty


def _rng(seed: int, epoch: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{purpose}")


def ordered_pairs(cfg: DataConfig, seed: int, epoch: int, require_negatives: bool = False,
                  sizes: dict[str | None, int] | None = None) -> Iterator[Pair | Reject]:
    """All training pairs of one epoch in their global order; rejects pass straight through.

    With ``data.source_weights``, each pair comes as many times as its source's weight says
    (``weighted``) before the shuffle; ``sizes`` (each source's training pairs, from
    ``split.source_sizes``) saves the pass that would count them.
    """
    files = resolve_files(cfg.train_files)
    if cfg.shuffle:
        _rng(seed, epoch, "files").shuffle(files)
    source: Iterator[Pair | Reject] = read_pairs(files, cfg, require_negatives)
    if cfg.source_weights:
        if sizes is None:
            sizes = source_sizes(cfg, require_negatives)
        source = weighted(source, cfg, sizes, seed, epoch)
    if not cfg.shuffle:
        for item in source:
            if isinstance(item, Reject) or trains_on(item, cfg):
                yield item
        return
    rng = _rng(seed, epoch, "buffer")
    buffer: list[Pair] = []
    for item in source:
        if isinstance(item, Reject):
            yield item
            continue
        if not trains_on(item, cfg):
            continue
        if len(buffer) < cfg.shuffle_buffer:
            buffer.append(item)
            continue
        slot = rng.randrange(len(buffer))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def weighted(items: Iterator[Pair | Reject], cfg: DataConfig, sizes: dict[str | None, int], seed: int,
             epoch: int) -> Iterator[Pair | Reject]:
    """The training pairs, each repeated by its source's weight (``data.source_weights``).

    A weight ``w = k + f`` gives each pair of a source of ``n`` training pairs ``k`` copies, and
    ``round(f * n)`` of them one more: every ``1/f``-th pair of the source in reading order, from a
    seeded offset that changes with the epoch. So an epoch holds exactly ``split.weighted_total`` pairs
    (the step count is known before step 1), a different share each epoch, spread evenly over the
    files; held-out pairs and bad records pass through as they are.
    """
    weights = cfg.source_weights or {}
    seen: dict[str | None, int] = {}
    shifts: dict[str | None, int] = {}
    for item in items:
        if isinstance(item, Reject) or not trains_on(item, cfg):
            yield item
            continue
        weight = weights.get(item.source, 1.0) if item.source is not None else 1.0
        whole, part = int(weight), weight - int(weight)
        copies = whole
        if part:
            n = max(sizes.get(item.source, 0), 1)
            if item.source not in shifts:
                shifts[item.source] = _rng(seed, epoch, f"source-weight:{item.source}").randrange(n)
            index = seen.get(item.source, 0)
            seen[item.source] = index + 1
            extra = round(part * n)
            j = (index + shifts[item.source]) % n
            copies += (j + 1) * extra // n > j * extra // n
        for _ in range(copies):
            yield item


def source_sizes(cfg: DataConfig, require_negatives: bool = False) -> dict[str | None, int]:
    """Each source's training pairs (one pass over the files: ``plan_data``'s count)."""
    return plan_data(cfg, count=True, held_out=False, require_negatives=require_negatives).sources or {}


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
                 collate: Callable[[list[Pair]], TrainBatch], num_processes: int = 1, rank: int = 0,
                 all_ids: bool = False, require_negatives: bool = False,
                 sizes: dict[str | None, int] | None = None) -> None:
        self.cfg = cfg
        self.sizes = sizes  # each source's training pairs, for data.source_weights (None: counted when needed)
        # Negatives mined during training (train.hard_negatives): an object with apply(pair) -> pair
        # and a step (-1: nothing mined yet). Workers take a copy when an iterator starts, so the
        # trainer starts a new one after each round.
        self.negatives: Any = None
        # train.hard_negatives.in_batch: the batches of every this many are regrouped so that each
        # pair's mined negatives are the answers of pairs in its own batch (None: off).
        self.neighbour_window: int | None = None
        self.require_negatives = require_negatives
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.collate = collate
        self.num_processes = num_processes
        self.rank = rank
        self.all_ids = all_ids
        self.epoch = 0
        self.skip = 0
        # data.order=indexed: the training files' index (set by the trainer), and the reader of its blocks.
        self.index: DataIndex | None = None
        self.reader: BlockReader | None = None
        self.order_version = INDEXED_ORDER  # the indexed order's version (a resumed run keeps its own)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, done: int) -> None:
        self.epoch, self.skip = epoch, done

    def global_batches(self) -> Iterator[tuple[list[Pair], list[Reject]]]:
        """The epoch's global batches with the bad records met while filling each."""
        if self.neighbour_window and self.negatives is not None and self.negatives.step >= 0:
            return self._neighbours(self._stream_batches(), self.neighbour_window)
        if self.cfg.group_by_length:
            return self._grouped(self._stream_batches(), self.cfg.group_by_length)
        if self.cfg.batch_by_source:
            return self._by_source()
        return self._stream_batches()

    def _by_source(self) -> Iterator[tuple[list[Pair], list[Reject]]]:
        """Batches of one source each (``data.batch_by_source``), in the order they fill from the
        shuffled stream, so sources come in proportion to their size; at the end of the epoch what
        is left of every source (less than a batch each) is cut into batches in source order, the
        last one partial, so an epoch has as many batches as without grouping. All of it depends
        on (data, seed, epoch) only."""
        pending: dict[str | None, list[Pair]] = {}
        rejects: list[Reject] = []
        number = 0
        for item in self._pairs():
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            batch = pending.setdefault(item.source, [])
            batch.append(item)
            if len(batch) == self.batch_size:
                del pending[item.source]
                self._check_chars(batch, number)
                yield batch, rejects
                rejects, number = [], number + 1
        rest = [p for source in sorted(pending, key=str) for p in pending[source]]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start:start + self.batch_size]
            if len(batch) < self.batch_size and self.cfg.drop_last:
                logger.info("dropped the last %d pairs of epoch %d (a partial global batch)", len(batch), self.epoch)
                break
            self._check_chars(batch, number)
            yield batch, rejects
            rejects, number = [], number + 1
        if rejects:
            yield [], rejects

    def _pairs(self) -> Iterator[Pair | Reject]:
        """The epoch's pairs in order, with the mined negatives in place of their own once a round has run."""
        items = ordered_pairs(self.cfg, self.seed, self.epoch, self.require_negatives, self.sizes)
        table = self.negatives
        if table is None or table.step < 0 or self.neighbour_window:
            return items
        return (item if isinstance(item, Reject) else table.apply(item) for item in items)

    def _check_chars(self, batch: list[Pair], number: int) -> None:
        if sum(map(pair_chars, batch)) > self.cfg.max_batch_chars:
            raise DataError(too_much_text(batch, number, self.epoch, self.cfg.max_batch_chars))

    def _neighbours(self, batches: Iterator[tuple[list[Pair], list[Reject]]],
                    window: int) -> Iterator[tuple[list[Pair], list[Reject]]]:
        """``window`` stream batches at a time, regrouped so that pairs whose answers are each
        other's mined negatives share a batch (``train.hard_negatives.in_batch``).

        Two pairs are linked when one's mined negative is the other's answer; the window's pairs
        are partitioned greedily into batches that hold as many links as they can (``_partition``),
        then cut as ``_regrouped`` does. It depends on (data, seed, epoch) and the epoch's mined
        negatives only.
        """
        return self._regrouped(batches, window, "neighbour-groups", self._linked_order)

    def _linked_order(self, pairs: list[Pair]) -> list[Pair]:
        """A window's pairs in batch order, linked by the mined negatives (see ``_neighbours``)."""
        answered_by: dict[int, list[int]] = {}
        for i, pair in enumerate(pairs):
            answered_by.setdefault(text_key(pair.positive), []).append(i)
        links: list[set[int]] = [set() for _ in pairs]
        for i, pair in enumerate(pairs):
            for key in self.negatives.negative_keys(pair):
                for j in answered_by.get(key, ()):
                    if j != i:
                        links[i].add(j)
                        links[j].add(i)
        return [pairs[i] for i in self._partition([sorted(linked) for linked in links])]

    def _partition(self, links: list[list[int]]) -> list[int]:
        return partition(links, self.batch_size)

    def _grouped(self, batches: Iterator[tuple[list[Pair], list[Reject]]],
                 window: int) -> Iterator[tuple[list[Pair], list[Reject]]]:
        """``window`` stream batches at a time, re-cut by document length (``data.group_by_length``).

        The pairs of the window are sorted by the estimated token count of their longest document
        (stable, so ties keep the stream order) and cut into batches of the same sizes. The full
        batches go in a seeded random order, each shuffled within (so the processes' slices carry
        similar work); a last partial batch stays last. The window's bad records come with its
        first batch. All of it depends on (data, seed, epoch) only, never on processes or workers.
        """
        return self._regrouped(batches, window, "length-groups", lambda pairs: sorted(pairs, key=document_tokens))

    def _regrouped(self, batches: Iterator[tuple[list[Pair], list[Reject]]], window: int, purpose: str,
                   arrange: Callable[[list[Pair]], list[Pair]]) -> Iterator[tuple[list[Pair], list[Reject]]]:
        """``window`` stream batches at a time, their pairs put in order by ``arrange`` and cut into
        batches of the same sizes: full batches in a seeded random order (by ``purpose``), each
        shuffled within, a last partial one last; the window's bad records come with its first batch."""
        number = 0
        for part in itertools.count():
            taken = list(itertools.islice(batches, window))
            if not taken:
                return
            ordered = arrange([p for chunk, _ in taken for p in chunk])
            rejects = [r for _, chunk in taken for r in chunk]
            rng = _rng(self.seed, self.epoch, f"{purpose}:{part}")
            full = len(ordered) // self.batch_size * self.batch_size
            cut = [ordered[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
            rng.shuffle(cut)
            if full < len(ordered):
                cut.append(ordered[full:])
            if not cut:
                cut = [[]]
            for i, batch in enumerate(cut):
                rng.shuffle(batch)
                self._check_chars(batch, number)
                yield batch, rejects if i == 0 else []
                number += 1

    def _stream_batches(self) -> Iterator[tuple[list[Pair], list[Reject]]]:
        pending: list[Pair] = []
        rejects: list[Reject] = []
        chars, number = 0, 0
        for item in self._pairs():
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            pending.append(item)
            chars += pair_chars(item)
            if chars > self.cfg.max_batch_chars:
                raise DataError(too_much_text(pending, number, self.epoch, self.cfg.max_batch_chars))
            if len(pending) == self.batch_size:
                yield pending, rejects
                pending, rejects, chars = [], [], 0
                number += 1
        # The last, partial global batch is used whatever the number of processes (a process
        # whose slice is empty still takes part in the step), unless drop_last says otherwise.
        if pending and not self.cfg.drop_last:
            yield pending, rejects
            return
        if pending:
            logger.info("dropped the last %d pairs of epoch %d (a partial global batch)", len(pending), self.epoch)
        if rejects:
            yield [], rejects

    def _slots(self, total: int, worker: int, workers: int) -> Iterator[_Slot]:
        """This reader's micro-batches of the epoch from the start position, as positions."""
        size, number = self.batch_size, 0
        batches = total // size if self.cfg.drop_last else -(-total // size)
        for k in range(self.skip, batches):
            offset = k * size
            step = min(size, total - offset)
            for part in micro_batch_sizes(step, self.accumulation):
                if number % workers == worker:
                    mine = process_slice(part, self.num_processes, self.rank)
                    yield _Slot(offset, part, step, range(offset + mine.start, offset + mine.stop))
                number += 1
                offset += part

    def indexed_batches(self, worker: int, workers: int) -> Iterator[TrainBatch]:
        """``data.order=indexed``: this reader's micro-batches (worker ``worker`` of ``workers``),
        reading only their pairs, window by window of the order: each block is read once an
        epoch, a micro-batch goes as soon as the windows that hold its pairs are read, and the
        next window is read in the background meanwhile (so a slow read stalls no step)."""
        table = self.negatives if self.negatives is not None and self.negatives.step >= 0 else None
        # train.hard_negatives.in_batch: once a round has run, the pairs are grouped by their mined
        # negatives instead of carrying them.
        neighbours = (self.neighbour_window, table) if self.neighbour_window and table is not None else None
        order = EpochOrder(self.index, self.seed, self.epoch, self.cfg.shuffle, window_records(self.cfg),
                           self.cfg.group_by_length, self.batch_size, self.cfg.source_weights,
                           self.cfg.batch_by_source, neighbours, self.order_version)
        if self.reader is None:
            self.reader = BlockReader(self.index, self.cfg, self.require_negatives)
        if neighbours is not None:
            table = None
        slots = self._slots(order.total, worker, workers)
        if not order.monotone:
            yield from self._chunked_batches(order, slots, workers, table)
            return
        # Slots pulled in, each with the positions (of the order of blocks and windows) it reads.
        pending: collections.deque[tuple[_Slot, list[int]]] = collections.deque()
        upcoming = next(slots, None)
        ends = [*order.starts[1:], order.total]

        def plan(number: int) -> dict[int, tuple[int, int]]:
            """The positions of window ``number`` that this reader needs, located."""
            nonlocal upcoming
            start, end = order.starts[number], ends[number]
            while upcoming is not None and order.earliest(upcoming.needed[0]) < end:  # may need this window
                pending.append((upcoming, [order.source(q) for q in upcoming.needed]))
                upcoming = next(slots, None)
            return {p: order.locate(p) for _, sources in pending for p in sources if start <= p < end}

        found: dict[int, Raw] = {}
        # From the window that holds the first position needed: a resumed run passes over none before.
        first = bisect.bisect_right(order.starts, order.earliest(upcoming.needed[0])) - 1 if upcoming else 0
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedtune-readahead") as ahead:
            reading = ahead.submit(self.reader.read_at, order, plan(first)) if ends else None
            for number in range(first, len(ends)):
                found.update(reading.result())
                if number + 1 < len(ends) and (pending or upcoming is not None):
                    # Planned here, so that the slots are pulled in order; the locating is cheap.
                    reading = ahead.submit(self.reader.read_at, order, plan(number + 1))
                else:
                    reading = ahead.submit(dict)
                while pending and max(pending[0][1]) < ends[number]:
                    slot, sources = pending.popleft()
                    yield self._indexed_batch(slot, [found[p] for p in sources], order, table)
                if not pending and upcoming is None:
                    return
                keep = min(min(sources) for _, sources in pending) if pending else ends[number]
                found = {p: pair for p, pair in found.items() if p >= keep}

    def _chunked_batches(self, order: EpochOrder, slots: Iterator[_Slot], workers: int,
                         table: Any) -> Iterator[TrainBatch]:
        """The indexed order's micro-batches when their pairs do not come window after window
        (``data.batch_by_source``): this reader's micro-batches of about ``data.shuffle_buffer``
        positions of the epoch at a time, their pairs read together, the next chunk in the
        background meanwhile."""
        span = max(1, self.cfg.shuffle_buffer // max(1, self.batch_size // self.accumulation * workers))

        def plan() -> tuple[list[tuple[_Slot, list[int]]], dict[int, tuple[int, int]]]:
            """The next chunk's slots with their positions, and those positions located (here, in
            the thread that pulls the slots, so that the order's caches have one user)."""
            chunk = [(slot, [order.source(q) for q in slot.needed]) for slot in itertools.islice(slots, span)]
            return chunk, {p: order.locate(p) for _, sources in chunk for p in sources}

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedtune-readahead") as ahead:
            chunk, located = plan()
            reading = ahead.submit(self.reader.read_at, order, located)
            while chunk:
                found = reading.result()
                following, located = plan()
                reading = ahead.submit(self.reader.read_at, order, located)
                for slot, sources in chunk:
                    yield self._indexed_batch(slot, [found[p] for p in sources], order, table)
                chunk = following

    def _indexed_batch(self, slot: _Slot, records: list[Raw], order: EpochOrder, table: Any) -> TrainBatch:
        """The micro-batch of ``slot`` from its records as read: parsed, with the mined negatives of
        ``table`` in place of their own (when a round has run and they are not trained in-batch)."""
        pairs = [self.reader.parse(record) for record in records]  # type: ignore[union-attr]
        if table is not None:
            pairs = [table.apply(p) for p in pairs]
        if sum(map(pair_chars, pairs)) > self.cfg.max_batch_chars:
            raise DataError(too_much_text(pairs, slot.offset // self.batch_size, self.epoch,
                                          self.cfg.max_batch_chars).replace("global batch", "this process's share of "
                                                                           "global batch", 1))
        stand_in = not slot.mine
        every = [order.pair_id(p) for p in range(slot.offset, slot.offset + slot.size)] if self.all_ids else None
        return replace(self.collate(pairs), global_size=slot.size, step_size=slot.step_size,
                       ids=[] if stand_in else [p.id for p in pairs], all_ids=every, rejects=[], empty=stand_in)

    def micro_batches(self) -> Iterator[MicroBatch]:
        """Every micro-batch of the epoch from the start position (all processes), as text."""
        index = 0
        for number, (pairs, rejects) in enumerate(self.global_batches()):
            if number < self.skip:
                continue
            start = 0
            for part, size in enumerate(micro_batch_sizes(len(pairs), self.accumulation) if pairs else [0]):
                yield MicroBatch(index, pairs[start:start + size], size, len(pairs), rejects if part == 0 else [],
                            pairs[0] if pairs else None)
                index += 1
                start += size

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.index is not None:
            yield from self.indexed_batches(worker, workers)
            return
        for batch in self.micro_batches():
            if batch.index % workers != worker:
                continue
            mine = batch.pairs[process_slice(len(batch.pairs), self.num_processes, self.rank)]
            # Nothing for this process in this micro-batch (a small last batch): it still runs the
            # step, on a stand-in pair whose loss weighs nothing, so collectives match.
            stand_in = not mine and batch.stand_in is not None
            tokenized = self.collate([batch.stand_in] if stand_in else mine)  # type: ignore[list-item]
            # Every process sees the rejects (so all stop together under on_bad_record=error);
            # only the main process writes them.
            yield replace(tokenized, global_size=batch.global_size, step_size=batch.step_size,
                          ids=[p.id for p in mine], all_ids=[p.id for p in batch.pairs] if self.all_ids else None,
                          rejects=list(batch.rejects), empty=stand_in)


def pair_chars(pair: Pair) -> int:
    return len(pair.prompt or "") + len(pair.query) + len(pair.positive) + sum(map(len, pair.negatives))


def too_much_text(pairs: list[Pair], number: int, epoch: int, limit: int) -> str:
    longest = sorted(pairs, key=pair_chars, reverse=True)[:3]
    return (f"global batch {number + 1} of epoch {epoch} holds more than {limit:,} characters of text "
            f"(data.max_batch_chars) in its first {len(pairs)} pairs; the longest records: "
            + ", ".join(f"{p.id} ({pair_chars(p):,})" for p in longest)
            + ". Lower train.batch_size or data.max_record_bytes, or raise data.max_batch_chars if the "
            "machine has the memory to tokenize that much.")


# Set in the main process once it is exiting: from then on a SIGTERM stops a worker. Without it,
# a worker the main process never shut down (its iterator kept alive by an exception that is
# still referenced) would ignore multiprocessing's SIGTERM at exit, which then waits for it forever.
_EXITING = RawValue("b", 0)


def _mark_exiting() -> None:
    _EXITING.value = 1


# Registered after multiprocessing's own exit handler (imported above), so it runs before it.
atexit.register(_mark_exiting)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _EXITING.value:
        os._exit(0)


def _worker_init(worker_id: int) -> None:
    # A preemption signal goes to every process of the job; the workers leave it to the main
    # process, which finishes its step, saves and then shuts them down. Only once the main
    # process is exiting does a SIGTERM stop them.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def auto_workers(num_workers: int | None) -> int:
    """``data.num_workers``, or when unset: the cores left after one per training process on this
    machine, shared among those processes, between 1 and 8 each."""
    if num_workers is not None:
        return num_workers
    return max(1, min(8, cores_per_process() - 1))


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
