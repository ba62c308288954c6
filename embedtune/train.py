"""The training program: config -> Accelerator -> parts -> one loop -> export.

``accelerate launch train.py``, ``python train.py`` and ``embedtune train`` all end up in
``main`` here, so there is one loop to read.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from embedtune.collate import PairCollator
from embedtune.config import Config, ConfigError, parse_args
from embedtune.data import (
    DataError,
    PairBatches,
    count_train_pairs,
    eval_pairs,
    format_stream_reject,
    make_loader,
    preflight,
)
from embedtune.evaluate import RetrievalSet, encode_texts, evaluate, format_table
from embedtune.losses import build_loss
from embedtune.model import EmbeddingModel, ModelLoadError
from embedtune.tracking import RunLog, setup_logging

logger = logging.getLogger("embedtune")


def cpu_processes() -> bool:
    """Several processes but no GPU (torchrun, or accelerate launch's multi-process launcher):
    Accelerate only sets up gloo when told it runs on the CPU, and would otherwise run each
    process as if it were alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def planned_steps(cfg: Config, num_processes: int) -> int:
    """Optimizer steps in the run; without max_steps this counts the data once (no parsing)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    pairs = count_train_pairs(cfg.data)
    full, rest = divmod(pairs, cfg.train.batch_size)
    keeps_rest = not cfg.data.drop_last and rest >= cfg.train.gradient_accumulation_steps * num_processes
    return max(1, (full + keeps_rest) * cfg.train.epochs)


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as in BERT fine-tuning recipes.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, fused=device.type == "cuda")


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def train(cfg: Config) -> dict[str, Any]:
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="wandb" if cfg.tracking.report_to == "wandb" else None,
        project_dir=cfg.output_dir,
    )
    setup_logging(cfg.output_dir, accelerator.is_main_process)
    set_seed(cfg.train.seed)
    rejected_early = preflight(cfg.data)  # a broken file stops here, before any heavy work
    if rejected_early:
        logger.warning("%d bad record(s) in the first records; they will be skipped", len(rejected_early))
    model, tokenizer = EmbeddingModel.from_pretrained(cfg.model.base_model, cfg.model.pooling, cfg.model.normalize)
    run = RunLog(cfg, accelerator)  # the W&B run starts once the data and the model are known to load

    collate = PairCollator(tokenizer, cfg.data.query_max_length, cfg.data.document_max_length,
                           cfg.data.query_prefix, cfg.data.document_prefix)
    held_out = RetrievalSet.from_pairs(eval_pairs(cfg.data))
    dataset = PairBatches(cfg.data, cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.seed,
                          collate, accelerator.num_processes, accelerator.process_index)
    loader = make_loader(dataset, cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda")
    total_steps = planned_steps(cfg, accelerator.num_processes)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    # The schedule is stepped once per optimizer step by hand: Accelerate's wrapper would step
    # it once per process, which is wrong when batch_size is already global.
    scheduler = get_scheduler(cfg.train.scheduler if cfg.train.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = build_loss(cfg.loss.name, cfg.loss.scale, cfg.loss.symmetric, cfg.loss.gather_across_processes)

    def run_eval() -> dict[str, float]:
        def encode(texts: list[str], kind: str) -> torch.Tensor:
            tokenize = collate.queries if kind == "query" else collate.documents
            return encode_texts(model, tokenize, texts, cfg.eval.batch_size, accelerator)
        return evaluate(encode, held_out, cfg.eval.k, compute=accelerator.is_main_process) if len(held_out) else {}

    before = run_eval() if cfg.eval.before else None
    if before:
        run.log({f"eval/{k}": v for k, v in before.items()}, step=0)
        logger.info("held-out before training (%d queries): %s", len(held_out), before)

    logger.info("training %d steps of %d pairs (%d per process per micro-batch)", total_steps,
                cfg.train.batch_size, cfg.train.batch_size // cfg.train.gradient_accumulation_steps
                // accelerator.num_processes)
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not accelerator.is_main_process)
    step = epoch = examples = skipped = 0
    window_loss = torch.zeros((), device=accelerator.device)
    window_pairs, window_micro, window_start, grad_norm = 0, 0, time.perf_counter(), None
    started = time.perf_counter()
    while step < total_steps and (cfg.train.max_steps or epoch < cfg.train.epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            if batch["rejects"]:
                if cfg.data.on_bad_record == "error":
                    raise DataError(format_stream_reject(batch["rejects"][0]))
                run.reject(batch["rejects"], first_epoch=epoch == 0)
            if not batch["global_size"]:
                continue
            with accelerator.accumulate(model):
                queries = model(**to_device(batch["query"], accelerator.device))
                documents = model(**to_device(batch["document"], accelerator.device))
                n = batch["num_positives"]
                # Each process's loss is the mean over its own queries. Weighting it by its share
                # of the global batch makes the gradient, after Accelerate divides by the
                # accumulation steps and DDP averages over processes, that of the mean over the
                # whole global batch, even when slices differ in size (a last partial batch).
                share = n * accelerator.num_processes * cfg.train.gradient_accumulation_steps / batch["step_size"]
                loss = loss_fn(queries, documents[:n], documents[n:]) * share
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
                    # DeepSpeed clips inside its engine and may report no norm.
                    finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
                    # A non-finite gradient never reaches the weights. Under fp16 the loss scaler
                    # skips that update itself and must see it to lower the scale.
                    if finite or accelerator.scaler is not None:
                        optimizer.step()
                    if not finite:
                        skipped += 1
                        logger.warning("step %d: non-finite gradient norm, update skipped", step + 1)
                optimizer.zero_grad(set_to_none=True)
            window_loss += loss.detach()
            window_micro += 1
            window_pairs += batch["global_size"]
            examples += batch["global_size"]
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.tracking.log_every_n_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = accelerator.reduce(window_loss, "mean").item() / window_micro
                metrics = {"train/loss": mean_loss, "train/lr": lr,
                           "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm), "train/pairs_per_s": window_pairs / elapsed,
                           "train/epoch": epoch, "train/skipped_steps": skipped}
                run.log(metrics, step=step)
                run.progress(completed=False, step=step, epoch=epoch, examples_seen=examples,
                             duration_s=time.perf_counter() - started, eval_before=before)
                bar.set_postfix(loss=f"{mean_loss:.4f}", pairs_s=f"{window_pairs / elapsed:.1f}")
                window_loss.zero_()
                window_pairs, window_micro, window_start = 0, 0, time.perf_counter()
            if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step < total_steps:
                run.log({f"eval/{k}": v for k, v in run_eval().items()}, step=step)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()

    after = run_eval()
    if after:
        run.log({f"eval/{k}": v for k, v in after.items()}, step=step)
        logger.info("held-out metrics (%d queries, %d documents):\n%s", len(held_out), len(held_out.corpus),
                    format_table(before, after))
    final_dir = run.save_model(model, tokenizer)
    summary = {"completed": True, "processes": accelerator.num_processes, "step": step, "epoch": epoch,
               "examples_seen": examples,
               "duration_s": time.perf_counter() - started, "skipped_steps": skipped,
               "eval_before": before, "eval_after": after, "final_model": final_dir}
    run.progress(**summary)
    run.finish()
    return summary


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    try:
        cfg = parse_args(argv, prog=prog)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (DataError, ConfigError, ModelLoadError) as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
