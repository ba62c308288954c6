"""Any checkpoint as a model (``embedtune export CHECKPOINT OUT``).

A checkpoint is read as a resume reads it: its files checked against its manifest and its
``trainer_state.json`` field by field before anything of it is used. The run's config comes from
that state; the base model is loaded again and the checkpoint's weights put on top (a LoRA
checkpoint holds only the adapters). The training data need not be there: the card gives the
files' sizes and hashes as the checkpoint recorded them, and the held-out metrics of that step
from the run's ``training_metrics.jsonl``. OUT is written whole in ``OUT.tmp``, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from safetensors.torch import load_file as load_weights

from embedtune.config import Config, ConfigError, build_config, load_file
from embedtune.data.fingerprint import data_fingerprint, fingerprint_of
from embedtune.data.identity import WHOLE_BYTES
from embedtune.data.records import PACKAGE_PREFIX, DataError, resolve_files
from embedtune.files import free_bytes, fsync_tree, hash_file, human_bytes, remove_path, replace_folder
from embedtune.model.encoder import EmbeddingModel, position_limit
from embedtune.model.lora import add_adapters, trainable_names
from embedtune.secrets import scrub_text
from embedtune.training.card_metadata import dataset_size
from embedtune.training.checkpoint import PARTIAL, best_checkpoint, complete_checkpoints
from embedtune.training.export import ExportError, RunFacts, settle_adapters, write_model_folder
from embedtune.training.integrity import HEX, verify
from embedtune.training.model_card import CheckpointOrigin, progress_pairs
from embedtune.training.state import NAME, STATE_FILE, CheckpointError, TrainerState
from embedtune.training.tracking import METRICS

logger = logging.getLogger("embedtune")


# How the checkpoint modules' messages end: advice for a resume, which an export replaces with its own.
RESUME_ADVICE = re.compile(r"[;:.]?\s*resume from (?:another|an earlier|a) checkpoint.*$", re.S)


@dataclass
class CheckpointRun:
    """A checkpoint, checked, with its run's config and what the run left beside it."""

    path: str
    state: TrainerState
    cfg: Config
    progress: dict[str, Any] = field(default_factory=dict)  # training_progress.json; {} when gone
    rows: list[dict[str, Any]] = field(default_factory=list)  # training_metrics.jsonl; [] when gone

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def not_a_checkpoint(path: str) -> str | None:
    """Why ``path`` is no checkpoint to export (one line), or None."""
    name = os.path.basename(os.path.normpath(path))
    where = "a checkpoint folder, OUTPUT_DIR/checkpoints/step-NNNNNNNN"
    if not os.path.isdir(path):
        return f"{path}: {'a file' if os.path.exists(path) else 'no such folder'}; give {where}"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = complete_checkpoints(path)
        newest = f", e.g. the newest, {found[-1]}" if found else " (it has no complete one)"
        return f"{path}: a run's output folder, not a checkpoint; give one of its checkpoints{newest}"
    if os.path.isfile(os.path.join(path, "modules.json")):
        return f"{path}: a sentence-transformers model folder already, not a checkpoint; give {where}"
    if PARTIAL.match(name):
        return (f"{path}: a checkpoint save that did not finish (.tmp) or a replaced checkpoint (.old), not a "
                "checkpoint; export a complete step-NNNNNNNN folder beside it")
    if not NAME.match(name):
        return f"{path}: not a checkpoint; give {where} (a step-NNNNNNNN folder with {STATE_FILE})"
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        return (f"{path}: incomplete: no {STATE_FILE} (its save did not finish, or files were removed); export "
                "another checkpoint of the run")
    return None


def open_checkpoint(path: str) -> CheckpointRun:
    """The checkpoint at ``path`` checked as a resume checks it, its config and its run's files;
    CheckpointError, in one line, for a path that is no checkpoint, or one incomplete or damaged."""
    if problem := not_a_checkpoint(path):
        raise CheckpointError(problem)
    try:
        verify(path)
        state = TrainerState.load(path)
    except CheckpointError as exc:
        raise CheckpointError(RESUME_ADVICE.sub("", str(exc)) + "; export another checkpoint of the run") from None
    run_dir = _run_dir(path)
    run = CheckpointRun(path, state, _run_config(path, state, run_dir))
    if run_dir is not None:
        progress = _read_json(os.path.join(run_dir, "training_progress.json"))
        run.progress = progress if isinstance(progress, dict) else {}
        run.rows = _read_rows(os.path.join(run_dir, METRICS))
    return run


def _run_dir(path: str) -> str | None:
    """The run's output folder, while the checkpoint is still in its ``checkpoints/``."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def _run_config(path: str, state: TrainerState, run_dir: str | None) -> Config:
    """The config the checkpoint was saved with (before checkpoints held it: the run's config.yaml)."""
    raw, where = state.config, os.path.join(path, STATE_FILE)
    if not raw and run_dir is not None and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        where = os.path.join(run_dir, "config.yaml")
        try:
            raw = load_file(Path(where))
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
    if not raw:
        raise CheckpointError(f"{path}: its {STATE_FILE} holds no config (an older checkpoint) and no config.yaml "
                              "is beside it in the run's folder; export it from the run's folder")
    try:
        return build_config(raw, source=where)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the run's config is not one this embedtune reads: "
                              f"{' '.join(str(exc).split())[:400]}") from None


def _read_json(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_rows(file: str) -> list[dict[str, Any]]:
    """The rows of training_metrics.jsonl; a row cut short by a kill is left out."""
    rows = []
    try:
        with open(file, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        return []
    return rows


def eval_at(rows: list[dict[str, Any]], step: int, k: int) -> dict[str, float] | None:
    """The held-out metrics the run logged at ``step`` for that step's weights: the first evaluation
    row there. At the run's last step later rows may be of other weights (the best checkpoint's, or
    merged with the base), and once export.merge_with_base is logged at a step nothing after it is."""
    for row in rows:
        if row.get("step") != step:
            continue
        if "export/merge_share" in row:
            return None
        if f"eval/ndcg@{k}" in row:
            return {key.removeprefix("eval/"): value for key, value in row.items() if key.startswith("eval/")
                    and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return None


def recorded_fingerprint(run: CheckpointRun) -> dict[str, Any]:
    """The training files as the checkpoint recorded them (``data.identity``), in the form of
    ``data_fingerprint``: each file's recorded sha256 (of the whole file, up to 256 MiB); a bigger
    file, recorded by a sampled hash, is hashed whole when it is still there, unchanged."""
    data = run.cfg.data
    if not run.state.data_files:  # a checkpoint from before the records: the files, if they are there
        try:
            return data_fingerprint(data.train_files)
        except (DataError, OSError):
            return {**fingerprint_of([]), "note": "The checkpoint predates records of the data, and the training "
                    "files are not there: no sizes or hashes."}
    held_out = [scrub_text(p) for p in data.eval_files]
    packaged = {}
    for pattern in data.train_files:
        if pattern.startswith(PACKAGE_PREFIX):
            try:
                packaged.update({scrub_text(f): pattern for f in resolve_files([pattern])})
            except DataError:
                pass
    entries = []
    for name, seen in run.state.data_files.items():
        if any(name == p or fnmatch(name, p) for p in held_out):
            continue
        seen = seen if isinstance(seen, dict) else {}
        size, sha = seen.get("size"), seen.get("hash")
        entry: dict[str, Any] = {"name": packaged.get(name, name),
                                 "size": size if isinstance(size, int) and not isinstance(size, bool) else None,
                                 "sha256": sha if isinstance(sha, str) and HEX.match(sha) else None}
        if seen.get("remote"):
            entry["note"] = "a URL: not hashed"
        elif "sample" in seen or (entry["size"] or 0) > WHOLE_BYTES:
            entry["sha256"], entry["note"] = _hash_if_unchanged(name, seen), "recorded by a sampled hash"
            if entry["sha256"]:
                del entry["note"]
        entries.append(entry)
    return {**fingerprint_of(entries), "note": "Sizes and sha256 as the run recorded them in the checkpoint (the "
            "export does not need the training files)."}


def _hash_if_unchanged(path: str, seen: dict[str, Any]) -> str | None:
    try:
        info = os.stat(path)
        if info.st_size == seen.get("size") and info.st_mtime_ns == seen.get("mtime_ns"):
            return hash_file(path)[1]
    except OSError:
        pass
    return None


def checkpoint_facts(run: CheckpointRun) -> RunFacts:
    """What the card of a checkpoint's model says: its step, the base model's figures and those the
    run logged at that step, the checkpoint's counts, and where it stands in the run."""
    state, progress, k = run.state, run.progress, run.cfg.eval.k
    scores = _run_scores(run)
    score = scores.get(run.name)
    origin = CheckpointOrigin(
        name=run.name, step=state.step, run_step=progress.get("step") if isinstance(progress.get("step"), int) else None,
        completed=progress.get("completed") if isinstance(progress.get("completed"), bool) else None, score=score,
        best=score is not None and best_checkpoint(scores) == run.name, scored=len(scores))
    wandb = progress.get("wandb") if isinstance(progress.get("wandb"), dict) else {}
    url = wandb.get("url") if state.wandb_run_id and wandb.get("id") == state.wandb_run_id else None
    pairs = progress_pairs(progress, run.cfg.to_dict())
    if pairs is None and state.batches_in_epoch == 0:  # saved at the end of an epoch
        pairs = dataset_size(state.examples_seen, state.epoch)
    return RunFacts(state.eval_before or eval_at(run.rows, 0, k), eval_at(run.rows, state.step, k), url,
                    state.examples_seen, state.step, train_pairs=pairs, origin=origin)


def _run_scores(run: CheckpointRun) -> dict[str, float]:
    """checkpoint.best_metric's value of each checkpoint the run scored: as the newest checkpoint
    beside this one knows them (it knows the most), else as this one does."""
    scores = dict(run.state.scores)
    run_dir = _run_dir(run.path)
    newest = complete_checkpoints(run_dir) if run_dir is not None else []
    if newest and os.path.basename(newest[-1]) != run.name:
        try:
            scores.update(TrainerState.load(newest[-1]).scores)
        except CheckpointError:
            pass  # a damaged newer checkpoint: this one's own scores
    return scores


def load_checkpoint_model(run: CheckpointRun, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The run's model with the checkpoint's weights, and its tokenizer (CheckpointError when the
    weights are not the model's). The base model is loaded as training loaded it; its own code
    runs only with ``trust_remote_code``, which the caller gives, not the checkpoint."""
    cfg = run.cfg
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise CheckpointError(f"{run.path}: the run trained with model.trust_remote_code=true, so loading its base "
                              f"model {cfg.model.base_model} runs the code that comes with it; allow that with "
                              "--trust-remote-code if you trust it")
    file = os.path.join(run.path, "model.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{run.path}: holds no model.safetensors (FSDP and DeepSpeed save the weights in "
                              "shards); export the run's final model instead")
    model, tokenizer = EmbeddingModel.from_pretrained(
        cfg.model.base_model, cfg.model.pooling, cfg.model.normalize, trust_remote_code=trust_remote_code,
        append_eos=cfg.model.append_eos)
    limit = position_limit(model.encoder)
    for key in ("query_max_length", "document_max_length"):  # as training cut them
        if limit is not None and getattr(cfg.data, key) > limit:
            setattr(cfg.data, key, limit)
    if cfg.model.lora:
        model.encoder = add_adapters(model.encoder, cfg.model.lora)
    saved = load_weights(file, device="cpu")
    if saved and all(name.startswith("module.") for name in saved):  # a wrapped model's names
        saved = {name.removeprefix("module."): tensor for name, tensor in saved.items()}
    problem = _weights_problem(model, saved, bool(cfg.model.lora))
    if problem:
        raise CheckpointError(f"{file}: holds other weights than its config's model ({problem}); was "
                              "model.base_model or model.lora changed since?")
    try:
        model.load_state_dict(saved, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise CheckpointError(f"{file}: does not fit its config's model ({' '.join(str(exc).split())[:300]})") from None
    model.eval()
    return model, tokenizer


def _weights_problem(model: Any, saved: dict[str, Any], lora: bool) -> str | None:
    """What differs between a checkpoint's weights and the model's, or None. A LoRA checkpoint holds
    exactly the trainable weights; any other all of them, less the second name of a tied weight
    (safetensors stores shared storage once)."""
    state = model.state_dict()
    if lora:
        expected = trainable_names(model)
        missing = expected - set(saved)
    else:
        expected = set(state)
        names_at: dict[int, set[str]] = {}
        for name, tensor in state.items():
            names_at.setdefault(tensor.data_ptr(), set()).add(name)
        missing = {name for name in expected - set(saved) if not names_at[state[name].data_ptr()] & set(saved)}
    extra = set(saved) - expected
    if not (missing or extra):
        return None
    return (f"missing: {', '.join(sorted(missing)[:3]) or 'none'}; not in the model: "
            f"{', '.join(sorted(extra)[:3]) or 'none'}")


def export_checkpoint(run: CheckpointRun, out: str, trust_remote_code: bool = False,
                      then: Callable[[str], Any] | None = None) -> Any:
    """Write the checkpoint's model to ``out`` (a sentence-transformers folder with its card),
    atomically: whole in ``out.tmp``, then renamed. ``then(folder)`` runs on the written folder
    before the rename (e.g. an ONNX export into it), and its result is returned."""
    out = os.path.normpath(out)
    model, tokenizer = load_checkpoint_model(run, trust_remote_code)
    settle_adapters(model, run.cfg)
    facts, fingerprint = checkpoint_facts(run), recorded_fingerprint(run)
    tmp = f"{out}.tmp"
    remove_path(tmp)  # the leftover of an export that was killed
    try:
        write_model_folder(tmp, out, model, tokenizer, None, run.cfg, facts, lambda: run.state.duration_s, None,
               fingerprint=fingerprint)
        result = then(tmp) if then is not None else None
        fsync_tree(tmp)
        replace_folder(tmp, out)
    except Exception as exc:
        remove_path(tmp)
        free = free_bytes(os.path.dirname(os.path.abspath(out)))
        raise ExportError(f"could not write {out}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}. "
                          f"{'?' if free is None else human_bytes(free)} free on its disk; no partial folder was "
                          "left") from exc
    except BaseException:  # Ctrl-C: nothing half-written stays
        remove_path(tmp)
        raise
    logger.info("saved %s", out)
    return result


