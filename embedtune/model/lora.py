"""LoRA through peft (``model.lora``): low-rank adapters on chosen linear layers train, the encoder's
own weights stay frozen, and checkpoints hold only what trains.

The base weights are rebuilt from the base model at every start, so a checkpoint needs only the
trained parameters; resuming loads them on top and checks that they are exactly the ones the
run trains. The export folds the adapters into the weights (a plain sentence-transformers
folder) or keeps them apart as an adapter folder that names its base model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from embedtune.config import ConfigError, LoraSection
from embedtune.model.folder import ModelFolder

logger = logging.getLogger("embedtune")

# peft knows the usual adapter targets of most architectures; these it does not.
TARGETS = {"modernbert": ["Wqkv", "Wo"], "nomic_bert": ["Wqkv", "out_proj"]}
ADAPTER_NAME = "default"


def add_adapters(encoder: nn.Module, cfg: LoraSection) -> nn.Module:
    """``encoder`` wrapped with LoRA adapters (a peft model); only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    targets = cfg.target_modules or TARGETS.get(str(model_type))
    try:
        wrapped = get_peft_model(encoder, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                     target_modules=targets))
    except ValueError as exc:  # peft names the modules it did not find, or asks for targets
        raise ConfigError(f"model.lora.target_modules: {' '.join(str(exc).split())[:300]} (the encoder's linear "
                          f"layers are named e.g. {', '.join(linear_names(encoder)[:8])})") from None
    adapters = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA on %s: r=%d, alpha=%g; %.2fM of %.1fM encoder parameters train", model_type, cfg.r, cfg.alpha,
                adapters / 1e6, total / 1e6)
    return wrapped


def linear_names(module: nn.Module) -> list[str]:
    """The distinct last names of the linear layers in ``module`` (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)})


def has_adapters(encoder: nn.Module) -> bool:
    return hasattr(encoder, "merge_and_unload") and hasattr(encoder, "peft_config")


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def keep_trainable(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """Accelerate's save-state hook: each model's saved weights are its trainable parameters only."""
    for model, state in zip(models, weights):
        keep = trainable_names(model)
        for key in [k for k in state if k not in keep]:
            del state[key]


def merged(encoder: nn.Module) -> nn.Module:
    """The encoder with its adapters folded into the weights (a plain transformers model)."""
    return encoder.merge_and_unload() if has_adapters(encoder) else encoder


def adapter_export_problem(transformers_needs: str | None = None, peft_has: str | None = None) -> str | None:
    """Why an adapter folder written here would not load here (transformers reads adapter folders
    only with a recent enough peft), or None. The versions default to the installed ones."""
    from importlib.metadata import version

    from packaging.version import Version

    if transformers_needs is None:
        from transformers.integrations import peft as transformers_peft

        transformers_needs = str(getattr(transformers_peft, "MIN_PEFT_VERSION", "0"))
    peft_has = peft_has or version("peft")
    if Version(peft_has) >= Version(transformers_needs):
        return None
    return (f"model.lora.export=adapter: transformers {version('transformers')} loads adapter folders only with "
            f"peft>={transformers_needs}, and peft {peft_has} is installed, so SentenceTransformer(final_model) "
            f"would fail; set model.lora.export=merged, or install peft>={transformers_needs}")


def name_the_base(encoder: nn.Module, folder: ModelFolder) -> None:
    """Make the adapters' saved config name the base model where loading will find it again: its
    Hub name when it came from the Hugging Face cache, else its folder's absolute path."""
    at_root = os.path.abspath(folder.transformer_dir) == os.path.abspath(folder.path)
    base = folder.hub_id if folder.hub_id and at_root else os.path.abspath(folder.transformer_dir)
    for adapter in encoder.peft_config.values():
        adapter.base_model_name_or_path = base
