"""``embedtune bench memory``: peak memory and step time of full fine-tuning, gradient checkpointing,
LoRA, and LoRA with gradient checkpointing, side by side.

The model is a decoder embedder of about half a billion parameters (the shape of Qwen2.5-0.5B,
random weights: memory and speed do not depend on the values) with last-token pooling, built
locally from its config. Each case runs in a fresh process, so its peak is its own: on a GPU the
most memory torch allocated, on the CPU the process's peak resident memory (which includes about
a gigabyte of libraries). One AdamW step over a batch of pairs is timed after one to warm up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

from embedtune.config import LoraSection, TrainConfig
from embedtune.data.collate import PairCollator, TrainBatch
from embedtune.data.records import Pair
from embedtune.files import write_json
from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import resolve_model_path
from embedtune.model.lora import add_adapters
from embedtune.training.devices import checkpoint_activations
from embedtune.training.optim import build_optimizer
from embedtune.training.step import Step, plain_step

CASES = {"full": (False, False), "checkpointing": (True, False), "lora": (False, True),
         "lora + checkpointing": (True, True)}
WORDS = "the a of to in and is for on with as by at from that this it be are was an or not".split()
# Qwen2.5-0.5B's shape; the vocabulary is its size too, though the test tokenizer uses fewer ids.
HALF_BILLION = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 4096}


def decoder_folder(out: str, shape: dict[str, int], tokenizer: str) -> str:
    """A Qwen2-style decoder with random weights and a tokenizer, saved to ``out``."""
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(**shape, tie_word_embeddings=False)).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model_path(tokenizer)).save_pretrained(out)
    return out


def run_case(folder: str, checkpointing: bool, lora: bool, batch: int, length: int) -> dict[str, float]:
    """One case in this process: seconds of one training step and the peak memory."""
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    # The test tokenizer is not the decoder's own; an EOS changes nothing about memory.
    model, tokenizer = EmbeddingModel.from_pretrained(folder, pooling="last", append_eos=False)
    if checkpointing:
        checkpoint_activations(model.encoder)
    if lora:
        model.encoder = add_adapters(model.encoder, LoraSection())
    model.train()
    optimizer = build_optimizer(model, TrainConfig(), accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = random.Random(0)
    pairs = [Pair(str(i), " ".join(rng.choices(WORDS, k=length // 8)), " ".join(rng.choices(WORDS, k=length * 2)))
             for i in range(batch)]
    inputs = PairCollator(tokenizer, max(8, length // 8), length)(pairs)
    loss_fn = MultipleNegativesRankingLoss()
    timed_step(model, optimizer, plain_step, inputs, loss_fn, accelerator)  # warms up
    seconds = timed_step(model, optimizer, plain_step, inputs, loss_fn, accelerator)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"seconds_per_step": seconds, "peak_mib": peak_mib(), "trained": trained, "parameters": total,
            "tokens": int(inputs.real_tokens)}


def timed_step(model: Any, optimizer: Any, step: Step, inputs: TrainBatch, loss_fn: Any,
               accelerator: Accelerator) -> float:
    """Seconds of one optimizer step: forward, backward, update."""
    started = time.perf_counter()
    with accelerator.autocast():
        step(model, inputs, loss_fn, 1.0, accelerator)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def peak_mib() -> float:
    """The most memory torch allocated on the GPU, or this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_memory(shape: dict[str, int], batch: int, length: int, tokenizer: str) -> list[dict[str, Any]]:
    """Every case, each in a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="embedtune-memory-") as folder:
        decoder_folder(folder, shape, tokenizer)
        for name, (checkpointing, lora) in CASES.items():
            code = ("import json; from embedtune.tools.memory import run_case; "
                    f"print(json.dumps(run_case({folder!r}, {checkpointing}, {lora}, {batch}, {length})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode:
                raise RuntimeError(f"the {name} case failed with status {done.returncode}:\n{done.stderr[-3000:]}")
            rows.append({"case": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def report(rows: list[dict[str, Any]], batch: int, length: int) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores), fp32"
    lines = [f"decoder of {rows[0]['parameters'] / 1e6:,.0f}M parameters, last-token pooling, {device}; batch "
             f"{batch} pairs, documents up to {length} tokens ({rows[0]['tokens']:,} tokens a step)",
             f"{'case':<22}{'trained':>12}{'peak MiB':>10}{'s/step':>9}{'memory':>8}{'time':>7}"]
    full = rows[0]
    for row in rows:
        lines.append(f"{row['case']:<22}{row['trained'] / 1e6:>11.1f}M{row['peak_mib']:>10,.0f}"
                     f"{row['seconds_per_step']:>9.2f}{row['peak_mib'] / full['peak_mib']:>7.2f}x"
                     f"{row['seconds_per_step'] / full['seconds_per_step']:>6.2f}x")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (GPU 64, CPU 8)")
    parser.add_argument("--length", type=int, default=None, help="document tokens (GPU 256, CPU 128)")
    parser.add_argument("--layers", type=int, default=HALF_BILLION["num_hidden_layers"],
                        help="decoder layers (24: about 0.5B parameters)")
    parser.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def main(args: argparse.Namespace) -> int:
    gpu = torch.cuda.is_available()
    batch, length = args.batch or (64 if gpu else 8), args.length or (256 if gpu else 128)
    rows = bench_memory({**HALF_BILLION, "num_hidden_layers": args.layers}, batch, length, args.tokenizer)
    print(report(rows, batch, length))
    if args.json:
        write_json(args.json, rows)
    return 0
