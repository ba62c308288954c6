"""The trainer: ``setup()`` builds the parts, ``train()`` runs the loop, ``finish()`` ends the run.

``Trainer.train`` is the loop to read: a few labelled stanzas (micro-step, after the update,
log, evaluate, save or stop), each a call. ``setup`` visits the data in one order: the fail-fast
reads, then the parts (model, data, optimizer), then the trackers, then the resume.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from embedtune.config import Config, ConfigError
from embedtune.data.collate import PairCollator, TrainBatch, query_prefix
from embedtune.data.identity import data_changes, data_identity
from embedtune.data.index import INDEXED_ORDER, build_index, index_place
from embedtune.data.records import DataError, format_stream_reject, resolve_files
from embedtune.data.split import eval_pairs, plan_data, preflight, source_problems, weighted_total
from embedtune.data.stream import PairBatches, make_loader
from embedtune.distributed import any_process, cores_per_process, cpu_processes, release, stop_signals
from embedtune.logs import setup_logging
from embedtune.losses import build_loss, check_loss_data, required_data, requires_negatives
from embedtune.mining.refresh import MinedNegatives, mine_round
from embedtune.model.encoder import EmbeddingModel, position_limit
from embedtune.model.lora import adapter_export_problem, add_adapters, keep_trainable
from embedtune.retrieval import (
    RetrievalSet,
    describe_change,
    example_columns,
    example_rows,
    format_table,
    paired_change,
    run_retrieval,
    set_encoder,
)
from embedtune.training import checkpoint
from embedtune.training.devices import checkpoint_activations, default_precision
from embedtune.training.export import RunFacts, export_model
from embedtune.training.lock import OutputInUse, OutputLock
from embedtune.training.merge import AUTO_SHARES, base_state, choose_share, trained_state, use_share
from embedtune.training.meters import MetricsWindow, NonFiniteGuard
from embedtune.training.optim import (
    apply_resumed_settings,
    apply_update,
    build_optimizer,
    build_scheduler,
    skips_on_device,
)
from embedtune.training.push import HubPush, push_problem
from embedtune.training.state import CheckpointError, TrainerState
from embedtune.training.step import Step, make_step
from embedtune.training.trackers import accelerate_trackers
from embedtune.training.tracking import RunLog

logger = logging.getLogger("embedtune")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. gradients keep blowing up); a checkpoint was saved."""


class Trainer:
    """One training run of ``cfg``: ``setup()``, then ``train()``, which returns the run's summary."""

    # The parts, made by setup() in this order.
    loss_fn: torch.nn.Module
    step_fn: Step  # one micro-step's forward and backward
    require_negatives: bool  # the loss trains on triplets: a record without a hard negative is bad
    accelerator: Accelerator
    state: TrainerState  # what a checkpoint saves besides Accelerate's state
    resume_dir: str | None
    model: Any  # EmbeddingModel, as Accelerate prepared it (DDP, FSDP...)
    tokenizer: Any
    collate: PairCollator
    held_out: RetrievalSet
    total_steps: int
    dataset: PairBatches
    loader: torch.utils.data.DataLoader
    optimizer: Any
    scheduler: Any
    run_log: RunLog  # W&B and the output folder's files
    window: MetricsWindow
    guard: NonFiniteGuard

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.saved_at = -1  # the step of the last checkpoint this process wrote
        self.grad_norm: torch.Tensor | None = None
        self.lr = 0.0  # the rate the last step used
        self.started, self.duration_before = time.perf_counter(), 0.0  # see duration()
        self.lock = OutputLock(cfg.output_dir)
        self.stopped_early = False  # train.early_stopping_patience ended the run
        self.per_query: list[float] | None = None  # the last evaluation's nDCG per query (main process)
        self.general_before: float | None = None  # nDCG on eval.general_files before training (fresh runs)
        self.mined: MinedNegatives | None = None  # train.hard_negatives' latest round
        self.restart_stream = False  # a round just ran: the stream starts again at the position reached
        self.hub: HubPush | None = None  # export.push_to_hub, set up with the trackers
        self.train_pairs: int | None = None  # training pairs in one epoch, when counted

    # --- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_loss()  # a loss without its data never starts a run
        if problem := push_problem(self.cfg):  # nor a push to the Hub that cannot work (no token, offline)
            raise ConfigError(problem)
        self._setup_accelerator()
        self._setup_state()  # a checkpoint that cannot be resumed stops here
        self._check_data()  # a broken file stops here, before any heavy work
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        self._setup_tracking()  # the W&B run starts once the data and the model are known to load
        self._resume()

    def _setup_loss(self) -> None:
        self.loss_fn = build_loss(self.cfg.loss)
        needs = required_data(self.loss_fn)
        check_loss_data(needs, self.cfg.data, self.cfg.loss.distills() or self.cfg.loss.name)
        self.require_negatives = requires_negatives(needs)
        mining = self.cfg.train.hard_negatives
        if mining and self.cfg.loss.distill and not mining.in_batch:
            raise ConfigError("train.hard_negatives would put mined negatives in place of the records' own, whose "
                              "teacher scores (data.scores_field) then score other texts: set train.hard_negatives="
                              "{in_batch: true} (the records keep their negatives) or null, or mine and score with "
                              "`embedtune mine --teacher` before training")
        if mining and needs != "pairs" and not self.cfg.loss.distill:
            raise ConfigError(f"train.hard_negatives trains mined negatives with the in-batch ones, which "
                              f"{self.cfg.loss.name} does not use: choose MultipleNegativesRankingLoss (or its cached "
                              "or symmetric form), or mine once with `embedtune mine` for a triplet loss")
        self.step_fn = make_step(self.cfg.loss)

    def _setup_accelerator(self) -> None:
        cfg = self.cfg
        if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
            raise ConfigError(f"output_dir {cfg.output_dir} is a file, not a folder: give a folder for the run's "
                              "checkpoints, logs and model (it is made if missing)")
        self.accelerator = Accelerator(
            cpu=cpu_processes(),
            mixed_precision=default_precision(cfg),
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=accelerate_trackers(cfg),
            project_dir=cfg.output_dir,
        )
        if problem := cfg.train.processes_problem(self.accelerator.num_processes):
            raise ConfigError(problem)
        earlier = self._lock_output()  # before anything is written there
        if not cfg.checkpoint.resume_from and (problem := checkpoint.earlier_run_problem(cfg.output_dir)):
            raise CheckpointError(problem)
        setup_logging(cfg.output_dir, self.accelerator.is_main_process)
        if earlier:
            logger.info("took over the output folder's lock from a run that ended without releasing it (%s)", earlier)
        set_seed(cfg.train.seed)

    def _lock_output(self) -> str | None:
        """One run per output folder: the main process takes its lock, and every process stops if it
        cannot. Returns the holder of a lock taken over from a run that died."""
        in_use, earlier = None, None
        if self.accelerator.is_main_process:
            try:
                earlier = self.lock.acquire()
            except OutputInUse as exc:
                in_use = exc
        if any_process(in_use is not None, self.accelerator.device):
            raise in_use or OutputInUse(f"{self.cfg.output_dir} is in use by another run (see the main process)")
        return earlier

    def _setup_state(self) -> None:
        cfg, processes = self.cfg, self.accelerator.num_processes
        self.resume_dir = None
        if not cfg.checkpoint.resume_from:
            # What this run reads, saved with every checkpoint.
            self.state = TrainerState(config=cfg.to_dict(), data_files=data_identity(cfg.data), processes=processes,
                                      indexed_order=INDEXED_ORDER)
        else:
            if self.accelerator.is_main_process:  # the output lock is held: no save of this folder is under way
                checkpoint.remove_partial(cfg.output_dir)  # a killed save's half-written folder may fill the disk
            self.accelerator.wait_for_everyone()
            resume = checkpoint.open_resume(cfg)
            saved = resume.state
            if saved.indexed_order > INDEXED_ORDER:
                raise CheckpointError(f"{resume.path}: its data order is version {saved.indexed_order}, newer than "
                                      f"this embedtune's ({INDEXED_ORDER}); resume it with the embedtune that wrote it")
            identity = data_identity(cfg.data, like=saved.data_files)  # each file described as the checkpoint did
            self._check_data_unchanged(saved.data_files, identity)
            if saved.processes and saved.processes != processes:
                resume.changes.append(f"processes: {saved.processes} -> {processes} (the same global batches, "
                                      "split another way)")
            for change in resume.changes:
                logger.info("changed since the checkpoint: %s", change)
            if saved.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                logger.info("the count of non-finite steps in a row (%d) starts again from 0", saved.nonfinite_in_a_row)
                saved.nonfinite_in_a_row = 0
            self.resume_dir, self.state = resume.path, saved
            self.state.config, self.state.data_files, self.state.processes = cfg.to_dict(), identity, processes

    def _check_data_unchanged(self, saved: dict[str, Any], now: dict[str, Any]) -> None:
        """Refuse to resume on data that changed since the checkpoint, unless the config allows it."""
        if not saved:
            logger.info("the checkpoint predates data checks: the data files are not compared")
            return
        changed, harmless = data_changes(saved, now)
        for line in harmless:
            logger.info("data since the checkpoint: %s", line)
        if changed and not self.cfg.checkpoint.allow_data_change:
            raise CheckpointError("cannot resume: the data changed since the checkpoint:\n  " + "\n  ".join(changed)
                                  + "\nRestore the files; or resume with checkpoint.allow_data_change=true to keep "
                                  "the saved position in the changed data (some examples may then be trained twice "
                                  "or not at all); or start a new run in another output_dir.")
        for line in changed:
            logger.warning("data changed since the checkpoint (checkpoint.allow_data_change=true): %s", line)

    def _check_data(self) -> None:
        data = self.cfg.data
        self.index = None
        if data.order == "indexed":
            self._index_data()
            return
        rejected = preflight(data, self.require_negatives)
        if rejected:
            logger.warning("%d bad record(s) in the first records; they will be skipped", len(rejected))

    def _index_data(self) -> None:
        """data.order=indexed: every training file indexed (or its index read from data.index_dir);
        the indexing reads every record, so it is also the check for bad ones."""
        data, accelerator = self.cfg.data, self.accelerator
        folder, keys = index_place(self.cfg)
        files = resolve_files(data.train_files)
        workers = cores_per_process()
        if accelerator.num_processes > 1:
            # Every process indexes its share of the files, on its machine's share of the cores;
            # then each reads the others' from the folder they share.
            failed: Exception | None = None
            try:
                build_index(files[accelerator.process_index::accelerator.num_processes], data, folder,
                            self.require_negatives, workers, keys)
            except Exception as exc:  # the others must not wait for this one forever
                failed = exc
            if any_process(failed is not None, accelerator.device):
                if failed is not None:
                    raise failed
                raise DataError("another process could not index its share of the training files; its log says why")
        self.index = build_index(files, data, folder, self.require_negatives, workers, keys)
        if self.index.bad and data.on_bad_record == "error":
            raise DataError(f"{self.index.bad} bad record(s) in the training files; the first: "
                            + format_stream_reject(self.index.rejects[0]))
        if self.index.bad:
            logger.warning("%d bad record(s) in the training files; they are skipped", self.index.bad)

    def _setup_model(self) -> None:
        model_cfg = self.cfg.model
        self.model, self.tokenizer = EmbeddingModel.from_pretrained(
            model_cfg.base_model, model_cfg.pooling, model_cfg.normalize, trust_remote_code=model_cfg.trust_remote_code,
            append_eos=model_cfg.append_eos)
        self._fit_lengths()
        if model_cfg.unpad:
            self.model.enable_packing(self.tokenizer)
        if model_cfg.gradient_checkpointing:
            checkpoint_activations(self.model.encoder)
        if model_cfg.lora:
            problem = adapter_export_problem() if model_cfg.lora.export == "adapter" else None
            if problem:  # before a step is spent on a model that would not load
                raise ConfigError(problem)
            self.model.encoder = add_adapters(self.model.encoder, model_cfg.lora)
        chunks = model_cfg.padded_chunks
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if chunks > 1 and (self.accelerator.distributed_type == DistributedType.FSDP
                           or getattr(plugin, "zero_stage", 0) == 3):
            logger.info("model.padded_chunks=%d not used with sharded weights (FSDP, ZeRO-3): each chunk would "
                        "gather them again", chunks)
            chunks = 1
        self.model.padded_chunks = chunks
        self.model.layout_by_cost = model_cfg.layout_by_cost

    def _fit_lengths(self) -> None:
        """Query and document lengths no longer than the model's table of positions."""
        data, limit = self.cfg.data, position_limit(self.model.encoder)
        for key in ("query_max_length", "document_max_length"):
            if limit is not None and getattr(data, key) > limit:
                logger.warning("data.%s=%d is more than the %d positions %s has: texts are cut at %d tokens",
                               key, getattr(data, key), limit, self.cfg.model.base_model, limit)
                setattr(data, key, limit)

    def _setup_data(self) -> None:
        """The held-out set and the step count from one pass over the files, then the stream."""
        cfg, accelerator = self.cfg, self.accelerator
        data = cfg.data
        self.collate = PairCollator(self.tokenizer, data.query_max_length, data.document_max_length,
                                    query_prefix(data, self.model.folder), data.document_prefix,
                                    padded_chunks=self.model.padded_chunks)
        beir = cfg.eval.uses_beir_files()
        counted = (not cfg.train.max_steps or bool(data.source_weights) or data.batch_by_source) and self.index is None
        plan = plan_data(data, count=counted, held_out=not beir, require_negatives=self.require_negatives)
        if self.index is not None:  # the index knows the counts
            plan.sources = self.index.sizes()
            plan.train_pairs = weighted_total(plan.sources, data.source_weights)
        if plan.sources is not None:
            problem, notes = source_problems(plan.sources, data, cfg.train.batch_size)
            if problem:
                raise ConfigError(problem)
            for note in notes:
                logger.warning("%s", note)
        if beir:
            self.held_out = RetrievalSet.from_files(cfg.eval.queries_file, cfg.eval.corpus_file, cfg.eval.qrels_file,
                                                    data.max_eval_queries)
        else:
            self.held_out = RetrievalSet.from_pairs(plan.eval_pairs)
        # A task the base model was good at (eval.general_files): watched before and after, and by the merge.
        general = eval_pairs(data.model_copy(update={"eval_files": cfg.eval.general_files, "eval_fraction": 0.0}),
                             self.require_negatives) if cfg.eval.general_files else []
        self.general = RetrievalSet.from_pairs(general)
        # max_steps stops by steps; otherwise the epochs decide (the count is then exact but only
        # shapes the schedule and the progress bar).
        self.total_steps = cfg.train.planned_steps(plan.train_pairs, data.drop_last)
        self.train_pairs = plan.train_pairs  # for the card's dataset_size (None: not counted)
        self.dataset = PairBatches(data, cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.seed,
                                   self.collate, accelerator.num_processes, accelerator.process_index,
                                   all_ids=cfg.tracking.log_batch_ids, require_negatives=self.require_negatives,
                                   sizes=plan.sources)
        self.dataset.index = self.index
        self.dataset.order_version = self.state.indexed_order or 1  # a resumed run keeps its order
        self.loader = make_loader(self.dataset, data.num_workers, pin_memory=accelerator.device.type == "cuda")
        self.mined = MinedNegatives() if cfg.train.hard_negatives else None
        self.dataset.negatives = self.mined
        hard = cfg.train.hard_negatives
        self.dataset.neighbour_window = hard.window if hard and hard.in_batch else None

    def _setup_optimizer(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        optimizer = build_optimizer(self.model, cfg.train, accelerator.device)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.total_steps)
        accelerator.register_for_checkpointing(self.scheduler)
        if self.mined is not None:  # a resumed run trains on the negatives mined before it stopped
            accelerator.register_for_checkpointing(self.mined)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        if cfg.model.lora:  # the frozen weights come from the base model at every start
            accelerator.register_save_state_pre_hook(keep_trainable)
        encoder = accelerator.unwrap_model(self.model)
        encoder.keep_packing_for(accelerator.device, accelerator.mixed_precision in ("bf16", "fp16"))
        self.collate.layouts = encoder.layout_choice(accelerator.device)  # before the workers start
        if cfg.model.compile or (cfg.model.compile is None and accelerator.device.type == "cuda"):
            # In place, so parameter names (checkpoints, export) stay as they are; shapes vary with
            # every batch, hence dynamic.
            encoder.encoder.compile(dynamic=True)

    def _setup_tracking(self) -> None:
        state, accelerator = self.state, self.accelerator
        self.run_log = RunLog(self.cfg, accelerator, resume_step=state.step if self.resume_dir else None,
                              wandb_id=state.wandb_run_id, mlflow_id=state.mlflow_run_id)
        self.window = MetricsWindow(accelerator.device)
        self.hub = HubPush(self.cfg, accelerator) if self.cfg.export.push_to_hub else None
        if self.index is not None and self.index.bad and not self.resume_dir:
            self.run_log.reject(self.index.rejects, first_epoch=True)  # once, with the run that indexed them
        # Reading the counts costs a device sync on a GPU, nothing on the CPU: there, every step.
        self.guard = NonFiniteGuard(accelerator.device, state.nonfinite_in_a_row, state.skipped_steps,
                                    skips_on_device(self.optimizer, accelerator)
                                    and accelerator.device.type != "cpu")

    def _resume(self) -> None:
        if self.resume_dir:
            # Weights, optimizer, schedule, scaler, RNG; every pickled file read weights-only.
            checkpoint.load(self.accelerator, self.resume_dir, trainable_only=self.model if self.cfg.model.lora else None)
            apply_resumed_settings(self.optimizer, self.scheduler, self.cfg.train)
            logger.info("resumed from %s: step %d, epoch %d, %d batches into it", self.resume_dir, self.state.step,
                        self.state.epoch, self.state.batches_in_epoch)

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal) and finish the run; returns its summary."""
        cfg, state = self.cfg, self.state
        if not self.resume_dir and cfg.eval.before:
            state.eval_before = self.evaluate(0) or None
            state.eval_before_per_query = self.per_query
            self.general_before = self._score_general(0)
            if state.eval_before:
                logger.info("held-out before training (%d queries): %s", len(self.held_out), state.eval_before)
        logger.info("training %d steps of %d pairs (%s per process per micro-batch)", self.total_steps,
                    cfg.train.batch_size, cfg.train.pairs_per_process(self.accelerator.num_processes))
        self.started, self.duration_before = time.perf_counter(), state.duration_s
        hard = cfg.train.hard_negatives
        if hard and hard.before_training and not self.resume_dir:
            self._mine()  # with the base model, as a separate `embedtune mine` run would
        self.window.reset()  # its first rates count training only
        self.model.train()  # from_pretrained hands the encoder over in eval mode: dropout would stay off
        try:
            completed = self._loop()
        except DataError as exc:  # a bad record, past the ones read before step 1: keep what was trained
            raise self._saved_on(exc) from None
        return self.finish(completed=completed)

    def _saved_on(self, exc: DataError) -> DataError:
        """``exc``, after a checkpoint of the steps trained since the last one, and how to go on."""
        step = self.state.step
        if step == 0 or (self.saved_at != step and not self.save_checkpoint()):
            return exc
        return DataError(f"{exc}\nThe run stopped with a checkpoint of step {step}: fix the data (then resume with "
                         "checkpoint.allow_data_change=true) or set data.on_bad_record=skip, and resume with "
                         "--resume_from_checkpoint latest.")

    def _loop(self) -> bool:
        """The optimizer steps; False when a stop signal ended them early (after a checkpoint)."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        with stop_signals() as signals, tqdm(total=self.total_steps, initial=state.step, desc="train", unit="step",
                                             disable=not accelerator.is_main_process) as bar:
            while not self.stopped_early and (state.step < self.total_steps if cfg.train.max_steps
                                              else state.epoch < cfg.train.epochs):
                for batch in self._epoch_batches():
                    # micro-step: forward and backward; the update on a step's last micro-batch
                    self._micro_step(batch)
                    if not accelerator.sync_gradients:
                        continue
                    # after the update
                    self.lr = self.scheduler.get_last_lr()[0]  # the rate this step used
                    self.scheduler.step()
                    state.step += 1
                    state.batches_in_epoch += 1
                    bar.update(1)
                    if self._mining_due():  # before a save at this step, which then holds the new negatives
                        self._mine()
                    stop = any_process(signals["stop"], accelerator.device)
                    # log: the host reads the device's counters only where it syncs anyway
                    log_due = state.step % cfg.tracking.log_every_n_steps == 0 or state.step == self.total_steps
                    syncs = log_due or stop or self._due(cfg.checkpoint.every_n_steps)
                    if self.guard.reads_every_step or syncs:
                        self._check_nonfinite(bar)
                    if log_due or stop:  # the step a stop signal ends on is logged too
                        self._log(bar)
                    # evaluate
                    if self._due(cfg.eval.every_n_steps) and state.step < self.total_steps:
                        self.evaluate(state.step)
                    # save or stop
                    if stop or (self._due(cfg.checkpoint.every_n_steps) and state.step < self.total_steps):
                        self.save_checkpoint()
                    if stop:
                        return False
                    if self._no_longer_improving() or (cfg.train.max_steps and state.step >= self.total_steps):
                        break
                else:  # the epoch's data ran out
                    self._next_epoch()
        return True

    def _epoch_batches(self) -> Iterator[TrainBatch]:
        """The batches of the epoch in progress, from the saved position; bad records are dealt
        with here, and a batch of nothing but bad records is not trained on. After a mining round
        the stream starts again from the position reached (the batches read ahead carry the old
        negatives), which is where a run resumed from a checkpoint of that step starts too."""
        cfg, state = self.cfg, self.state
        while True:
            self.dataset.set_position(state.epoch, state.batches_in_epoch)
            self.restart_stream = False
            for batch in self.loader:
                self.run_log.step = state.step + 1
                if batch.rejects:
                    if cfg.data.on_bad_record == "error":
                        raise DataError(format_stream_reject(batch.rejects[0]))
                    self.run_log.reject(batch.rejects, first_epoch=state.epoch == 0)
                if not batch.step_size:  # only bad records, no pairs
                    continue
                if batch.all_ids is not None:
                    self.run_log.batch_ids(state.step + 1, batch.all_ids)
                yield batch
                if self.restart_stream:
                    break
            else:
                return

    def _mining_due(self) -> bool:
        hard = self.cfg.train.hard_negatives
        return bool(hard) and self._due(hard.every_n_steps) and self.state.step < self.total_steps  # type: ignore[union-attr]

    def _mine(self) -> None:
        """A round of train.hard_negatives with the weights of this step (collective); the stream
        picks the new negatives up from the next batch on."""
        assert self.mined is not None
        step = self.state.step
        figures = mine_round(self.model, self.collate, self.cfg, self.accelerator, step, self.mined)
        self.restart_stream = True
        wanted = self.cfg.train.hard_negatives.num  # type: ignore[union-attr]
        logger.info("hard negatives mined with the weights of step %d: %d training pairs against their %d distinct "
                    "answers, %.2f negatives per pair (%d with fewer than %d: the margin left too few), in %.1f s",
                    step, figures.pairs, figures.corpus, figures.found, figures.short, wanted, figures.seconds)
        self.run_log.log({"negatives/seconds": figures.seconds, "negatives/per_pair": figures.found,
                          "negatives/pairs_short": figures.short}, step=step)

    def _next_epoch(self) -> None:
        state = self.state
        if state.batches_in_epoch == 0:  # this pass over the data trained no step
            raise DataError("an epoch produced no training batch: every record was held out, bad, or in a dropped "
                            "partial batch; check data.eval_fraction and train.batch_size")
        state.epoch += 1
        state.batches_in_epoch = 0
        hard = self.cfg.train.hard_negatives
        more = state.step < self.total_steps if self.cfg.train.max_steps else state.epoch < self.cfg.train.epochs
        if hard and hard.every_epoch and more and self.mined is not None and self.mined.step != state.step:
            self._mine()

    def _micro_step(self, batch: TrainBatch) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        with accelerator.accumulate(self.model):
            # Each process's loss is the mean over its own pairs. Weighting it by its share of the
            # global batch makes the gradient, after Accelerate divides by the accumulation steps
            # and DDP averages over processes, that of the mean over the whole global batch, even
            # when slices differ (a last partial batch).
            pairs = 0 if batch.empty else batch.num_positives
            share = pairs * accelerator.num_processes * cfg.train.gradient_accumulation_steps / batch.step_size
            loss = self.step_fn(self.model, batch, self.loss_fn, share, accelerator)  # forward and backward
            if accelerator.sync_gradients:
                self.grad_norm = accelerator.clip_grad_norm_(self.model.parameters(),
                                                             cfg.train.max_grad_norm or math.inf)
                self.guard.record(apply_update(self.optimizer, self.grad_norm, accelerator))
            self.optimizer.zero_grad(set_to_none=True)
        self.window.add(loss, batch)
        self.state.examples_seen += batch.global_size

    def _no_longer_improving(self) -> bool:
        """Early stopping (collective, after a save): the main process holds the scores and decides."""
        patience, state = self.cfg.train.early_stopping_patience, self.state
        if not patience or self.saved_at != state.step:
            return False
        waited = checkpoint.evaluations_since_best(state.scores) if self.accelerator.is_main_process else 0
        if any_process(waited >= patience, self.accelerator.device):
            self.stopped_early = True
            logger.info("stopping early at step %d: %s has not improved over the last %d evaluations", state.step,
                        self.cfg.checkpoint.best_metric, patience)
        return self.stopped_early

    def _paired_change(self, step: int) -> dict[str, float] | None:
        """nDCG's change query by query from the base model to the final one, with a bootstrap
        interval (main process: it holds the per-query figures), logged where the metrics go."""
        before, after = self.state.eval_before_per_query, self.per_query
        if not before or not after or len(before) != len(after):
            return None
        change = paired_change(before, after, seed=self.cfg.train.seed)
        name = f"ndcg@{self.cfg.eval.k}"
        logger.info("%s", describe_change(name, change))
        self.run_log.log({f"eval/{name}_change": change["change"], f"eval/{name}_change_low": change["low"],
                          f"eval/{name}_change_high": change["high"], "eval/queries_better": change["better"],
                          "eval/queries_worse": change["worse"], "eval/queries_same": change["same"]}, step=step)
        return change

    def _restore_best(self) -> int | None:
        """With checkpoint.best_metric, the best checkpoint's weights become the final model;
        returns its step (None when there is none to take)."""
        cfg, accelerator = self.cfg.checkpoint, self.accelerator
        if not cfg.best_metric:
            return None
        chosen = [checkpoint.best_checkpoint(self.state.scores) if accelerator.is_main_process else None]
        broadcast_object_list(chosen)  # the main process holds the scores
        if chosen[0] is None:
            return None
        step = int(chosen[0].removeprefix("step-"))
        if step != self.state.step:
            path = os.path.join(checkpoint.checkpoints_dir(self.cfg.output_dir), chosen[0])
            if not checkpoint.load_weights(accelerator.unwrap_model(self.model), path, bool(self.cfg.model.lora)):
                logger.warning("the best checkpoint's weights are sharded (%s): the final model is the last step's",
                               path)
                return None
            logger.info("the final model is the best checkpoint by %s: step %d (%.4f)", cfg.best_metric, step,
                        self.state.scores.get(chosen[0], float("nan")))
        return step

    def _due(self, every: int | None) -> bool:
        return bool(every) and self.state.step % every == 0  # type: ignore[operator]

    def _check_nonfinite(self, bar: tqdm) -> None:
        state = self.state
        self.guard.read(state.step)
        state.skipped_steps, state.nonfinite_in_a_row = self.guard.skipped, self.guard.in_a_row
        if self.guard.tripped(self.cfg.train.max_nonfinite_steps):
            self._log(bar)  # the step the run stops on is the last line of training_metrics.jsonl
            self.save_checkpoint()
            raise TrainingStopped(
                f"{state.nonfinite_in_a_row} steps in a row had a non-finite gradient (up to step {state.step}); "
                "stopped with a checkpoint. Lower train.learning_rate, check the data, or use bf16 rather than "
                "fp16, then resume with --resume_from_checkpoint latest.")

    def _log(self, bar: tqdm) -> None:
        state, accelerator = self.state, self.accelerator
        figures = self.window.read(accelerator)
        metrics = {"train/loss": figures.loss, "train/lr": self.lr,
                   "train/grad_norm": float("nan") if self.grad_norm is None else float(self.grad_norm),
                   "train/pairs_per_s": figures.pairs_per_s, "train/tokens_per_s": figures.tokens_per_s,
                   "train/padding_efficiency": figures.padding_efficiency, "train/epoch": state.epoch,
                   "train/skipped_steps": state.skipped_steps}
        if accelerator.device.type == "cuda":
            metrics["train/gpu_mem_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if hasattr(self.loss_fn, "pop_stats"):
            metrics.update({f"train/{k}": v for k, v in self.loss_fn.pop_stats().items()})
        self.run_log.log(metrics, step=state.step)
        self.run_log.progress(completed=False, step=state.step, epoch=state.epoch, examples_seen=state.examples_seen,
                          duration_s=self.duration(), eval_before=state.eval_before)
        bar.set_postfix(loss=f"{figures.loss:.4f}", pairs_s=f"{figures.pairs_per_s:.1f}")
        self.window.reset()

    def duration(self) -> float:
        """Seconds of training, over every start of the run."""
        return self.duration_before + time.perf_counter() - self.started

    # --- evaluation, checkpoints, the end -----------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate (collective), log the metrics and a table of example retrievals at ``step``."""
        cfg = self.cfg
        if not len(self.held_out):
            return {}
        encode = set_encoder(self.model, self.collate, self.held_out, cfg.eval.batch_size, self.accelerator)
        result = run_retrieval(encode, self.held_out, cfg.eval.k, compute=self.accelerator.is_main_process)
        metrics = result.metrics if result is not None else {}
        # Each query's own nDCG, for the paired change between the base and the final model.
        self.per_query = [q[f"ndcg@{cfg.eval.k}"] for q in result.per_query] if result is not None else None
        self.run_log.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if result is not None and cfg.eval.examples:
            self.run_log.table("eval/examples", example_columns(cfg.eval.k),
                           example_rows(result, self.held_out, cfg.eval.examples, cfg.eval.k), step=step)
        return metrics

    def _score_general(self, step: int) -> float | None:
        if not len(self.general):
            return None
        value = self.score(self.general)
        if value is not None:
            self.run_log.log({f"general/ndcg@{self.cfg.eval.k}": value}, step=step)
        return value

    def score(self, data: RetrievalSet) -> float | None:
        """nDCG@k on ``data`` (collective; the main process gets the figure), logged nowhere."""
        if not len(data):
            return None
        encode = set_encoder(self.model, self.collate, data, self.cfg.eval.batch_size, self.accelerator)
        result = run_retrieval(encode, data, self.cfg.eval.k, compute=self.accelerator.is_main_process)
        return result.metrics[f"ndcg@{self.cfg.eval.k}"] if result is not None else None

    def _merge_with_base(self, step: int) -> dict[str, Any] | None:
        """export.merge_with_base: the final weights moved back toward the base model's, by a given
        share or by the one the held-out set (and the general set's floor) chooses."""
        setting, accelerator = self.cfg.export.merge_with_base, self.accelerator
        if setting is None:
            return None
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            logger.warning("export.merge_with_base is not applied to sharded weights (FSDP, DeepSpeed)")
            return None
        model = accelerator.unwrap_model(self.model)
        tuned = trained_state(model)
        base = base_state(self.cfg.model, tuned)
        held_out: dict[float, float] = {}
        general: dict[float, float] = {}
        if setting == "auto":
            for share in (0.0, *AUTO_SHARES):
                use_share(model, tuned, base, share)
                held_out[share] = self.score(self.held_out) or 0.0
                if len(self.general):
                    general[share] = self.score(self.general) or 0.0
            chosen = [choose_share(held_out, general, self.cfg.export.merge_tolerance)
                      if accelerator.is_main_process else None]
            broadcast_object_list(chosen)  # the main process holds the figures
            share = float(chosen[0])  # type: ignore[arg-type]
        else:
            share = float(setting)
        use_share(model, tuned, base, share)
        name = f"ndcg@{self.cfg.eval.k}"
        logger.info("merged with the base model: %g of the fine-tuned weights%s", share,
                    f" (held-out {name} by share: {', '.join(f'{s:g}: {v:.4f}' for s, v in held_out.items())}"
                    + (f"; general set: {', '.join(f'{s:g}: {v:.4f}' for s, v in general.items())}" if general
                       else "") + ")" if held_out else "")
        self.run_log.log({"export/merge_share": share}, step=step)
        return {"share": share, "held_out": held_out, "general": general, "metric": name}

    def save_checkpoint(self) -> bool:
        """A checkpoint of this step (collective); with checkpoint.best_metric, scored first. False
        when the save failed and ``checkpoint.on_save_error`` let training go on."""
        cfg, state = self.cfg, self.state
        self.saved_at = state.step
        metrics = self.evaluate(state.step) if cfg.checkpoint.best_metric else {}
        score = metrics.get(cfg.checkpoint.best_metric) if cfg.checkpoint.best_metric else None
        state.wandb_run_id, state.mlflow_run_id = self.run_log.wandb_id, self.run_log.mlflow_id
        state.duration_s = self.duration()
        try:
            path = checkpoint.save(self.accelerator, cfg.output_dir, state, cfg.checkpoint.keep_last,
                                   cfg.checkpoint.best_metric, score)
            logger.info("checkpoint %s", path)
        except CheckpointError as exc:
            if cfg.checkpoint.on_save_error == "stop":
                raise
            logger.error("%s Training goes on (checkpoint.on_save_error=continue).", exc)
            return False
        if self.hub is not None:  # export.push_to_hub.every_save: this step's model, pushed in the background
            self.hub.checkpoint(self.model, self.tokenizer, self._facts(metrics or None), self.duration)
        return True

    def _facts(self, after: dict[str, float] | None, final_step: int | None = None,
               change: dict[str, float] | None = None, merge: dict[str, Any] | None = None) -> RunFacts:
        """What the model card (and a push's commit message) says of the model of this step."""
        state, wandb = self.state, self.run_log.wandb_run
        return RunFacts(state.eval_before, after, None if wandb is None or wandb.offline else wandb.url,
                        state.examples_seen, state.step, final_step, change, merge, self.train_pairs)

    def finish(self, completed: bool) -> dict[str, Any]:
        """End the run: on completion a last checkpoint, the held-out metrics after training and the
        exported model; either way the summary, written to training_progress.json and returned."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        summary: dict[str, Any] = {
            "completed": completed, "processes": accelerator.num_processes, "step": state.step,
            "epochs_completed": cfg.train.epochs if completed and not (cfg.train.max_steps or self.stopped_early)
            else state.epoch,
            "examples_seen": state.examples_seen, "duration_s": 0.0, "skipped_steps": state.skipped_steps,
            "eval_before": state.eval_before}
        facts: RunFacts | None = None  # what the final model's card and push say, on completion
        if not completed:
            logger.warning("stopped at step %d; continue with --resume_from_checkpoint latest", state.step)
        else:
            if cfg.checkpoint.every_n_steps and self.saved_at != state.step:
                self.save_checkpoint()  # the end state too, so a crash in the final eval or export loses nothing
            final_step = self._restore_best()
            merge = self._merge_with_base(state.step)
            after = self.evaluate(state.step)
            general = {"before": self.general_before, "after": self._score_general(state.step)}
            change = None
            if after:
                logger.info("held-out metrics (%d queries, %d documents):\n%s", len(self.held_out),
                            len(self.held_out.corpus), format_table(state.eval_before, after))
                change = self._paired_change(state.step)
            facts = self._facts(after or None, final_step, change, merge)
            final_dir = export_model(accelerator, self.model, self.tokenizer, cfg, facts, self.duration)
            self.run_log.summary({**{f"final/{k}": v for k, v in after.items()},
                              **{f"before/{k}": v for k, v in (state.eval_before or {}).items()}})
            summary.update(eval_after=after, eval_change=change, merge=merge, final_model=final_dir,
                           general=general if len(self.general) else None,
                           final_step=final_step or state.step, stopped_early=self.stopped_early)
        summary["duration_s"] = self.duration()
        self.run_log.progress(**summary)
        self.model = self.optimizer = None  # drop DDP before the process group goes
        release(accelerator)
        if self.hub is not None and accelerator.is_main_process:  # after the release: no process waits on it
            summary["hub"] = self.hub.finish(summary.get("final_model"), facts)
            self.run_log.progress(**summary)
        self.run_log.finish()
        return summary


def run_training(cfg: Config) -> dict[str, Any]:
    """Set up and train one run of ``cfg``; returns its summary."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.lock.release()
