"""Benchmarks that print figures: ``embedtune bench throughput``, ``memory``, ``resume``, ``gradcache``, ``negatives`` and ``quality``.

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
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from embedtune.config import DataConfig, parse_args
from embedtune.data.collate import PairCollator
from embedtune.data.records import Pair
from embedtune.data.stream import PairBatches, make_loader
from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import resolve_model_path
from embedtune.tools import data_bench, memory, quality, throughput
from embedtune.training.step import GradCacheStep, plain_step

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


def gradcache_case(batch: int, mini: int | None, query_len: int, doc_len: int, steps: int,
                   model_name: str) -> dict[str, float]:
    """One configuration, in this process: seconds per step and peak memory."""
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    model, tokenizer = EmbeddingModel.from_pretrained(model_name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choices(WORDS, k=words))

    collate = PairCollator(tokenizer, query_len, doc_len)
    step = GradCacheStep(mini) if mini else plain_step
    loss_fn = MultipleNegativesRankingLoss()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        inputs = collate([Pair(str(i), text(query_len), text(doc_len)) for i in range(batch)])
        times.append(memory.timed_step(model, optimizer, step, inputs, loss_fn, accelerator))
    return {"seconds_per_step": sum(times[1:]) / steps, "peak_mib": memory.peak_mib()}


def bench_gradcache(small: int, large: int, mini: int, query_len: int, doc_len: int, steps: int,
                    model_name: str) -> list[dict[str, Any]]:
    """Each case in a fresh process, so the peak memory is its own."""
    cases = [("uncached", small, None), ("cached", large, mini), ("uncached", mini * 4, None),
             ("cached", mini * 4, mini)]
    results = []
    for name, batch, cache in cases:
        code = ("import json; from embedtune.tools.bench import gradcache_case; "
                f"print(json.dumps(gradcache_case({batch}, {cache}, {query_len}, {doc_len}, {steps}, {model_name!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            # The case's own traceback, which capturing its output would otherwise hide.
            raise RuntimeError(f"the {name} case (batch {batch}) failed with status {done.returncode}:\n"
                               f"{done.stderr[-3000:]}")
        results.append({"case": name, "batch": batch, "mini": cache, **json.loads(done.stdout.strip().splitlines()[-1])})
    return results


def bench_negatives(out: str, num_negatives: int, relative_margin: float) -> int:
    """Mine hard negatives for the quickstart data with the base model (held-out records get none
    and lend none), train the quickstart recipe with and without them, and print both results."""
    cfg = parse_args(["--config", "quickstart"])
    mined = os.path.join(out, "python_docs_qa_mined.jsonl")
    os.makedirs(out, exist_ok=True)
    steps = [
        ("mine", ["mine", "--model", cfg.model.base_model, "--input", cfg.data.train_files[0], "--output", mined,
                  "--num-negatives", str(num_negatives), "--relative-margin", str(relative_margin),
                  "--held-out", str(cfg.data.eval_fraction), "--query-max-length", str(cfg.data.query_max_length),
                  "--document-max-length", str(cfg.data.document_max_length)]),
        # Both without the trainer's own mining (train.hard_negatives), to show what the mined file adds.
        ("without", ["train", "--config", "quickstart", f"output_dir={out}/without", "tracking.report_to=none",
                     "train.hard_negatives=null"]),
        ("with", ["train", "--config", "quickstart", f"output_dir={out}/with", "tracking.report_to=none",
                  f"data.train_files=[{mined}]", "data.negatives_field=negatives", "train.hard_negatives=null"]),
    ]
    for name, command in steps:
        for run_dir in (os.path.join(out, "without"), os.path.join(out, "with")):
            if name != "mine" and run_dir.endswith(name) and os.path.isdir(run_dir):
                shutil.rmtree(run_dir)
        started = time.perf_counter()
        print(f"[{name}] embedtune {' '.join(command)}", flush=True)
        if subprocess.run([sys.executable, "-m", "embedtune", *command]).returncode:
            print(f"error: the {name} step failed", file=sys.stderr)
            return 1
        print(f"[{name}] {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for name in ("without", "with"):
        with open(os.path.join(out, name, "training_progress.json"), encoding="utf-8") as f:
            results[name] = json.load(f)
    before = results["without"]["eval_before"]
    names = ["ndcg@10", "mrr@10", "recall@1", "recall@10"]
    print(f"\nheld-out retrieval, quickstart data ({num_negatives} mined negative(s) per pair, relative margin "
          f"{relative_margin})")
    print(f"{'':<28}" + "".join(f"{n:>11}" for n in names))
    for label, values in (("base model", before), ("trained, in-batch negatives", results["without"]["eval_after"]),
                          ("trained, + mined negatives", results["with"]["eval_after"])):
        print(f"{label:<28}" + "".join(f"{values[n]:>11.4f}" for n in names))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedtune bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    resume = sub.add_parser("resume", help="time to the first batch, fresh vs resumed deep into the stream")
    resume.add_argument("--examples", type=int, default=1_000_000, help="examples already trained on")
    resume.add_argument("--batch_size", type=int, default=256)
    resume.add_argument("--workers", type=int, default=2)
    resume.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2")
    cache = sub.add_parser("gradcache", help="GradCache: memory at a large batch, speed at an equal one")
    cache.add_argument("--small", type=int, default=None, help="uncached batch (GPU 256, CPU 32)")
    cache.add_argument("--large", type=int, default=None, help="cached batch (GPU 8192, CPU 512)")
    cache.add_argument("--mini", type=int, default=None, help="GradCache mini-batch (GPU 256, CPU 32)")
    cache.add_argument("--query_len", type=int, default=None, help="words per query (GPU 32, CPU 12)")
    cache.add_argument("--doc_len", type=int, default=None, help="words per document (GPU 192, CPU 48)")
    cache.add_argument("--steps", type=int, default=2)
    cache.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    memory.add_arguments(sub.add_parser("memory", help="peak memory and step time: full fine-tuning, gradient "
                                        "checkpointing, LoRA, both, on a 0.5B decoder"))
    throughput.add_arguments(sub.add_parser("throughput", help="training pairs/s, tokens/s, padding, MFU, memory; "
                                            "--compare runs SentenceTransformerTrainer on the same workload"))
    quality.add_arguments(sub.add_parser("quality", help="held-out quality of the default recipe; --compare trains "
                                         "SentenceTransformerTrainer on the same pairs and seeds, with a paired "
                                         "bootstrap interval on the difference"))
    data_bench.add_arguments(sub.add_parser("data", help="data.order=indexed at cluster scale: records each reader "
                                            "parses, first batch fresh and resumed, memory, for 1 to 512 readers"))
    negatives = sub.add_parser("negatives", help="quickstart trained with and without mined hard negatives, "
                               "held-out metrics side by side")
    negatives.add_argument("--out", default="outputs/negatives")
    negatives.add_argument("--num_negatives", type=int, default=1)
    negatives.add_argument("--relative_margin", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.name == "data":
        return data_bench.main(args)
    if args.name == "negatives":
        return bench_negatives(args.out, args.num_negatives, args.relative_margin)
    if args.name == "quality":
        return quality.main(args)
    if args.name == "throughput":
        return throughput.main(args)
    if args.name == "memory":
        return memory.main(args)
    if args.name == "gradcache":
        gpu = torch.cuda.is_available()
        small, large, mini = args.small or (256 if gpu else 32), args.large or (8192 if gpu else 512), \
            args.mini or (256 if gpu else 32)
        qlen, dlen = args.query_len or (32 if gpu else 12), args.doc_len or (192 if gpu else 48)
        rows = bench_gradcache(small, large, mini, qlen, dlen, args.steps, args.model)
        device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores), fp32"
        print(f"MiniLM-L6, {device}; ~{qlen}-word queries, ~{dlen}-word documents")
        print(f"{'case':<10}{'batch':>7}{'mini':>6}{'s/step':>10}{'pairs/s':>10}{'peak MiB':>10}")
        for r in rows:
            print(f"{r['case']:<10}{r['batch']:>7}{r['mini'] or '-':>6}{r['seconds_per_step']:>10.2f}"
                  f"{r['batch'] / r['seconds_per_step']:>10.1f}{r['peak_mib']:>10.0f}")
        growth = rows[1]["peak_mib"] / rows[0]["peak_mib"]
        slowdown = rows[3]["seconds_per_step"] / rows[2]["seconds_per_step"]
        print(f"cached batch {large} uses {growth:.2f}x the peak memory of uncached batch {small}")
        print(f"at equal batch {mini * 4}, GradCache takes {slowdown:.2f}x the time of the uncached loss")
        return 0
    figures = bench_resume(args.examples, args.batch_size, args.workers, args.tokenizer)
    print(f"batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"time to the first batch, fresh run:            {figures['fresh_first_batch_s']:8.2f} s")
    print(f"time to the first batch, resumed {figures['examples_skipped']:,} in: "
          f"{figures['resumed_first_batch_s']:8.2f} s")
    print(f"records skipped (read and re-ordered, not tokenized): {figures['skip_rate_per_s']:,.0f} /s")
    print(f"tokenizing pairs:                                 {figures['tokenize_rate_per_s']:,.0f} /s")
    print(f"re-tokenizing the skipped pairs would add:   {figures['retokenizing_would_add_s']:8.1f} s")
    return 0
