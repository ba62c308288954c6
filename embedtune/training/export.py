"""The one place that writes ``final_model/``: a sentence-transformers folder and its model card."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator

from embedtune.config import Config
from embedtune.data.collate import query_prefix
from embedtune.model.lora import merged, name_the_base
from embedtune.training.model_card import FINAL_MODEL, data_fingerprint, write_model_card

logger = logging.getLogger("embedtune")


@dataclass
class RunFacts:
    """What the card says of the run that made the model."""

    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    wandb_url: str | None
    examples_seen: int
    steps: int


def export_model(accelerator: Accelerator, model: Any, tokenizer: Any, cfg: Config, facts: RunFacts,
                 duration: Callable[[], float]) -> str:
    """Write ``output_dir/final_model`` (collective: every process calls it; the main one writes)
    with safetensors weights, the base model's module stack, the training prefixes as its prompts
    (the base's where the run had none), and the model card, which gives the run's ``duration()``
    with the export included."""
    path = os.path.join(cfg.output_dir, FINAL_MODEL)
    unwrapped = accelerator.unwrap_model(model)
    lora = cfg.model.lora
    if lora and lora.export == "adapter":
        if unwrapped.folder is not None:
            name_the_base(unwrapped.encoder, unwrapped.folder)
    else:  # training is over: adapters are folded into the weights, for a plain sentence-transformers folder
        unwrapped.encoder = merged(unwrapped.encoder)
    accelerator.wait_for_everyone()
    # Collective: under FSDP or DeepSpeed the full weights are assembled on the main process.
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        data = cfg.data
        # The prefixes trained with become the model's query and document prompts (the base's
        # own prompts are kept by the save); a named base prompt is saved as the query prompt.
        query = query_prefix(data, unwrapped.folder)
        prompts = ({"query": query, "document": data.document_prefix}
                   if data.query_prefix or data.document_prefix else None)
        # The base's module stack comes back (Dense layers trained), and its prompts unless the
        # run trained with prefixes of its own.
        unwrapped.save_sentence_transformer(
            path, tokenizer, max(data.query_max_length, data.document_max_length), prompts, state)
        logger.info("saved %s", path)
        # After the save: sentence-transformers writes a generic README.md, which the card replaces.
        write_model_card(path, base_model=cfg.model.base_model, config=cfg.to_dict(),
                         fingerprint=data_fingerprint(data.train_files), eval_before=facts.eval_before,
                         eval_after=facts.eval_after, wandb_url=facts.wandb_url, num_examples=facts.examples_seen,
                         steps=facts.steps, duration_s=duration(), precision=accelerator.mixed_precision)
    accelerator.wait_for_everyone()
    return path
