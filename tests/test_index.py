"""data.order=indexed: the files indexed once, each epoch an addressable order over their blocks.

The order must keep every guarantee of the streamed one (each training pair once per epoch, the
same global batches on any number of processes and workers, exact resume, bad records named by
file and line), while each reader parses only its own pairs and a resume reads nothing before
its position.
"""

from __future__ import annotations

import bisect
import collections
import functools
import gzip
import http.server
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, make_pairs, untokenized, write_jsonl
from fsspec.implementations.memory import MemoryFileSystem
from test_hard_negatives import killed_and_resumed, sharing_pairs, trainer_for
from test_resume import args_for, batches, finish, start

from embedtune.config import Config, DataConfig, parse_args
from embedtune.data import index as index_module
from embedtune.data.index import EpochOrder, build_index
from embedtune.data.records import DataError, Pair, Reject, read_pairs, text_key, trains_on
from embedtune.data.split import weighted_total
from embedtune.data.stream import PairBatches, make_loader


def shards(folder: Path) -> list[str]:
    """Three shards of one data set: plain JSONL with two bad lines, gzipped JSONL, Parquet in
    row groups of 40."""
    records = make_pairs(330, seed=5)
    plain = records[:110]
    lines: list = [*plain[:20], "{not json", *plain[20:70], {"question": "no answer here"}, *plain[70:]]
    write_jsonl(folder / "a.jsonl", lines)
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[110:220])
    pq.write_table(pa.Table.from_pylist(records[220:]), folder / "c.parquet", row_group_size=40)
    return [str(folder / name) for name in ("a.jsonl", "b.jsonl.gz", "c.parquet")]


def config(files: list[str], **extra) -> DataConfig:
    return DataConfig(train_files=files, order="indexed", block_records=16, shuffle_buffer=50, eval_fraction=0.1,
                      on_bad_record="skip", **extra)


def epoch_batches(cfg: DataConfig, index, processes: int = 1, workers: int = 0, epoch: int = 0, done: int = 0,
                  batch: int = 12, accumulation: int = 2) -> list[list[str]]:
    """The global micro-batches (ids) the processes train on, put back together step by step."""
    per_process = []
    for rank in range(processes):
        dataset = PairBatches(cfg, batch, accumulation, seed=7, collate=untokenized, num_processes=processes,
                              rank=rank)
        dataset.index = index
        dataset.set_position(epoch, done)
        per_process.append([b.ids for b in make_loader(dataset, workers, pin_memory=False)])
    return [sum((p[i] for p in per_process), []) for i in range(len(per_process[0]))]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("shards")
    files = shards(folder)
    cfg = config(files)
    return files, cfg, build_index(files, cfg, str(folder / "index"))


def test_an_epoch_trains_on_every_training_pair_once(indexed) -> None:
    files, cfg, index = indexed
    streamed = [p for p in read_pairs(files, cfg) if not isinstance(p, Reject) and trains_on(p, cfg)]
    ids = [i for b in epoch_batches(cfg, index) for i in b]
    assert sorted(ids) == sorted(p.id for p in streamed) and len(ids) == index.total == len(streamed)
    # Shuffled across the files, not file after file.
    names = [i.rsplit(":", 1)[0] for i in ids]
    assert sum(a != b for a, b in zip(names, names[1:])) > 30
    # The blocks are what the module says: 16 lines of the plain file, the gzipped file whole,
    # a Parquet row group each.
    assert [len(f.blocks) for f in index.files] == [7, 1, 3]
    # A second epoch and another seed give other orders.
    assert epoch_batches(cfg, index, epoch=1) != epoch_batches(cfg, index)


def test_bad_records_are_named_by_file_and_line(indexed) -> None:
    files, _, index = indexed
    assert [(r.file, r.line) for r in index.rejects] == [(files[0], 21), (files[0], 72)]
    assert "not valid JSON" in index.rejects[0].reason and "no 'answer' field" in index.rejects[1].reason


@pytest.mark.parametrize("processes, workers", [(2, 0), (3, 2), (4, 3)])
def test_the_same_global_batches_on_any_number_of_processes_and_workers(indexed, processes: int,
                                                                        workers: int) -> None:
    _, cfg, index = indexed
    assert epoch_batches(cfg, index, processes, workers) == epoch_batches(cfg, index)


def test_a_resumed_epoch_continues_exactly_and_reads_nothing_before(indexed, monkeypatch) -> None:
    _, cfg, index = indexed
    whole = epoch_batches(cfg, index, epoch=1)
    # 5 global batches done = 10 micro-batches of 6.
    assert epoch_batches(cfg, index, processes=2, workers=2, epoch=1, done=5) == whole[10:]
    dataset = PairBatches(cfg, 12, 2, seed=7, collate=untokenized)
    dataset.index = index
    dataset.set_position(1, 5)
    reads = []
    read_at = index_module.BlockReader.read_at
    monkeypatch.setattr(index_module.BlockReader, "read_at",
                        lambda self, order, located: reads.append(located) or read_at(self, order, located))
    first = next(iter(dataset))
    assert first.ids == whole[10]
    # Its window and the next (read ahead) were read: no window before it was even gone through.
    assert len(reads) == 2 and all(reads)
    # What it took: the records from there to the end of the window that holds the micro-batch
    # were read (and the next window's, ahead), nothing of the 60 pairs before; only the micro-batch's
    # 6 pairs were parsed.
    order = EpochOrder(index, 7, 1, True, cfg.shuffle_buffer)
    assert dataset.reader.parsed == 6
    here = bisect.bisect_right(order.starts, 60) - 1
    assert here > 0 and 0 < dataset.reader.blocks_read <= sum(map(len, order.windows[here:here + 3]))


def test_each_reader_parses_only_its_own_pairs(indexed) -> None:
    _, cfg, index = indexed
    readers = []
    for rank in range(2):
        for worker in range(3):
            dataset = PairBatches(cfg, 12, 2, seed=7, collate=untokenized, num_processes=2, rank=rank)
            dataset.index = index
            got = list(dataset.indexed_batches(worker, 3))
            own = sum(len(b.ids) for b in got)
            # A process whose slice of a micro-batch is empty reads one stand-in pair for it.
            assert dataset.reader.parsed == own + sum(b.empty for b in got)
            # Each block of the epoch is read once at most.
            assert dataset.reader.blocks_read <= len(index.blocks)
            readers.append(own)
    assert sum(readers) == index.total and max(readers) <= index.total / 6 + 12


def test_each_reader_reads_only_its_own_lines_and_rows(tmp_path: Path, monkeypatch) -> None:
    """Not only parsed: read. A JSONL line is read where the index places it, a compressed file and
    a Parquet row group through the machine's block cache, decompressed and decoded once there."""
    monkeypatch.setattr(index_module, "RANGE_GAP_BYTES", 0)  # no bytes read past between two lines
    files = shards(tmp_path)
    text = Path(files[0]).read_bytes() + gzip.decompress(Path(files[1]).read_bytes())
    for cache in (None, str(tmp_path / "cache")):
        cfg = config(files, block_cache=cache)
        index = build_index(files, cfg, None)
        totals = collections.Counter()
        for rank in range(2):
            for worker in range(3):
                dataset = PairBatches(cfg, 12, 2, seed=7, collate=untokenized, num_processes=2, rank=rank)
                dataset.index = index
                got = list(dataset.indexed_batches(worker, 3))
                reader = dataset.reader
                totals.update(bytes=reader.bytes_read, parsed=reader.parsed)
                if cache:  # every record read is one of its own (or a stand-in), and parsed
                    assert reader.scanned == reader.parsed == sum(len(b.ids) + b.empty for b in got)
        if cache:
            # The six readers together read each training pair's line once (and a newline before
            # each run of lines), not six times the data.
            assert len(text) * 0.8 < totals["bytes"] < len(text) * 1.1
        else:  # the compressed file cannot be entered in the middle: each reader decompresses it
            assert totals["bytes"] > 3 * len(text) / 2


def test_the_index_is_read_from_its_cache_and_built_again_for_a_changed_file(tmp_path: Path) -> None:
    files = shards(tmp_path)
    cfg = config(files)
    cache = str(tmp_path / "index")
    first = build_index(files, cfg, cache, workers=2)
    again = build_index(files, cfg, cache)
    assert (first.built, again.built) == (3, 0) and again.total == first.total
    assert [again.payload(i) for i in range(len(again.blocks))] == [first.payload(i) for i in range(len(first.blocks))]
    # Another held-out fraction is another set of training pairs: indexed again.
    assert build_index(files, config(files).model_copy(update={"eval_fraction": 0.2}), cache).built == 3
    # The plain file rewritten: only it is indexed again, and the new records are trained on.
    records = make_pairs(40, seed=9)
    write_jsonl(Path(files[0]), records)
    os.utime(files[0], (time.time() + 5, time.time() + 5))
    changed = build_index(files, cfg, cache)
    assert changed.built == 1 and changed.bad == 0
    assert len(changed.files[0].blocks) == 3


def test_a_file_changed_under_its_index_is_named_rather_than_read_wrong(tmp_path: Path) -> None:
    files = shards(tmp_path)
    cfg = config(files)
    index = build_index(files, cfg, None)
    stamp = os.stat(files[0])
    original = Path(files[0]).read_text()
    Path(files[0]).write_text(original.replace('"question"', '"questio"', 1))
    os.utime(files[0], ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(DataError, match=r"a\.jsonl: line 1 is no longer the training pair.*changed after it was "
                                        r"indexed.*Delete"):
        epoch_batches(cfg.model_copy(update={"shuffle": False}), index)
    # Cut short: the first line the index has and the file no longer does is named.
    Path(files[0]).write_text("".join(original.splitlines(keepends=True)[:30]))
    with pytest.raises(DataError, match=r"a\.jsonl: line 31 is no longer the training pair"):
        epoch_batches(cfg.model_copy(update={"shuffle": False}), index)


def test_mining_is_off_unless_asked_and_files_it_cannot_enter_are_refused_in_one_line(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "a.jsonl", make_pairs(10)))
    # A round embeds every training pair before step 1: at the scale this order is for, that is
    # asked for, not a default.
    assert Config(data={"train_files": [path], "order": "indexed"}).train.hard_negatives is None
    assert Config(data={"train_files": [path], "order": "indexed"},
                  train={"hard_negatives": {"in_batch": True}}).train.hard_negatives.in_batch
    with pytest.raises(ValueError, match=r"data.order=indexed reads JSONL and Parquet files, and .*b\.csv\.gz is CSV"):
        DataConfig(train_files=[path, str(tmp_path / "b.csv.gz")], order="indexed")


def test_length_grouped_batches_keep_every_guarantee_and_hold_texts_of_about_one_length(indexed) -> None:
    files, plain, _ = indexed
    # Documents of very different lengths, so that grouping has something to do.
    folder = Path(files[0]).parent / "varied"
    folder.mkdir(exist_ok=True)
    rng = random.Random(0)
    records = [{"question": r["question"], "answer": " ".join([r["answer"]] * rng.randint(1, 12))}
               for r in make_pairs(300, seed=8)]
    path = str(write_jsonl(folder / "v.jsonl", records))
    cfg = config([path], group_by_length=4)
    index = build_index([path], cfg, None)
    grouped = epoch_batches(cfg, index)
    ids = [i for b in grouped for i in b]
    assert sorted(ids) == sorted(i for b in epoch_batches(config([path]), index) for i in b)
    assert epoch_batches(cfg, index, processes=3, workers=2) == grouped
    assert epoch_batches(cfg, index, processes=2, workers=2, done=7) == grouped[14:]
    # The spread of answer lengths within a global batch (2 micro-batches) falls well below that of
    # the ungrouped order.
    length = {f"{path}:{i + 1}": len(r["answer"]) for i, r in enumerate(records)}

    def spread(batches: list[list[str]]) -> float:
        steps = [batches[i] + batches[i + 1] for i in range(0, len(batches) - 1, 2)]
        return sum(max(length[i] for i in s) - min(length[i] for i in s) for s in steps) / len(steps)

    assert spread(grouped) < 0.5 * spread(epoch_batches(config([path]), index))


def test_source_weights_repeat_and_thin_each_source_as_in_the_streamed_order(tmp_path: Path) -> None:
    records = make_pairs(260, seed=4)
    for i, record in enumerate(records):
        record["source"] = "faq" if i % 4 == 0 else "manual"  # 65 faq pairs, 195 manual ones
    paths = [str(write_jsonl(tmp_path / f"{i}.jsonl", records[i * 130:(i + 1) * 130])) for i in range(2)]
    weights = {"faq": 2.5, "manual": 0.4}
    cfg = DataConfig(train_files=paths, order="indexed", block_records=16, shuffle_buffer=40, eval_fraction=0.0,
                     source_weights=weights)
    index = build_index(paths, cfg, None)
    assert index.sizes() == {"faq": 65, "manual": 195}
    faq = {f"{paths[i // 130]}:{i % 130 + 1}" for i in range(0, 260, 4)}

    def epoch(number: int, **kwargs) -> list[str]:
        return [i for b in epoch_batches(cfg, index, epoch=number, **kwargs) for i in b]

    first = epoch(0)
    # 65 x 2.5 = 162.5 -> 2 x 65 + round(0.5 x 65) = 162 faq pairs; round(0.4 x 195) = 78 manual ones:
    # the count the trainer plans its steps by.
    assert len(first) == weighted_total(index.sizes(), weights) == 162 + 78
    counts = collections.Counter(first)
    assert sum(counts[i] for i in faq) == 162 and all(counts[i] in (2, 3) for i in faq)
    manual = [i for i in counts if i not in faq]
    assert len(manual) == 78 and all(counts[i] == 1 for i in manual)
    # Another epoch keeps another share of the manual pages; the order stays the same on any
    # number of processes and workers, and after a resume.
    assert {i for i in epoch(1) if i not in faq} != set(manual)
    assert epoch(1, processes=3, workers=2) == epoch(1)
    assert epoch_batches(cfg, index, processes=2, workers=2, done=4) == epoch_batches(cfg, index)[8:]


def test_batches_by_source_hold_one_source_each_in_proportion_and_keep_every_guarantee(tmp_path: Path) -> None:
    records = make_pairs(300, seed=6)
    for i, record in enumerate(records):
        record["source"] = ("faq", "manual", "manual", "mail", "manual")[i % 5] if i < 290 else "tiny"
    paths = [str(write_jsonl(tmp_path / f"{i}.jsonl", records[i * 100:(i + 1) * 100])) for i in range(3)]
    cfg = DataConfig(train_files=paths, order="indexed", block_records=16, shuffle_buffer=40, eval_fraction=0.0,
                     batch_by_source=True)
    index = build_index(paths, cfg, None)
    source = {f"{paths[i // 100]}:{i % 100 + 1}": r["source"] for i, r in enumerate(records)}
    # Global batches of 12 (2 micro-batches of 6).
    micro = epoch_batches(cfg, index)
    steps = [micro[i] + micro[i + 1] for i in range(0, len(micro), 2)]
    ids = [i for step in steps for i in step]
    assert sorted(ids) == sorted(source)  # every pair once
    sizes = collections.Counter(source.values())  # manual 174, faq 58, mail 58, tiny 10
    full = sum(n // 12 for n in sizes.values())
    kinds = [{source[i] for i in step} for step in steps]
    assert all(len(k) == 1 for k in kinds[:full])  # one source each, as long as a source fills a batch
    firsts = [min(k) for k in kinds[:full]]
    assert collections.Counter(firsts) == {"manual": 14, "faq": 4, "mail": 4}
    # The batches of a source are not all in one run, and the rest of each comes last, in source order.
    assert firsts != sorted(firsts)
    assert [source[i] for step in steps[full:] for i in step] == sorted(
        (source[i] for step in steps[full:] for i in step), key=str)
    # The same batches on any number of processes and workers, and after a resume.
    assert epoch_batches(cfg, index, processes=3, workers=2) == micro
    assert epoch_batches(cfg, index, processes=2, workers=2, done=9) == micro[18:]
    # Another epoch, another order.
    assert epoch_batches(cfg, index, epoch=1) != micro


def test_in_batch_mining_groups_each_pairs_negatives_into_its_batch_from_the_index(tiny_model: Path,
                                                                                   tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", sharing_pairs(200))
    trainer = trainer_for(tiny_model, data, tmp_path / "out", "data.order=indexed", "data.block_records=16",
                          "data.shuffle_buffer=40", "train.hard_negatives={in_batch: true, num: 1, relative_margin: null}")
    try:
        table, dataset = trainer.mined, trainer.dataset
        plain = [b.ids for b in make_loader(dataset, 0, pin_memory=False)]
        trainer._mine()
        grouped = [b.ids for b in make_loader(dataset, 0, pin_memory=False)]
        assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
        assert [len(b) for b in grouped] == [len(b) for b in plain]
        pairs = {p.id: p for p in read_pairs([str(data)], trainer.cfg.data) if isinstance(p, Pair)}

        def together(batches: list[list[str]]) -> float:
            """Share of pairs whose mined negative is the answer of another pair in their batch."""
            hits = 0
            for batch in batches:
                answers = {text_key(pairs[i].positive) for i in batch}
                hits += sum(bool(keys) and keys[0] in answers for keys in (table.negative_keys(pairs[i]) for i in batch))
            return hits / sum(map(len, batches))

        assert together(grouped) > 0.35 and together(grouped) > 5 * together(plain)
        # The same on workers and from a resumed position; no negatives attached.
        dataset.set_position(0, 3)
        resumed = list(make_loader(dataset, 2, pin_memory=False))
        assert [b.ids for b in resumed] == grouped[3:] and all(b.negative_owner.numel() == 0 for b in resumed)
    finally:
        trainer.lock.release()


def test_an_indexed_in_batch_run_killed_mid_epoch_resumes_into_the_same_run(models, data, tmp_path: Path) -> None:
    killed_and_resumed(models["dropout"], data, tmp_path, 22,
                       "train.hard_negatives={in_batch: true, every_epoch: true, window: 4}", *INDEXED)


def test_windows_hold_at_least_the_shuffle_buffer(indexed) -> None:
    _, cfg, index = indexed
    order = EpochOrder(index, 7, 0, True, cfg.shuffle_buffer)
    counts = [sum(index.blocks[b].count for b in w) for w in order.windows]
    assert all(c >= cfg.shuffle_buffer for c in counts[:-1]) and sum(counts) == index.total
    assert sorted(order.locate(p) for p in range(order.total)) == sorted(
        (b, k) for b, block in enumerate(index.blocks) for k in range(block.count))


# --- whole runs ---------------------------------------------------------------------------------

INDEXED = ("data.order=indexed", "data.block_records=16", "tracking.report_to=none")
GROUPED = (*INDEXED, "data.group_by_length=3")  # the killed run regroups by length as well


def test_an_indexed_length_grouped_run_killed_at_a_random_step_resumes_into_the_same_run(models, data,
                                                                                           tmp_path: Path) -> None:
    # 135 training pairs in batches of 8, two epochs: 34 steps.
    out = killed_and_resumed(models["dropout"], data, tmp_path, random.Random().randint(5, 28), *GROUPED)
    # The resumed run read the index its first part wrote (one file's, and its payload).
    assert sorted(Path(f).suffix for f in os.listdir(out / "data_index")) == [".bin", ".json"]


def test_an_indexed_run_trains_on_the_same_batches_on_two_processes(models, data, tmp_path: Path) -> None:
    # Three files, so that each process indexes a share of them and reads the other's.
    lines = data.read_text().splitlines(keepends=True)
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_text("".join(lines[i * 50:(i + 1) * 50]))
    files = "data.train_files=[" + ",".join(map(str, parts)) + "]"
    one, two = tmp_path / "one", tmp_path / "two"
    finish(start(args_for(models["plain"], data, one, *INDEXED, files, "train.max_steps=6")))
    finish(start(args_for(models["plain"], data, two, *INDEXED, files, "train.max_steps=6"), processes=2))
    assert batches(two) == batches(one)
    assert len(os.listdir(two / "data_index")) == 6  # each file's index and payload, once


def test_an_indexed_run_stops_on_a_bad_record_naming_it(models, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [*make_pairs(30), '{"question": "q"}'])
    cfg = parse_args(["--input_jsonl", str(path), "--base_model", str(models["plain"]), "--output_dir",
                             str(tmp_path / "out"), "data.order=indexed", "tracking.report_to=none"])
    from embedtune.training.trainer import Trainer

    with pytest.raises(DataError, match=r"1 bad record\(s\) in the training files; the first: .*pairs\.jsonl, "
                                        r"line 31.*no 'answer' field"):
        Trainer(cfg).setup()


# --- object storage -------------------------------------------------------------------------------


class FlakyFileSystem(MemoryFileSystem):
    """fsspec's in-memory filesystem whose opens fail while ``failures`` says so, as object
    storage does when it drops a connection or throttles."""

    protocol = "flaky"
    root_marker = "/"
    failures = 0

    def _open(self, path, mode="rb", **kwargs):
        if FlakyFileSystem.failures:
            FlakyFileSystem.failures -= 1
            raise ConnectionError("connection reset by peer")
        return super()._open(path, mode, **kwargs)


def test_shards_on_an_fsspec_filesystem_read_the_same_and_survive_dropped_connections(tmp_path: Path, monkeypatch,
                                                                                       caplog) -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    local = shards(tmp_path)
    remote = []
    for path in local:
        url = f"flaky://bucket/{Path(path).name}"
        with fsspec.open(url, "wb") as f:
            f.write(Path(path).read_bytes())
        remote.append(url)
    here = build_index(local, config(local), None)
    there = build_index(remote, config(remote), str(tmp_path / "index"))
    assert [(b.lines, b.count, there.payload(i)) for i, b in enumerate(there.blocks)] == [
        (b.lines, b.count, here.payload(i)) for i, b in enumerate(here.blocks)]
    renamed = [[i.replace(str(tmp_path) + "/", "flaky://bucket/") for i in b] for b in epoch_batches(config(local), here)]
    monkeypatch.setattr(index_module, "READ_BACKOFF_S", 0.0)
    FlakyFileSystem.failures = 3  # three reads fail, then the connection holds
    with caplog.at_level("WARNING"):
        assert epoch_batches(config(remote), there) == renamed
    assert caplog.text.count("reading failed (ConnectionError: connection reset by peer); trying again") == 3
    FlakyFileSystem.failures = 100  # down for good: named, after the retries
    with pytest.raises(DataError, match=r"flaky://bucket/\w\.\w+.*: block \d+ .*could not be read in 6 tries; the "
                                        r"last error: ConnectionError: connection reset by peer"):
        epoch_batches(config(remote), there)
    FlakyFileSystem.failures = 0


class RangedFiles(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers byte-range requests, as object storage over https does."""

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[override]
        wanted = self.headers.get("Range")
        if not wanted or self.command != "GET":
            return super().send_head()
        data = Path(self.translate_path(self.path)).read_bytes()
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(data[start:end + 1])


def test_shards_over_https_style_range_requests_read_the_same(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    local = shards(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangedFiles, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{server.server_port}"
    try:
        remote = [f"{site}/{Path(p).name}" for p in local]
        there = build_index(remote, config(remote), None)
        here = build_index(local, config(local), None)
        assert [(b.start, b.stop, there.payload(i)) for i, b in enumerate(there.blocks)] == [
            (b.start, b.stop, here.payload(i)) for i, b in enumerate(here.blocks)]
        renamed = [[i.replace(str(tmp_path), site) for i in b] for b in epoch_batches(config(local), here)]
        assert epoch_batches(config(remote), there) == renamed
    finally:
        server.shutdown()


def test_the_data_benchmark_shows_each_reader_parsing_its_share(tmp_path: Path) -> None:
    """`embedtune bench data` at a small size: the figures it prints are the ones the README's
    table holds at 11M records."""
    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "data", "--out", str(tmp_path), "--records",
                           "12000", "--shards", "6", "--formats", "jsonl.gz", "--batch_size", "128", "--readers", "1x1",
                           "4x8", "--resume_at", "9000", "--stream_resume", "0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "jsonl.gz: 0.00 GB, 12,000 training pairs in 6 blocks" in out
    without, cached = out.split("without a block cache:")[1].split("with a block cache on this machine")
    for table in (without, cached):
        rows = {int(line.split()[0]): line.split() for line in table.splitlines()
                if line.split() and line.split()[0] in ("1", "32") and "x" in line.split()[1]}
        assert rows[1][2] == "12,000" and rows[1][3] == "1.000"  # one reader parses all
        assert 0.99 <= float(rows[32][3]) <= 1.1  # each of 32 parses a 32nd (stand-ins aside)
        read = int(rows[32][4].replace(",", ""))
        # Without a cache a reader decompresses the whole of each file; from the machine's
        # decompressed copy it reads its own lines (with what lies between near ones).
        assert read > 11_000 if table is without else read < 12_000 / 32 * 3
    resumed = [line.split() for line in out.splitlines() if line.strip().startswith("9,000")]
    assert len(resumed) == 2 and all(float(r[-1]) < 2.0 for r in resumed)  # resumed 9,000 in, no slower than fresh x2
    assert "peak RSS of reader 0 of 32" in out and "(2,000 pairs)" in out and "(12,000 pairs)" in out


class CountingFileSystem(MemoryFileSystem):
    """fsspec's in-memory filesystem, counting the files opened for reading and the bytes read."""

    protocol = "counting"
    root_marker = "/"
    opened = 0
    read = 0

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return file
        CountingFileSystem.opened += 1
        return CountedFile(file.getvalue())


class CountedFile(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        CountingFileSystem.read += len(data)
        return data


def test_a_block_cache_fetches_each_block_once_per_machine_for_all_its_readers(tmp_path: Path) -> None:
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    local = shards(tmp_path)
    remote = []
    for path in local:
        remote.append(f"counting://bucket/{Path(path).name}")
        with fsspec.open(remote[-1], "wb") as f:
            f.write(Path(path).read_bytes())
    index = build_index(remote, config(remote), str(tmp_path / "index"))
    size = sum(Path(p).stat().st_size for p in local)

    def fetched(cfg: DataConfig) -> tuple[list[list[str]], int, int]:
        CountingFileSystem.opened = CountingFileSystem.read = 0
        batches = epoch_batches(cfg, index, processes=4)  # 4 readers, each with its own reader of blocks
        return batches, CountingFileSystem.opened, CountingFileSystem.read

    plain, opened, read = fetched(config(remote))
    cache = tmp_path / "cache"
    cached, opened_cached, read_cached = fetched(config(remote, block_cache=str(cache)))
    assert cached == plain
    # Without the cache every reader fetches about every block; with it, each block comes once.
    assert read > 3 * size and read_cached <= size + 4096
    assert opened_cached <= len(index.blocks) < opened
    # A second epoch is served from the machine's copy; past the limit, the least recently used go.
    _, opened_again, _ = fetched(config(remote, block_cache=str(cache)))
    assert opened_again == 0
    small = config(remote, block_cache=str(cache), block_cache_bytes=1 << 20)
    assert fetched(small)[0] == plain
    assert sum(f.stat().st_size for f in cache.iterdir()) <= max(1 << 20, max(f.stat().st_size for f in cache.iterdir()))
