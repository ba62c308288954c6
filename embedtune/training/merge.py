"""Merging the fine-tuned weights with the base model's (``export.merge_with_base``): each trained
weight moves back toward its base value, ``base + share * (tuned - base)``, which keeps much of
what fine-tuning gained on its task and gives back little of what the base model was good at.

Under LoRA the adapters' update is ``B @ A`` times a scale, linear in ``B``: scaling ``B`` alone by
the share interpolates the merged weights exactly, and the frozen weights are the base already.
"""

from __future__ import annotations

import torch
from torch import nn

from embedtune.config import ModelConfig
from embedtune.model.encoder import EmbeddingModel

AUTO_SHARES = (0.25, 0.5, 0.75, 1.0)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights training changed (the trainable parameters)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def base_state(model_cfg: ModelConfig, tuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each trained weight's value in the base model: zero for a LoRA ``B``, the adapter itself for
    a LoRA ``A`` (it only matters through ``B``), the base model's weight otherwise."""
    needed = [n for n in tuned if ".lora_" not in n]
    fresh: dict[str, torch.Tensor] = {}
    if needed:
        base, _ = EmbeddingModel.from_pretrained(model_cfg.base_model, model_cfg.pooling, model_cfg.normalize,
                                                 trust_remote_code=model_cfg.trust_remote_code,
                                                 append_eos=model_cfg.append_eos)
        fresh = dict(base.named_parameters())
    out = {}
    for name, value in tuned.items():
        if ".lora_B" in name:
            out[name] = torch.zeros_like(value)
        elif ".lora_A" in name:
            out[name] = value
        else:
            out[name] = fresh[name].detach().to(value.device, value.dtype)
    return out


def use_share(model: nn.Module, tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], share: float) -> None:
    """Set ``model``'s trained weights to ``base + share * (tuned - base)``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tuned.items():
            params[name].copy_(torch.lerp(base[name], value, share))


def choose_share(held_out: dict[float, float], general: dict[float, float], tolerance: float) -> float:
    """The share with the best held-out figure (the larger of equals) among those that keep the
    general set's figure within ``tolerance`` of the base model's (share 0); 0 when none does."""
    floor = general[0.0] - tolerance if general else None
    allowed = [s for s in held_out if s > 0 and (floor is None or general[s] >= floor)]
    return max(allowed, key=lambda s: (held_out[s], s), default=0.0)
