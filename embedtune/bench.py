"""Benchmarks that print figures: ``embedtune bench resume``.

``resume`` measures what resuming deep into a stream costs: the time to the first training batch
of a fresh run against one resumed N examples in, on a generated JSONL file. The resumed loader
reads and re-orders the records it skips (that is what makes the order exact) but does not
tokenize them; the figures show what tokenizing them again would have cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from embedtune.collate import PairCollator
from embedtune.config import DataConfig
from embedtune.data import PairBatches, make_loader

WORDS = ("how do i read write open close parse format join split sort filter map reduce encode decode "
         "file path string list dict set tuple number date time socket thread process queue lock "
         "return value error exception argument option default buffer stream line byte text").split()


def write_pairs(path: str, count: int, seed: int = 0) -> None:
    """Q&A-shaped records: 8-16 word questions, 40-120 word answers."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            question = " ".join(rng.choices(WORDS, k=rng.randint(8, 16)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(40, 120)))
            f.write(json.dumps({"question": f"{question} {i}?", "answer": answer}) + "\n")


def first_batch_seconds(dataset: PairBatches, workers: int, done: int) -> float:
    dataset.set_position(0, done)
    started = time.perf_counter()
    next(iter(make_loader(dataset, workers, pin_memory=False)))
    return time.perf_counter() - started


def bench_resume(examples: int, batch_size: int, workers: int, tokenizer_name: str) -> dict[str, float]:
    from transformers import AutoTokenizer

    from embedtune.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))
    collate = PairCollator(tokenizer, 64, 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        started = time.perf_counter()
        write_pairs(path, examples + batch_size)
        print(f"wrote {examples + batch_size:,} records ({os.path.getsize(path) / 1e6:.0f} MB) "
              f"in {time.perf_counter() - started:.1f} s")
        cfg = DataConfig(train_files=[path], eval_fraction=0.0, num_workers=workers)
        dataset = PairBatches(cfg, batch_size, 1, seed=0, collate=collate)
        fresh = first_batch_seconds(dataset, workers, 0)
        resumed = first_batch_seconds(dataset, workers, examples // batch_size)
        sample = [p for _, p in zip(range(20 * batch_size), dataset.micro_batches())]
        started = time.perf_counter()
        for batch in sample:
            collate(batch.pairs)
        tokenize_rate = sum(len(b.pairs) for b in sample) / (time.perf_counter() - started)
    skipped = examples // batch_size * batch_size
    return {"examples_skipped": skipped, "fresh_first_batch_s": fresh, "resumed_first_batch_s": resumed,
            "skip_rate_per_s": skipped / max(resumed - fresh, 1e-9), "tokenize_rate_per_s": tokenize_rate,
            "retokenizing_would_add_s": skipped / tokenize_rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedtune bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    resume = sub.add_parser("resume", help="time to the first batch, fresh vs resumed deep into the stream")
    resume.add_argument("--examples", type=int, default=1_000_000, help="examples already trained on")
    resume.add_argument("--batch_size", type=int, default=256)
    resume.add_argument("--workers", type=int, default=2)
    resume.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2")
    args = parser.parse_args(argv)
    figures = bench_resume(args.examples, args.batch_size, args.workers, args.tokenizer)
    print(f"batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"time to the first batch, fresh run:            {figures['fresh_first_batch_s']:8.2f} s")
    print(f"time to the first batch, resumed {figures['examples_skipped']:,} in: "
          f"{figures['resumed_first_batch_s']:8.2f} s")
    print(f"records skipped (read and re-ordered, not tokenized): {figures['skip_rate_per_s']:,.0f} /s")
    print(f"tokenizing pairs:                                 {figures['tokenize_rate_per_s']:,.0f} /s")
    print(f"re-tokenizing the skipped pairs would add:   {figures['retokenizing_would_add_s']:8.1f} s")
    return 0
