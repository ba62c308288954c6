"""The one place that writes model folders: ``final_model/`` at the end of a run (and, through
``from_checkpoint``, any checkpoint's weights): a sentence-transformers folder and its model card.

Each is written whole in ``NAME.tmp`` next to its place, flushed to the disk and renamed into
place, replacing an older folder only at the rename: it is complete or absent, never half
written, and a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator

from embedtune.config import Config
from embedtune.data.collate import query_prefix
from embedtune.data.fingerprint import data_fingerprint
from embedtune.distributed import any_process
from embedtune.files import free_bytes, fsync_tree, human_bytes, remove_path, replace_folder, write_atomic
from embedtune.model.lora import merged, name_the_base
from embedtune.training.card_metadata import dataset_size
from embedtune.training.checkpoint import complete_checkpoints
from embedtune.training.model_card import CARD, FINAL_MODEL, CheckpointOrigin, render_card
from embedtune.training.state import CheckpointError

logger = logging.getLogger("embedtune")


class ExportError(CheckpointError):
    """A model folder could not be written; nothing half-written is left, and the checkpoints are untouched."""


@dataclass
class RunFacts:
    """What the card says of the run that made the model."""

    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    wandb_url: str | None
    examples_seen: int
    steps: int
    final_step: int | None = None  # the best checkpoint's step, when it became the final model
    eval_change: dict[str, float] | None = None  # nDCG's paired change from the base model, query by query
    merge: dict[str, Any] | None = None  # export.merge_with_base: the share used and the figures behind it
    train_pairs: int | None = None  # training pairs in one epoch, for the card's dataset_size tag
    origin: CheckpointOrigin | None = None  # the checkpoint the model comes from (embedtune export)


def export_model(accelerator: Accelerator, model: Any, tokenizer: Any, cfg: Config, facts: RunFacts,
                 duration: Callable[[], float]) -> str:
    """Write ``output_dir/final_model`` (collective: every process calls it; the main one writes)
    with safetensors weights, the base model's module stack, the training prefixes as its prompts
    (the base's where the run had none), and the model card, which gives the run's ``duration()``
    with the export included. Whatever fails, every process raises ExportError and no partial
    folder is left."""
    path = os.path.join(cfg.output_dir, FINAL_MODEL)
    unwrapped = accelerator.unwrap_model(model)
    settle_adapters(unwrapped, cfg)
    accelerator.wait_for_everyone()
    # Collective: under FSDP or DeepSpeed the full weights are assembled on the main process.
    state = accelerator.get_state_dict(model)
    error: Exception | None = None
    if accelerator.is_main_process:
        tmp = f"{path}.tmp"
        try:
            remove_path(tmp)  # the leftover of an export that was killed
            write_model_folder(tmp, path, unwrapped, tokenizer, state, cfg, facts, duration, accelerator.mixed_precision)
            fsync_tree(tmp)
            replace_folder(tmp, path)
            logger.info("saved %s", path)
        except Exception as exc:
            error = exc
            remove_path(tmp)
    # Every process learns the outcome (this is also the wait for the main process's write).
    if any_process(error is not None, accelerator.device):
        raise ExportError(_export_failure(cfg.output_dir, path, error))
    return path


def settle_adapters(unwrapped: Any, cfg: Config) -> None:
    """LoRA adapters folded into the weights, for a plain sentence-transformers folder; or, with
    model.lora.export=adapter, kept apart in a folder that names its base model."""
    lora = cfg.model.lora
    if lora and lora.export == "adapter":
        if unwrapped.folder is not None:
            name_the_base(unwrapped.encoder, unwrapped.folder)
    else:
        unwrapped.encoder = merged(unwrapped.encoder)


def write_model_folder(tmp: str, path: str, unwrapped: Any, tokenizer: Any, state: Any, cfg: Config, facts: RunFacts,
           duration: Callable[[], float], precision: str | None, fingerprint: dict[str, Any] | None = None) -> None:
    """The sentence-transformers folder and its card, in ``tmp``; the card names ``path``, where it will be.
    ``fingerprint``: the training data's (``data_fingerprint``), when the files are not to be read."""
    data = cfg.data
    # The prefixes trained with become the model's query and document prompts (the base's
    # own prompts are kept by the save); a named base prompt is saved as the query prompt.
    query = query_prefix(data, unwrapped.folder)
    prompts = ({"query": query, "document": data.document_prefix}
               if data.query_prefix or data.document_prefix else None)
    # The base's module stack comes back (Dense layers trained), and its prompts unless the
    # run trained with prefixes of its own.
    unwrapped.save_sentence_transformer(
        tmp, tokenizer, max(data.query_max_length, data.document_max_length), prompts, state)
    # After the save: sentence-transformers writes a generic README.md, which the card replaces.
    # The card is read from the folder as written, and its usage example loads the final path.
    text = render_card(tmp, base_model=cfg.model.base_model, config=cfg.to_dict(),
                       fingerprint=data_fingerprint(data.train_files) if fingerprint is None else fingerprint,
                       eval_before=facts.eval_before, eval_after=facts.eval_after, wandb_url=facts.wandb_url,
                       num_examples=facts.examples_seen, steps=facts.steps, duration_s=duration(),
                       precision=precision, final_step=facts.final_step, eval_change=facts.eval_change,
                       merge=facts.merge, train_pairs=_train_pairs(path, cfg, facts), origin=facts.origin)
    write_atomic(os.path.join(tmp, CARD), text.replace(json.dumps(tmp), json.dumps(path)))


def _train_pairs(path: str, cfg: Config, facts: RunFacts) -> int | None:
    """Pairs in one epoch: as the trainer counted them; else, for the final model of a run that
    trained whole epochs (no max_steps, no early stop), the pairs it saw over them."""
    if facts.train_pairs is not None:
        return facts.train_pairs
    whole_epochs = not (cfg.train.max_steps or cfg.train.early_stopping_patience or facts.origin)
    if whole_epochs and os.path.normpath(path) == os.path.normpath(os.path.join(cfg.output_dir, FINAL_MODEL)):
        return dataset_size(facts.examples_seen, cfg.train.epochs)
    return None


def _export_failure(output_dir: str, path: str, error: Exception | None) -> str:
    """One line: why the export failed, the space left, and where the trained model still is."""
    reason = (f"{type(error).__name__}: {' '.join(str(error).split())}"[:300] if error is not None
              else "it failed on the main process (see its error)")
    free = free_bytes(output_dir)
    found = complete_checkpoints(output_dir)
    if found:
        where = (f"the last checkpoint, {found[-1]}, is still there: free space (if that was it) and run again with "
                 f"--resume_from_checkpoint latest to export from it, or `embedtune export {found[-1]} OUT`")
    else:
        where = "no checkpoint was saved (checkpoint.every_n_steps), so the run must be trained again"
    kept = "the earlier final_model is untouched" if os.path.isdir(path) else "no partial folder was left"
    return (f"could not write {path}: {reason}. {'?' if free is None else human_bytes(free)} free on its disk; "
            f"{kept}; {where}.")
