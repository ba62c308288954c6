"""What a sentence-transformers folder's modules become in training, and back in the export.

- the Transformer: the encoder and its tokenizer, loaded with the folder's own settings
  (``do_lower_case``, config and tokenizer arguments) and ``model.trust_remote_code``;
- a Dense module: ``Dense`` here, with the weights and activation sentence-transformers saved,
  trained with the encoder and written back as sentence-transformers' own Dense.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os

import torch
from safetensors.torch import load_file
from tokenizers import normalizers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from embedtune.model.folder import DenseSpec, ModelFolder, ModelLoadError, missing_weights, one_line

logger = logging.getLogger(__name__)


class Dense(nn.Module):
    """sentence-transformers' Dense on the pooled embedding: ``activation_function(linear(x))``, plus
    ``x`` (or its projection ``residual(x)`` where the sizes differ) when ``use_residual``.

    Its parameter names are sentence-transformers' own, so the saved weights load either way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation_function: nn.Module | None = None, use_residual: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_function = activation_function if activation_function is not None else nn.Identity()
        self.use_residual = use_residual
        if use_residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation_function(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if self.in_features != self.out_features else x)
        return out


def activation(path: str, trust_remote_code: bool, where: str) -> nn.Module:
    """The activation a Dense config names by its class's dotted path. torch's own modules always
    load; any other class is the model's own code, which runs only when trusted."""
    module_name, _, name = path.rpartition(".")
    from_torch = path.startswith("torch.")
    if not from_torch and not trust_remote_code:
        raise ModelLoadError(f"{where}: the Dense activation {path!r} is the model's own code, which runs only "
                             "with model.trust_remote_code=true")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: the Dense activation {path!r} cannot be imported ({one_line(exc)}); "
                             "use a model whose Dense activation is a torch.nn module") from None
    if from_torch and not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"{where}: the Dense activation {path!r} is not a torch.nn module")
    return cls()


def load_dense(spec: DenseSpec, trust_remote_code: bool) -> Dense:
    """A Dense module with the weights its folder holds (safetensors, else a weights-only pickle)."""
    layer = Dense(spec.in_features, spec.out_features, spec.bias,
                  activation(spec.activation, trust_remote_code, os.path.join(spec.folder, "config.json")),
                  spec.use_residual)
    safetensors, pickled = (os.path.join(spec.folder, f) for f in ("model.safetensors", "pytorch_model.bin"))
    if not os.path.exists(safetensors) and not os.path.exists(pickled):
        raise ModelLoadError(f"{spec.folder}: no model.safetensors or pytorch_model.bin for this Dense module; "
                             "the folder is incomplete (download it again)")
    try:
        if os.path.exists(safetensors):
            layer.load_state_dict(load_file(safetensors))
        else:
            layer.load_state_dict(torch.load(pickled, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{spec.folder}: the Dense weights do not load ({one_line(exc)}); the folder is "
                             "damaged or its config.json does not describe them") from None
    return layer


def st_dense(layer: Dense, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``layer`` as sentence-transformers' own Dense module, with its (trained) weights, or with
    ``state`` where the export was handed the assembled weights of a sharded model."""
    from sentence_transformers import models as st_models

    residual = {"use_residual": True} if layer.use_residual else {}  # older releases lack the argument
    out = st_models.Dense(layer.in_features, layer.out_features, bias=layer.linear.bias is not None,
                          activation_function=copy.deepcopy(layer.activation_function), **residual)
    weights = layer.state_dict() if state is None else state
    out.load_state_dict({k: v.detach().float().cpu() for k, v in weights.items()})
    return out


def lower_case(tokenizer: PreTrainedTokenizerBase) -> None:
    """Lower-case texts before they are tokenized (``do_lower_case``), as sentence-transformers does:
    a Lowercase step first in the tokenizer's own normalizer, so every route through the tokenizer
    lower-cases (the collator's direct use of the Rust tokenizer too). The export says
    do_lower_case again: a tokenizer class may rebuild its normalizer when it loads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer: its own flag, where it has one
        target = tokenizer if hasattr(tokenizer, "do_lower_case") else getattr(tokenizer, "basic_tokenizer", None)
        try:
            target.do_lower_case = True  # type: ignore[union-attr]
        except AttributeError:
            raise ModelLoadError(f"do_lower_case is set, and the tokenizer {type(tokenizer).__name__} cannot "
                                 "lower-case; use a model with a fast tokenizer") from None
        return
    current = backend.normalizer
    steps = list(current) if isinstance(current, normalizers.Sequence) else [] if current is None else [current]
    if not any(isinstance(step, normalizers.Lowercase) for step in steps):
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *steps])


def load_transformer(folder: ModelFolder, name: str, trust_remote_code: bool
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The encoder (fp32 master weights; mixed precision is Accelerate's autocast) and tokenizer."""
    where = folder.transformer_dir
    if trust_remote_code:
        logger.warning("model.trust_remote_code=true: the code that comes with %s runs in this process", name)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **folder.config_kwargs)
        if getattr(config, "is_encoder_decoder", False):
            raise ModelLoadError(f"model.base_model={name!r} is an encoder-decoder model ({config.model_type}); "
                                 "embedtune trains encoder models (BERT, XLM-R, ModernBERT, ...) and decoders with "
                                 "last-token pooling")
        if problem := missing_weights(name, where):  # once the config loads: what to do about it comes first
            raise ModelLoadError(problem)
        encoder = AutoModel.from_pretrained(where, config=config, dtype=torch.float32,
                                            trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code,
                                                  **folder.tokenizer_kwargs)
    except ModelLoadError:
        raise
    except ValueError as exc:  # transformers' word for code it will not run, or an architecture it lacks
        raise ModelLoadError(_refused(name, where, exc, trust_remote_code)) from None
    except OSError as exc:  # a file missing from the folder
        raise ModelLoadError(f"cannot load model.base_model={name!r} from {where}: {one_line(exc)}") from None
    if folder.do_lower_case:
        lower_case(tokenizer)
    return encoder, tokenizer


def _refused(name: str, where: str, exc: ValueError, trust_remote_code: bool) -> str:
    text = str(exc)
    if "trust_remote_code" in text and not trust_remote_code:
        return (f"model.base_model={name!r} needs the code that comes with it (config.json auto_map) to load; "
                "read that code, then set model.trust_remote_code=true to run it")
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        return (f"model.base_model={name!r}: this transformers does not know its architecture; upgrade "
                "transformers, or set model.trust_remote_code=true if the model comes with its own code "
                f"({one_line(exc, 160)})")
    return f"cannot load model.base_model={name!r} from {where}: {one_line(exc)}"
