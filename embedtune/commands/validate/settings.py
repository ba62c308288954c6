"""The config rows: the settings that decide a run, and the trainer's own check of the loss
against the data it is given."""

from __future__ import annotations

import os

from embedtune.commands.validate.checks import FAIL, OK, Check
from embedtune.config import Config, ConfigError
from embedtune.losses import build_loss, check_loss_data, required_data
from embedtune.losses.base import DataShape
from embedtune.model.lora import adapter_export_problem


def config_checks(cfg: Config, source: str, loss: Check) -> list[Check]:
    """The settings that decide a run, as resolved from the file, the flags and the overrides."""
    d, t = cfg.data, cfg.train
    held_out = (f"held out: {', '.join(d.eval_files)}" if d.eval_files
                else f"held out: {d.eval_fraction:g} of the questions (by hash)" if d.eval_fraction
                else "no held-out evaluation")
    run_length = (f"max_steps {t.max_steps}" if t.max_steps else f"{t.epochs} epoch{'s' * (t.epochs != 1)}")
    prefixes = ""
    if d.query_prefix or d.document_prefix:
        prefixes = f"; prefixes {d.query_prefix!r} / {d.document_prefix!r}"
    rows = [
        ("config", source),
        ("model", f"{cfg.model.base_model} (pooling {cfg.model.pooling}, normalize "
                  f"{'auto' if cfg.model.normalize is None else cfg.model.normalize})"),
        ("train files", f"{', '.join(d.train_files)} (format {d.format}, fields {d.query_field!r} -> "
                        f"{d.positive_field!r}{f', negatives {d.negatives_field!r}' if d.negatives_field else ''}"
                        f"{f', label {d.label_field!r}' if d.label_field else ''}); {held_out}"),
        ("batch", f"{t.batch_size} pairs per step, {t.gradient_accumulation_steps} micro-batch"
                  f"{'es' * (t.gradient_accumulation_steps != 1)}; learning rate {t.learning_rate:g}, "
                  f"{t.scheduler} schedule, warmup {t.warmup_ratio:g}"),
        ("lengths", f"query {d.query_max_length} tokens, document {d.document_max_length} tokens{prefixes}"),
        ("run length", f"{run_length}, seed {t.seed}"),
        ("output_dir", f"{cfg.output_dir} ({os.path.abspath(cfg.output_dir)})"),
    ]
    checks = [Check("config", name, OK, detail) for name, detail in rows]
    lora = cfg.model.lora
    if lora:
        problem = adapter_export_problem() if lora.export == "adapter" else None
        checks.insert(2, Check("config", "lora", FAIL if problem else OK, problem or (
            f"r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
            f"{', '.join(lora.target_modules or []) or 'the usual layers'}; export {lora.export}")))
    # The loss row goes after the batch and lengths, before the run length and output_dir.
    return checks[:-2] + [loss] + checks[-2:]


def loss_check(cfg: Config) -> tuple[Check, DataShape | None]:
    """The trainer's own check that the loss gets the data it needs, and what the loss needs of
    each record (None when the loss cannot be used): with "triplets", a record without a hard
    negative is a bad record, as it is in training."""
    try:
        loss = build_loss(cfg.loss)
        needs = required_data(loss)
        check_loss_data(needs, cfg.data, cfg.loss.distills() or cfg.loss.name)
    except (ConfigError, ValueError) as exc:
        return Check("config", "loss", FAIL, str(exc), {"name": cfg.loss.name}), None
    extra = f", Matryoshka {cfg.loss.matryoshka_dims}" if cfg.loss.matryoshka_dims else ""
    return (Check("config", "loss", OK, f"{cfg.loss.name} (trains on {needs}{extra})",
                  {"name": cfg.loss.name, "needs": needs}), needs)
