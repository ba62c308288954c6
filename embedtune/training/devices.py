"""How a run uses the machine: its mixed precision, and activation checkpointing."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import torch

from embedtune.config import Config, ConfigError
from embedtune.files import read_json_object
from embedtune.model.encoder import is_decoder
from embedtune.model.folder import read_model_folder

logger = logging.getLogger("embedtune")


def default_precision(cfg: Config) -> str | None:
    """train.mixed_precision, else what ``accelerate launch`` said; with neither, bf16 for a decoder
    embedder on a GPU that has it (they are trained and used in bf16), else Accelerate's default."""
    if cfg.train.mixed_precision is not None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return cfg.train.mixed_precision
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)):
        return None
    folder = read_model_folder(cfg.model.base_model)
    config = read_json_object(os.path.join(folder.transformer_dir, "config.json"))
    if not is_decoder(SimpleNamespace(**config)):  # the loader's own rule, on the config before it loads
        return None
    logger.info("mixed precision bf16 for this decoder embedder on %s (train.mixed_precision sets another)",
                torch.cuda.get_device_name())
    return "bf16"


def checkpoint_activations(encoder: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (model.gradient_checkpointing)."""
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing: {type(encoder).__name__} cannot recompute its activations; "
                          "set model.gradient_checkpointing=false")
    # Non-reentrant checkpointing: it works when the inputs need no gradient and under DDP, and it
    # restores the RNG state before recomputing, so dropout draws the same masks and the
    # gradient is exact (GradCache's replay included).
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    logger.info("gradient checkpointing on: activations are recomputed in the backward pass")
