"""``embedtune bench data``: what each reader reads at cluster scale, with ``data.order=indexed``.

It builds sharded data from the packaged Q&A pairs (both sets, each record made unique by a copy
number), as gzipped JSONL and as Parquet (or plain JSONL), indexes it, then plays single readers
of large jobs one at a time on this machine: reader 0 of P processes x W DataLoader workers, which
builds exactly the micro-batches it would in that job. For each it prints the records it parses
in one whole epoch, the records and bytes it reads to reach them (lines, decompressed bytes, rows
decoded), the time to its first batch fresh and resumed deep into the epoch, and its peak memory
(each reader runs in a process of its own); without a block cache, and with one on this machine
that its first reader fills (``data.block_cache``). Next to it, what the streamed order costs:
every reader parses every record, and a resume re-reads all it skips.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib import resources
from typing import Any

import torch

from embedtune.config import DataConfig
from embedtune.data.collate import TrainBatch
from embedtune.data.index import build_index
from embedtune.data.stream import PairBatches
from embedtune.model.packing import Ragged

READERS = ((1, 1), (1, 8), (8, 8), (64, 8))  # (processes, workers per process): 1, 8, 64 and 512 readers
FORMATS = ("jsonl.gz", "parquet", "jsonl")


def packaged_pairs() -> list[dict[str, Any]]:
    pairs = []
    for name in ("python_docs_qa.jsonl.gz", "manpages_qa.jsonl.gz"):
        with resources.files("embedtune.resources").joinpath(name).open("rb") as raw, \
                gzip.open(raw, "rt", encoding="utf-8") as f:
            pairs += [{"question": r["question"], "answer": r["answer"]} for r in map(json.loads, f)]
    return pairs


def write_shards(folder: str, records: int, shards: int, fmt: str) -> list[str]:
    """``records`` pairs in ``shards`` files; record i is packaged pair i mod n, its question
    tagged with its copy number (so no two records are the same)."""
    os.makedirs(folder, exist_ok=True)
    base = packaged_pairs()
    per = -(-records // shards)
    paths = []
    for shard in range(shards):
        path = os.path.join(folder, f"part-{shard:05d}.{fmt}")
        paths.append(path)
        if os.path.exists(path):
            continue
        rows = []
        for i in range(shard * per, min(records, (shard + 1) * per)):
            pair = base[i % len(base)]
            rows.append({"question": f"{pair['question']} (copy {i // len(base)})", "answer": pair["answer"]})
        tmp = f"{path}.tmp"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp, row_group_size=8192)
        else:
            with (gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) if fmt.endswith(".gz")
                  else open(tmp, "w", encoding="utf-8")) as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
    return paths


def _config(paths: list[str], order: str = "indexed", block_cache: str | None = None) -> Any:
    return DataConfig(train_files=paths, order=order, eval_fraction=0.0, source_field=None, on_bad_record="skip",
                      block_cache=block_cache)


def _cheap_collate(pairs: list[Any]) -> Any:
    """The typed batch without tokens: this bench measures reading, not tokenizing."""
    none = Ragged(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    rows = torch.zeros(len(pairs), dtype=torch.long)
    return TrainBatch(none, none, len(pairs), rows[:0], rows, rows, None, 0, 0)


def reader_case(paths: list[str], index_dir: str, processes: int, workers: int, batch: int, whole: bool,
                done: int, order: str, block_cache: str | None = None) -> dict[str, Any]:
    """One reader (rank 0, worker 0) of ``processes`` x ``workers``, in this process: its first
    batch after ``done`` global batches, and with ``whole`` the rest of its share of the epoch."""
    cfg = _config(paths, order, block_cache)
    dataset = PairBatches(cfg, batch, 1, seed=0, collate=_cheap_collate, num_processes=processes, rank=0)
    if order == "indexed":
        dataset.index = build_index(paths, cfg, index_dir)
    dataset.set_position(0, done)
    started = time.perf_counter()
    if order == "indexed":
        stream = dataset.indexed_batches(0, workers)
    else:
        stream = (b for b in dataset.micro_batches() if b.index % workers == 0)
    next(stream)
    result: dict[str, Any] = {"first_batch_s": time.perf_counter() - started}
    if whole:
        own = 1 + sum(1 for _ in stream)
        reader = dataset.reader
        result.update(micro_batches=own, parsed=reader.parsed, scanned=reader.scanned, total=dataset.index.total,
                      bytes_read=reader.bytes_read, epoch_s=time.perf_counter() - started)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started its program. Not getrusage's ru_maxrss:
    Linux carries that over from the process that forked it (the bench, with its shards in memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: an upper bound


def _in_process(**kwargs: Any) -> dict[str, Any]:
    # It leaves at once when it has printed: pyarrow's thread pool can hang the interpreter's exit
    # after a stream of Parquet was left mid-file, as a first batch leaves it.
    code = ("import json, os, sys; from embedtune.tools.data_bench import reader_case; "
            "print(json.dumps(reader_case(**json.loads(sys.argv[1]))), flush=True); os._exit(0)")
    # Offline: the streamed order reads Parquet through datasets, which would otherwise ask the Hub first.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"a reader case failed ({kwargs['processes']}x{kwargs['workers']}, "
                           f"{kwargs['order']}, block cache {kwargs.get('block_cache')}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/bench_data", help="where the shards and their index are kept "
                        "(reused by later runs)")
    parser.add_argument("--records", type=int, default=11_000_000)
    parser.add_argument("--shards", type=int, default=110)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS[:2]), choices=FORMATS,
                        help="the shards' formats (default: jsonl.gz parquet)")
    parser.add_argument("--batch_size", type=int, default=1024, help="pairs per global batch")
    parser.add_argument("--resume_at", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="records into the epoch to resume at")
    parser.add_argument("--stream_resume", type=int, default=1_000_000,
                        help="records into the epoch to resume the streamed order at, for comparison (0: skip)")
    parser.add_argument("--block_cache", nargs="+", default=["off", "on"], choices=("off", "on"),
                        help="play the readers without a block cache, and with one on this machine that a first "
                        "reader fills (default: both)")
    parser.add_argument("--tables", nargs="+", default=["epoch", "resume", "memory"],
                        choices=("epoch", "resume", "memory"), help="what to measure (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="processes that build the index (default: cores)")
    parser.add_argument("--readers", nargs="+", default=[f"{p}x{w}" for p, w in READERS],
                        help="the jobs played, as PROCESSESxWORKERS (default: 1x1 1x8 8x8 64x8); resuming is timed "
                        "on the first and the last, memory on the last")


def main(args: argparse.Namespace) -> int:
    cores = len(os.sched_getaffinity(0))
    jobs = [tuple(int(n) for n in job.lower().split("x")) for job in args.readers]
    print(f"{args.records:,} records in {args.shards} shards per format; global batch {args.batch_size}; "
          f"{cores} CPUs; one reader at a time, each in its own process")
    for fmt in args.formats:
        folder = os.path.join(args.out, fmt.replace(".", "_"))
        started = time.perf_counter()
        paths = write_shards(folder, args.records, args.shards, fmt)
        wrote = time.perf_counter() - started
        index_dir = os.path.join(folder, "index")
        started = time.perf_counter()
        index = build_index(paths, _config(paths), index_dir, workers=args.workers or cores)
        indexed = time.perf_counter() - started
        size = sum(os.path.getsize(p) for p in paths)
        print(f"\n{fmt}: {size / 1e9:.2f} GB, {index.total:,} training pairs in {len(index.blocks):,} blocks; "
              f"written in {wrote:.0f} s, indexed in {indexed:.0f} s ({index.built} file(s) indexed now, once; "
              f"{(index.built and index.total / indexed) or 0:,.0f} records/s)")
        common: dict[str, Any] = {"paths": paths, "index_dir": index_dir, "batch": args.batch_size}
        cache = os.path.join(folder, "block_cache")
        shutil.rmtree(cache, ignore_errors=True)
        if "epoch" in args.tables:
            for mode in args.block_cache:
                _epoch_table(fmt, {**common, "block_cache": cache if mode == "on" else None}, jobs)
            print(f"streamed order: every reader parses all {index.total:,} records per epoch, whatever the number "
                  "of readers")
        common["block_cache"] = cache if args.block_cache[-1] == "on" else None  # the last setting, from here
        if "resume" in args.tables:
            _resume_table(common, jobs, args.resume_at, args.stream_resume, index.total)
        if "memory" in args.tables:
            # Memory must not grow with the data: the same reader on a tenth of the shards.
            tenth = paths[:max(1, len(paths) // 10)]
            build_index(tenth, _config(tenth), index_dir, workers=args.workers or cores)
            processes, workers = jobs[-1]
            small = _in_process(**{**common, "paths": tenth}, processes=processes, workers=workers, whole=True,
                                done=0, order="indexed")
            large = _in_process(**common, processes=processes, workers=workers, whole=True, done=0, order="indexed")
            print(f"peak RSS of reader 0 of {processes * workers}: {small['peak_rss_mib']:.0f} MiB on {len(tenth)} "
                  f"shard(s) ({small['total']:,} pairs), {large['peak_rss_mib']:.0f} MiB on {len(paths)} "
                  f"({large['total']:,} pairs)")
        shutil.rmtree(cache, ignore_errors=True)
    return 0


def _epoch_table(fmt: str, common: dict[str, Any], jobs: list[tuple[int, ...]]) -> None:
    """A whole epoch of each job's reader 0: what it parses and reads, its time and memory."""
    if common["block_cache"]:
        filled = _in_process(**common, processes=1, workers=1, whole=True, done=0, order="indexed")
        print(f"with a block cache on this machine, filled by its first reader in {filled['epoch_s']:.1f} s "
              f"(once per machine: {_gb(common['block_cache']):.2f} GB), then:")
    else:
        print("without a block cache:")
    print(f"{'readers':>8} {'P x W':>7} {'parsed/reader/epoch':>20} {'x readers/total':>16} "
          f"{'read/reader/epoch':>18} {'MB read':>8} {'first batch s':>14} {'epoch s':>8} {'peak RSS MiB':>13}")
    for processes, workers in jobs:
        row = _in_process(**common, processes=processes, workers=workers, whole=True, done=0, order="indexed")
        readers = processes * workers
        megabytes = "-" if fmt == "parquet" else f"{row['bytes_read'] / 1e6:,.1f}"
        print(f"{readers:>8} {f'{processes}x{workers}':>7} {row['parsed']:>20,} "
              f"{row['parsed'] * readers / row['total']:>16.3f} {row['scanned']:>18,} {megabytes:>8} "
              f"{row['first_batch_s']:>14.2f} {row['epoch_s']:>8.1f} {row['peak_rss_mib']:>13.0f}")


def _resume_table(common: dict[str, Any], jobs: list[tuple[int, ...]], resume_at: list[int], stream_resume: int,
                  total: int) -> None:
    """The first batch of the first and the last job's reader 0, fresh and resumed deep into the
    epoch, next to the streamed order's."""
    batch = common["batch"]
    print(f"{'resumed at':>12} {'readers':>8} {'first batch s':>14} {'fresh s':>8} {'ratio':>6}  (medians of 3)")
    for processes, workers in dict.fromkeys((jobs[0], jobs[-1])):
        fresh = _first_batch(common, processes, workers, 0)
        for at in resume_at:
            if at >= total:
                print(f"{at:>12,} {'':>8} (past the {total:,} pairs of the epoch)")
                continue
            resumed = _first_batch(common, processes, workers, at // batch)
            print(f"{at:>12,} {processes * workers:>8} {resumed:>14.3f} {fresh:>8.3f} {resumed / fresh:>6.2f}")
    if stream_resume and stream_resume < total:
        streamed = {**common, "block_cache": None}
        fresh = _in_process(**streamed, processes=1, workers=1, whole=False, done=0, order="stream")
        resumed = _in_process(**streamed, processes=1, workers=1, whole=False, done=stream_resume // batch,
                              order="stream")
        print(f"streamed order, 1 reader: first batch {fresh['first_batch_s']:.2f} s fresh, "
              f"{resumed['first_batch_s']:.2f} s resumed {stream_resume:,} in "
              f"({resumed['first_batch_s'] / fresh['first_batch_s']:.1f}x)")


def _first_batch(common: dict[str, Any], processes: int, workers: int, done: int, times: int = 3) -> float:
    """Seconds to a reader's first batch after ``done`` global batches: the median of ``times``
    processes (a single one, at hundredths of a second, measures the machine more than the reader)."""
    return statistics.median(_in_process(**common, processes=processes, workers=workers, whole=False, done=done,
                                         order="indexed")["first_batch_s"] for _ in range(times))


def _gb(folder: str) -> float:
    return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file()) / 1e9
