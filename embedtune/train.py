"""The training program: config -> Accelerator -> parts -> one loop -> export.

``accelerate launch train.py``, ``python train.py`` and ``embedtune train`` all end up in
``main`` here, so there is one loop to read.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from embedtune import checkpoint
from embedtune.checkpoint import CheckpointError, TrainerState
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
from embedtune.distributed import any_process
from embedtune.evaluate import RetrievalSet, encode_texts, example_columns, example_rows, format_table, run_retrieval
from embedtune.losses import build_loss, check_data_shape, make_step
from embedtune.model import EmbeddingModel, ModelLoadError
from embedtune.model_card import data_fingerprint, write_model_card
from embedtune.tracking import RunLog, setup_logging

logger = logging.getLogger("embedtune")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. gradients keep blowing up); a checkpoint was saved."""


def cpu_processes() -> bool:
    """Several processes but no GPU (torchrun, or accelerate launch's multi-process launcher):
    Accelerate only sets up gloo when told it runs on the CPU, and would otherwise run each
    process as if it were alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def planned_steps(cfg: Config) -> int:
    """Optimizer steps in the run; without max_steps this counts the data once (no parsing)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    pairs = count_train_pairs(cfg.data)
    full, rest = divmod(pairs, cfg.train.batch_size)
    return max(1, (full + (rest > 0 and not cfg.data.drop_last)) * cfg.train.epochs)


def held_out_set(cfg: Config) -> RetrievalSet:
    """The eval.*_file retrieval set when given, else the held-out pairs."""
    if cfg.eval.queries_file and cfg.eval.corpus_file and cfg.eval.qrels_file:
        return RetrievalSet.from_files(cfg.eval.queries_file, cfg.eval.corpus_file, cfg.eval.qrels_file,
                                       cfg.data.max_eval_queries)
    return RetrievalSet.from_pairs(eval_pairs(cfg.data))


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as in BERT fine-tuning recipes.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, fused=device.type == "cuda")


def skips_on_device(optimizer: Any, accelerator: Accelerator) -> bool:
    """Whether a non-finite update can be skipped without the host looking: fused AdamW takes a
    ``found_inf`` flag on the device, as it does from a loss scaler."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return accelerator.scaler is None and bool(getattr(inner, "defaults", {}).get("fused"))


def apply_update(optimizer: Any, grad_norm: torch.Tensor | None, accelerator: Accelerator) -> torch.Tensor:
    """Step the optimizer unless the gradient norm is not finite; 1.0 on the device when skipped.

    A non-finite gradient never reaches the weights. Under fp16 the loss scaler skips that update
    itself and must see it to lower its scale.
    """
    if grad_norm is None:  # DeepSpeed clips inside its engine and may report no norm
        optimizer.step()
        return torch.zeros((), device=accelerator.device)
    bad = (~torch.isfinite(torch.as_tensor(grad_norm, device=accelerator.device))).float()
    if skips_on_device(optimizer, accelerator):
        getattr(optimizer, "optimizer", optimizer).found_inf = bad
        optimizer.step()
    elif accelerator.scaler is not None or not bool(bad):
        optimizer.step()
    return bad


@contextmanager
def stop_signals() -> Iterator[dict[str, bool]]:
    """SIGTERM / SIGINT ask the loop to finish its step, save and exit; a second one kills."""
    flag = {"stop": False}

    def ask(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        logger.warning("%s received: finishing this step, saving a checkpoint, then exiting",
                       signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, ask)
    except ValueError:  # not the main thread: leave the signals alone
        pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def release(accelerator: Accelerator) -> None:
    """Free the DDP model on every process together, while all of them are still there.

    Left to garbage collection when ``train`` returns, the DDP reducer takes the gloo process
    group down with it, and a process whose peers had already exited could wait for them forever.
    (``end_training`` then destroys the process group itself.)
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()


def train(cfg: Config) -> dict[str, Any]:
    loss_fn = build_loss(cfg.loss)
    check_data_shape(loss_fn, cfg.data, cfg.loss.name)  # a loss without its data never starts a run
    step_fn = make_step(cfg.loss)
    if not cfg.checkpoint.resume_from and checkpoint.complete_checkpoints(cfg.output_dir):
        raise CheckpointError(f"{cfg.output_dir} already holds checkpoints of an earlier run: continue it with "
                              "--resume_from_checkpoint latest, or give another output_dir (or delete "
                              f"{checkpoint.checkpoints_dir(cfg.output_dir)})")
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="wandb" if cfg.tracking.report_to == "wandb" else None,
        project_dir=cfg.output_dir,
    )
    micro = cfg.train.batch_size // cfg.train.gradient_accumulation_steps
    if micro < accelerator.num_processes:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} / gradient_accumulation_steps "
                          f"{cfg.train.gradient_accumulation_steps} = {micro} pairs per micro-batch, fewer than the "
                          f"{accelerator.num_processes} processes: raise the batch size or lower the accumulation")
    setup_logging(cfg.output_dir, accelerator.is_main_process)
    set_seed(cfg.train.seed)
    state = TrainerState(config=cfg.to_dict())
    resume_dir = None
    if cfg.checkpoint.resume_from:
        resume_dir = checkpoint.find_checkpoint(cfg.output_dir, cfg.checkpoint.resume_from)
        state = TrainerState.load(resume_dir)
        for change in checkpoint.check_resume(state.config, cfg):
            logger.info("changed since the checkpoint: %s", change)
        state.config = cfg.to_dict()
    rejected_early = preflight(cfg.data)  # a broken file stops here, before any heavy work
    if rejected_early:
        logger.warning("%d bad record(s) in the first records; they will be skipped", len(rejected_early))
    model, tokenizer = EmbeddingModel.from_pretrained(cfg.model.base_model, cfg.model.pooling, cfg.model.normalize)
    if cfg.model.unpad:
        model.enable_packing(tokenizer)
    # The W&B run starts once the data and the model are known to load.
    run = RunLog(cfg, accelerator, resume_step=state.step if resume_dir else None, wandb_id=state.wandb_run_id)

    chunks = cfg.model.padded_chunks
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if chunks > 1 and (accelerator.distributed_type == DistributedType.FSDP
                       or getattr(plugin, "zero_stage", 0) == 3):
        logger.info("model.padded_chunks=%d not used with sharded weights (FSDP, ZeRO-3): each chunk would gather "
                    "them again", chunks)
        chunks = 1
    model.padded_chunks = chunks
    collate = PairCollator(tokenizer, cfg.data.query_max_length, cfg.data.document_max_length,
                           cfg.data.query_prefix, cfg.data.document_prefix, padded_chunks=chunks)
    held_out = held_out_set(cfg)
    dataset = PairBatches(cfg.data, cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.seed,
                          collate, accelerator.num_processes, accelerator.process_index,
                          all_ids=cfg.tracking.log_batch_ids)
    loader = make_loader(dataset, cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda")
    total_steps = planned_steps(cfg)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    # The schedule is stepped once per optimizer step by hand: Accelerate's wrapper would step
    # it once per process, which is wrong when batch_size is already global.
    scheduler = get_scheduler(cfg.train.scheduler if cfg.train.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.unwrap_model(model).keep_packing_for(accelerator.device,
                                                     accelerator.mixed_precision in ("bf16", "fp16"))
    if cfg.model.compile or (cfg.model.compile is None and accelerator.device.type == "cuda"):
        # In place, so parameter names (checkpoints, export) stay as they are; shapes vary with
        # every batch, hence dynamic.
        accelerator.unwrap_model(model).encoder.compile(dynamic=True)
    if resume_dir:
        checkpoint.load(accelerator, resume_dir)  # weights, optimizer, schedule, scaler, RNG; weights-only
        logger.info("resumed from %s: step %d, epoch %d, %d batches into it", resume_dir, state.step,
                    state.epoch, state.batches_in_epoch)

    def run_eval(step: int) -> dict[str, float]:
        """Evaluate (collective), log the metrics and a table of example retrievals at ``step``."""
        if not len(held_out):
            return {}

        def encode(texts: list[str], kind: str) -> torch.Tensor:
            tokenize = collate.queries if kind == "query" else collate.documents
            return encode_texts(model, tokenize, texts, cfg.eval.batch_size, accelerator)
        result = run_retrieval(encode, held_out, cfg.eval.k, compute=accelerator.is_main_process)
        metrics = result.metrics if result is not None else {}
        run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if result is not None and cfg.eval.examples:
            run.table("eval/examples", example_columns(cfg.eval.k),
                      example_rows(result, held_out, cfg.eval.examples, cfg.eval.k), step=step)
        return metrics

    saved_at = [-1]

    def save_checkpoint() -> None:
        saved_at[0] = state.step
        score = None
        if cfg.checkpoint.best_metric:
            metrics = run_eval(state.step)
            score = metrics.get(cfg.checkpoint.best_metric)
        state.wandb_run_id = run.wandb_id
        state.duration_s = duration()
        try:
            path = checkpoint.save(accelerator, cfg.output_dir, state, cfg.checkpoint.keep_last,
                                   cfg.checkpoint.best_metric, score)
            logger.info("checkpoint %s", path)
        except CheckpointError as exc:
            if cfg.checkpoint.on_save_error == "stop":
                raise
            logger.error("%s Training goes on (checkpoint.on_save_error=continue).", exc)

    if not resume_dir and cfg.eval.before:
        state.eval_before = run_eval(0) or None
        if state.eval_before:
            logger.info("held-out before training (%d queries): %s", len(held_out), state.eval_before)

    logger.info("training %d steps of %d pairs (%d per process per micro-batch)", total_steps,
                cfg.train.batch_size, cfg.train.batch_size // cfg.train.gradient_accumulation_steps
                // accelerator.num_processes)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process)
    window_loss = torch.zeros((), device=accelerator.device)
    window_pairs, window_micro, window_start, grad_norm = 0, 0, time.perf_counter(), None
    window_tokens = [0, 0]  # real and computed tokens this process encoded
    nonfinite = torch.tensor(float(state.nonfinite_in_a_row), device=accelerator.device)
    skipped = torch.zeros((), device=accelerator.device)
    skipped_before, skipped_at_start = 0, state.skipped_steps
    fused_skip = skips_on_device(optimizer, accelerator)
    packed = accelerator.unwrap_model(model).packed
    started, duration_before = time.perf_counter(), state.duration_s

    def duration() -> float:
        return duration_before + time.perf_counter() - started

    stopped_early = False
    model.train()  # from_pretrained hands the encoder over in eval mode: dropout would stay off
    with stop_signals() as signals:
        # max_steps stops by steps; otherwise the epochs decide (total_steps is then exact but
        # only shapes the schedule and the progress bar).
        while state.step < total_steps if cfg.train.max_steps else state.epoch < cfg.train.epochs:
            dataset.set_position(state.epoch, state.batches_in_epoch)
            steps_before = state.step
            for batch in loader:
                run.step = state.step + 1
                if batch["rejects"]:
                    if cfg.data.on_bad_record == "error":
                        raise DataError(format_stream_reject(batch["rejects"][0]))
                    run.reject(batch["rejects"], first_epoch=state.epoch == 0)
                if not batch["step_size"]:  # only bad records, no pairs
                    continue
                if "all_ids" in batch:
                    run.batch_ids(state.step + 1, batch["all_ids"])
                with accelerator.accumulate(model):
                    # Each process's loss is the mean over its own pairs. Weighting it by its
                    # share of the global batch makes the gradient, after Accelerate divides by
                    # the accumulation steps and DDP averages over processes, that of the mean
                    # over the whole global batch, even when slices differ (a last partial batch).
                    n = 0 if batch.get("empty") else batch["num_positives"]
                    share = n * accelerator.num_processes * cfg.train.gradient_accumulation_steps / batch["step_size"]
                    loss = step_fn(model, batch, loss_fn, share, accelerator)  # forward and backward
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
                        bad = apply_update(optimizer, grad_norm, accelerator)
                        nonfinite = (nonfinite + bad) * bad  # the run of skipped steps, on the device
                        skipped += bad
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss
                window_micro += 1
                window_pairs += batch["global_size"]
                if not batch.get("empty"):
                    # Packed batches compute no padding at all.
                    window_tokens[0] += batch["real_tokens"]
                    window_tokens[1] += batch["real_tokens" if packed else "padded_tokens"]
                state.examples_seen += batch["global_size"]
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                scheduler.step()
                state.step += 1
                state.batches_in_epoch += 1
                bar.update(1)
                every = cfg.checkpoint.every_n_steps
                log_now = state.step % cfg.tracking.log_every_n_steps == 0 or state.step == total_steps
                # The skipped-update counters are read where the loop syncs anyway (logging,
                # saving), or every step when the update itself needed the host to decide.
                stop = any_process(signals["stop"], accelerator.device)
                if not fused_skip or log_now or stop or (every and state.step % every == 0):
                    in_a_row, total_skipped = (int(v) for v in torch.stack([nonfinite, skipped]).tolist())
                    if total_skipped > skipped_before:
                        logger.warning("step %d: %d update(s) skipped for a non-finite gradient norm (%d in all)",
                                       state.step, total_skipped - skipped_before, total_skipped)
                    skipped_before = total_skipped
                    state.skipped_steps = skipped_at_start + total_skipped
                    state.nonfinite_in_a_row = in_a_row
                    if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                        save_checkpoint()
                        raise TrainingStopped(
                            f"{state.nonfinite_in_a_row} steps in a row had a non-finite gradient (up to step "
                            f"{state.step}); stopped with a checkpoint. Lower train.learning_rate, check the "
                            "data, or use bf16 rather than fp16, then resume with --resume_from_checkpoint latest.")
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = accelerator.reduce(window_loss, "mean").item() / window_micro
                    real, padded = accelerator.reduce(torch.tensor(window_tokens, device=accelerator.device),
                                                      "sum").tolist()
                    metrics = {"train/loss": mean_loss, "train/lr": lr,
                               "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                               "train/pairs_per_s": window_pairs / elapsed, "train/tokens_per_s": real / elapsed,
                               "train/padding_efficiency": real / max(padded, 1), "train/epoch": state.epoch,
                               "train/skipped_steps": state.skipped_steps}
                    if accelerator.device.type == "cuda":
                        metrics["train/gpu_mem_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                    if hasattr(loss_fn, "pop_stats"):
                        metrics.update({f"train/{k}": v for k, v in loss_fn.pop_stats().items()})
                    run.log(metrics, step=state.step)
                    run.progress(completed=False, step=state.step, epoch=state.epoch,
                                 examples_seen=state.examples_seen, duration_s=duration(),
                                 eval_before=state.eval_before)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", pairs_s=f"{window_pairs / elapsed:.1f}")
                    window_loss.zero_()
                    window_pairs, window_micro, window_start = 0, 0, time.perf_counter()
                    window_tokens = [0, 0]
                if cfg.eval.every_n_steps and state.step % cfg.eval.every_n_steps == 0 and state.step < total_steps:
                    run_eval(state.step)
                if stop or (every and state.step % every == 0 and state.step < total_steps):
                    save_checkpoint()
                if stop:
                    stopped_early = True
                    break
                if cfg.train.max_steps and state.step >= total_steps:
                    break
            else:  # the epoch's data ran out
                if state.step == steps_before and state.batches_in_epoch == 0:
                    raise DataError("an epoch produced no training batch: every record was held out, bad, or "
                                    "in a dropped partial batch; check data.eval_fraction and train.batch_size")
                state.epoch += 1
                state.batches_in_epoch = 0
                continue
            break
    bar.close()
    if not stopped_early and cfg.checkpoint.every_n_steps and saved_at[0] != state.step:
        save_checkpoint()  # the end state too, so a crash in the final eval or export loses nothing
    if stopped_early:
        logger.warning("stopped at step %d; continue with --resume_from_checkpoint latest", state.step)
        summary = {"completed": False, "processes": accelerator.num_processes, "step": state.step,
                   "epochs_completed": state.epoch, "examples_seen": state.examples_seen, "duration_s": duration(),
                   "skipped_steps": state.skipped_steps, "eval_before": state.eval_before}
        run.progress(**summary)
        model = optimizer = None  # noqa: F841 - drop DDP before the process group goes
        release(accelerator)
        run.finish()
        return summary

    after = run_eval(state.step)
    if after:
        logger.info("held-out metrics (%d queries, %d documents):\n%s", len(held_out), len(held_out.corpus),
                    format_table(state.eval_before, after))
    final_dir = run.save_model(model, tokenizer)
    if accelerator.is_main_process:
        wandb_url = None if run.wandb_run is None or run.wandb_run.offline else run.wandb_run.url
        write_model_card(final_dir, base_model=cfg.model.base_model, config=cfg.to_dict(),
                         fingerprint=data_fingerprint(cfg.data.train_files),
                         eval_before=state.eval_before, eval_after=after or None, wandb_url=wandb_url,
                         num_examples=state.examples_seen, steps=state.step, duration_s=duration(),
                         precision=accelerator.mixed_precision)
    run.summary({**{f"final/{k}": v for k, v in after.items()},
                 **{f"before/{k}": v for k, v in (state.eval_before or {}).items()}})
    epochs_done = state.epoch if cfg.train.max_steps else cfg.train.epochs
    summary = {"completed": True, "processes": accelerator.num_processes, "step": state.step,
               "epochs_completed": epochs_done,
               "examples_seen": state.examples_seen, "duration_s": duration(), "skipped_steps": state.skipped_steps,
               "eval_before": state.eval_before, "eval_after": after, "final_model": final_dir}
    run.progress(**summary)
    model = optimizer = None  # noqa: F841 - drop DDP before the process group goes
    release(accelerator)
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
    except (DataError, ConfigError, ModelLoadError, CheckpointError, TrainingStopped) as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
