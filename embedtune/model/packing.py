"""Input layouts of the encoder and the attention that packed texts need.

Texts leave the DataLoader workers ``Ragged``: every token id end to end, and each text's
length. ``EmbeddingModel.prepare`` turns that into one of three layouts on the device:

- ``Padded``: one block, each text padded on the right to the longest (evaluation, and any
  architecture that fails the packing check);
- ``Chunked``: the texts sorted by length and padded in a few chunks, each only to its own
  longest text, then put back in order (padded training batches);
- ``Packed``: all texts end to end in one row, so the dense layers (most of the compute) never
  see a padding token. Attention keeps each text to itself: with FlashAttention's varlen kernel
  where torch has it (CUDA, no attention dropout), by scattering queries, keys and values back
  into a padded block for one SDPA call per layer on other GPUs, and on the CPU in groups of texts
  of about one length, one padded SDPA call per group (or one call per text). A causal attention module (a decoder's) stays causal on every route, and a
  sliding-window layer keeps its window.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedtune.model.folder import Pooling

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "embedtune_packed"
# Set while the encoder runs on packed inputs: attention is then per text (from the Packing), and
# the (tokens x tokens) mask transformers would build for the packed row is never read.
PACKED_CALL: ContextVar[bool] = ContextVar("embedtune_packed_call", default=False)
MIN_CHUNK_ROWS = 16  # a padded chunk holds at least this many texts, or the batch is not cut


@dataclass(frozen=True)
class Ragged:
    """Texts as a worker tokenizes them: ``input_ids`` of every text end to end, and ``lengths``."""

    input_ids: torch.Tensor  # (tokens,) long
    lengths: torch.Tensor  # (rows,) long

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def pin_memory(self) -> Ragged:
        return Ragged(self.input_ids.pin_memory(), self.lengths.pin_memory())

    def select(self, start: int, stop: int) -> Ragged:
        """Texts ``start`` to ``stop`` (GradCache's mini-batches)."""
        bounds = F.pad(self.lengths.cumsum(0), (1, 0))
        stop = min(stop, self.rows)
        return Ragged(self.input_ids[int(bounds[start]):int(bounds[stop])], self.lengths[start:stop])


@dataclass(frozen=True)
class Padded:
    """One padded block: (rows, width) ``input_ids`` and its ``attention_mask``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> Padded:
        return Padded(_to(self.input_ids, device), _to(self.attention_mask, device))


@dataclass(frozen=True)
class Packing:
    """Where each packed token sits: ``cu_seqlens`` bounds the texts, ``flat_index`` is its place in
    the (rows x width) padded layout."""

    cu_seqlens: torch.Tensor  # (rows + 1,) int32
    flat_index: torch.Tensor  # (tokens,) long
    rows: int
    width: int
    max_length: int
    groups: AttentionGroups | None = None  # the CPU's attention in groups of texts of about one length

    def to(self, device: torch.device) -> Packing:
        return Packing(_to(self.cu_seqlens, device), _to(self.flat_index, device), self.rows, self.width,
                       self.max_length, self.groups.to(device) if self.groups is not None else None)


@dataclass(frozen=True)
class AttentionGroups:
    """Packed texts in groups of about one length (longest first), for attention one padded block
    per group: ``tokens[g]`` are the packed tokens of group ``g`` and ``places[g]`` is the same
    ``Packing`` for them alone (its rows and width the group's); ``restore`` puts the groups'
    concatenated tokens back in packed order."""

    tokens: list[torch.Tensor]
    places: list[Packing]
    restore: torch.Tensor

    def to(self, device: torch.device) -> AttentionGroups:
        return AttentionGroups([_to(t, device) for t in self.tokens], [p.to(device) for p in self.places],
                               _to(self.restore, device))


@dataclass(frozen=True)
class Packed:
    """All texts end to end in one row, with their positions and where each one sits."""

    input_ids: torch.Tensor  # (tokens,)
    position_ids: torch.Tensor  # (tokens,)
    packing: Packing

    @property
    def rows(self) -> int:
        return self.packing.rows

    def to(self, device: torch.device) -> Packed:
        return Packed(_to(self.input_ids, device), _to(self.position_ids, device), self.packing.to(device))


@dataclass(frozen=True)
class Chunked:
    """Padded blocks of length-sorted texts; ``restore`` puts their embeddings back in text order."""

    chunks: list[Padded]
    restore: torch.Tensor

    @property
    def rows(self) -> int:
        return len(self.restore)

    def to(self, device: torch.device) -> Chunked:
        return Chunked([chunk.to(device) for chunk in self.chunks], _to(self.restore, device))


Layout = Padded | Packed | Chunked


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device, non_blocking=True)


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: the other routes serve
    varlen_attn = None

# On CUDA, how packed attention runs, by (attention dropout on, half precision): "varlen"
# (FlashAttention over the packed rows: half precision, no dropout) or "padded" (scatter into a
# padded block for SDPA, which is slower than padding the batch in the first place). Chosen once
# per process by ``choose_cuda_routes``. The CPU takes "grouped" (one padded SDPA call per group
# of texts of about one length) where the layout has groups, else "per_text" (one call per text).
CUDA_ROUTES: dict[tuple[bool, bool], str] = {}
# Whether the varlen route also gives the padded route's result for causal attention (with and
# without a sliding window), checked with it; a decoder otherwise takes the padded route.
VARLEN_CAUSAL: dict[str, bool] = {"checked": False}


@dataclass(frozen=True)
class Masking:
    """Which keys a query of the same text may see: all (``causal`` false) or those up to itself
    (``causal``), and of those only the ones less than ``window`` positions away (a sliding-window
    layer, as transformers passes it; None: no limit)."""

    causal: bool = False
    window: int | None = None

    def allowed(self, length: int, device: torch.device) -> torch.Tensor | None:
        """A (length, length) boolean mask for one text, or None where plain SDPA needs none."""
        if not self.causal and (self.window is None or self.window >= length):
            return None
        query = torch.arange(length, device=device)[:, None]
        key = torch.arange(length, device=device)[None, :]
        mask = key <= query if self.causal else torch.ones(length, length, dtype=torch.bool, device=device)
        if self.window is not None and self.window < length:
            # transformers' sliding windows: |query - key| < window (causal: the window keys ending at the query).
            mask = mask & (key > query - self.window) & (key < query + self.window)
        return mask

    def varlen_window(self) -> tuple[int, int]:
        """FlashAttention's (left, right) window: -1 is no limit, (-1, 0) is causal."""
        left = self.window - 1 if self.window is not None else -1
        right = 0 if self.causal else (self.window - 1 if self.window is not None else -1)
        return left, right


BIDIRECTIONAL = Masking()


def _gqa(q: torch.Tensor, k: torch.Tensor) -> dict[str, bool]:
    """Grouped-query attention (fewer key/value heads than query heads, e.g. Qwen2) for packed
    (tokens, heads, head_dim) inputs: SDPA shares each key/value head among its group itself."""
    return {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scaling: float | None,
                      dropout: float, masking: Masking = BIDIRECTIONAL) -> torch.Tensor:
    heads, head_dim = q.shape[1], q.shape[2]

    def padded(t: torch.Tensor) -> torch.Tensor:
        block = t.new_zeros(packing.rows * packing.width, t.shape[1], head_dim).index_copy(0, packing.flat_index, t)
        return block.view(packing.rows, packing.width, t.shape[1], head_dim).transpose(1, 2)

    keep = torch.zeros(packing.rows * packing.width, dtype=torch.bool, device=q.device)
    keep[packing.flat_index] = True
    mask = keep.view(packing.rows, 1, 1, packing.width)
    within = masking.allowed(packing.width, q.device)
    if within is not None:  # texts start at position 0 of their row, so one mask serves every row
        mask = mask & within[None, None]
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, **_gqa(q, k))
    return out.transpose(1, 2).reshape(packing.rows * packing.width, heads, head_dim)[packing.flat_index]


def _per_text(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scaling: float | None,
              dropout: float, masking: Masking) -> torch.Tensor:
    """One SDPA call per text: no padding computed at all (the CPU's fixed layout)."""
    bounds = packing.cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        windowed = masking.window is not None and masking.window < b - a
        mask = masking.allowed(b - a, q.device) if windowed else None
        # Causal alone is SDPA's own flag (its fast kernels keep it); a window needs the mask.
        causal = masking.causal and mask is None
        outs.append(F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)),
                                                   attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
                                                   **_gqa(q, k))[0].transpose(0, 1))
    return torch.cat(outs)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scaling: float | None,
             dropout: float, masking: Masking) -> torch.Tensor:
    """One padded SDPA call per group of texts of about one length: the dense layers compute no
    padding, attention only the little within each group, in a few calls."""
    groups = packing.groups
    if groups is None:
        return _padded_attention(q, k, v, packing, scaling, dropout, masking)
    outs = [_padded_attention(q[tokens], k[tokens], v[tokens], place, scaling, dropout, masking)
            for tokens, place in zip(groups.tokens, groups.places)]
    return torch.cat(outs)[groups.restore]


def _attend(route: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
            scaling: float | None, dropout: float, masking: Masking = BIDIRECTIONAL) -> torch.Tensor:
    """Attention of packed (tokens, heads, head_dim) inputs, each text to itself (and, for a
    causal module, each token to the tokens before it)."""
    if route == "per_text":
        return _per_text(q, k, v, packing, scaling, dropout, masking)
    if route == "grouped":
        return _grouped(q, k, v, packing, scaling, dropout, masking)
    if route == "varlen":
        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), packing.cu_seqlens, packing.cu_seqlens,
                           packing.max_length, packing.max_length, scale=scaling,
                           window_size=masking.varlen_window(), enable_gqa=k.shape[1] != q.shape[1])
    return _padded_attention(q, k, v, packing, scaling, dropout, masking)


def _check_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, masking: Masking) -> None:
    """Raise unless the varlen route gives the padded route's result, and a gradient, for ``masking``."""
    expected = _padded_attention(q, k, v, packing, None, 0.0, masking)
    got = _attend("varlen", q, k, v, packing, None, 0.0, masking)
    error = float((got.float() - expected.float()).abs().max())
    if not error <= 3e-2:
        raise ValueError(f"differs from padded attention by {error:.1e} ({masking})")
    got.float().sum().backward()


def choose_cuda_routes(device: torch.device) -> dict[tuple[bool, bool], str]:
    """Use varlen where it gives the padded route's result here, for each case it can serve."""
    if CUDA_ROUTES or device.type != "cuda":
        return CUDA_ROUTES
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 37, 1, 64, 20, 128, 3])
    packing = pack_ragged(Ragged(torch.zeros(int(lengths.sum()), dtype=torch.long), lengths)).packing.to(device)
    base = [torch.randn(int(lengths.sum()), 4, 32, generator=generator).to(device) for _ in range(3)]
    for dropout in (False, True):
        for half in (False, True):
            CUDA_ROUTES[dropout, half] = "padded"
    if varlen_attn is not None:
        try:
            q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in base)
            _check_varlen(q, k, v, packing, BIDIRECTIONAL)
            CUDA_ROUTES[False, True] = "varlen"
            # Decoders' causal attention (and sliding windows) too, or they take the padded route.
            for masking in (Masking(causal=True), Masking(causal=True, window=16)):
                _check_varlen(q, k, v, packing, masking)
            VARLEN_CAUSAL["checked"] = True
        except Exception as exc:  # a kernel this torch or GPU lacks, or a wrong answer
            logger.info("varlen attention not used%s: %s",
                        " for causal attention" if CUDA_ROUTES[False, True] == "varlen" else "", exc)
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


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function that goes with ``packed_attention``: none for packed inputs, SDPA's own
    mask for padded ones (evaluation)."""
    if PACKED_CALL.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


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
    if kwargs.get("softcap") is not None:  # as transformers' SDPA does: the packing probe then turns packing off
        raise ValueError("packed attention does not support softcap")
    masking = module_masking(module, kwargs.get("is_causal"), kwargs.get("sliding_window"))
    # On the CPU attention runs in groups of texts of about one length where the layout chose
    # groups (see LayoutChoice), else one call per text.
    if q.is_cuda:
        route = CUDA_ROUTES.get((dropout > 0, half), "padded")
    else:
        route = "grouped" if packing.groups is not None else "per_text"
    if route == "varlen" and masking != BIDIRECTIONAL and not VARLEN_CAUSAL["checked"]:
        route = "padded"
    return _attend(route, q, k, v, packing, scaling, dropout, masking).unsqueeze(0), None


def module_masking(module: nn.Module, is_causal: bool | None, sliding_window: int | None) -> Masking:
    """How an attention module masks, as transformers' own SDPA attention reads it: the call's
    ``is_causal`` first, else the module's (a decoder's attention says True, an encoder's False;
    one that says nothing is taken as an encoder's). A config with ``is_causal: false`` turns a
    decoder bidirectional in transformers' masks, so here too."""
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
        if getattr(getattr(module, "config", None), "is_causal", True) is False:
            is_causal = False
    window = sliding_window if isinstance(sliding_window, int) and sliding_window > 0 else None
    return Masking(bool(is_causal), window)


def pack_padded(inputs: Padded, groups: int = 0) -> Packed:
    """A padded block -> the same texts packed (``groups``: as ``pack_ragged``)."""
    mask = inputs.attention_mask.bool()
    return pack_ragged(Ragged(inputs.input_ids[mask], mask.sum(dim=1)), groups)


def pack_ragged(inputs: Ragged, groups: int = 0) -> Packed:
    """Ragged -> packed, with attention in ``groups`` groups of texts of about one length (0: no
    groups). Done on the host, where the lengths are known without a device sync."""
    lengths = inputs.lengths
    rows = len(lengths)
    width = int(lengths.max()) if rows else 0
    cu = F.pad(lengths.cumsum(0), (1, 0))
    positions = torch.arange(len(inputs.input_ids)) - cu[:-1].repeat_interleave(lengths)
    flat_index = torch.arange(rows).repeat_interleave(lengths) * width + positions
    grouped = attention_groups(lengths, cu, groups) if groups and rows else None
    return Packed(inputs.input_ids, positions, Packing(cu.to(torch.int32), flat_index, rows, width, width, grouped))


def group_runs(lengths: torch.Tensor, groups: int) -> tuple[torch.Tensor, list[slice]]:
    """The texts longest first (a stable sort) and ``groups`` runs of that order of equal count."""
    rows = len(lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    size = -(-rows // max(1, min(groups, rows))) if rows else 1
    return order, [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def attention_groups(lengths: torch.Tensor, cu: torch.Tensor, groups: int) -> AttentionGroups:
    order, runs = group_runs(lengths, groups)
    tokens, places = [], []
    for run in runs:
        texts = order[run]
        sizes = lengths[texts]
        width, count = int(sizes[0]), int(sizes.sum())
        starts = F.pad(sizes.cumsum(0), (1, 0))[:-1]
        within = torch.arange(count) - starts.repeat_interleave(sizes)  # each token's position in its text
        tokens.append(cu[texts].repeat_interleave(sizes) + within)
        flat = torch.arange(len(texts)).repeat_interleave(sizes) * width + within
        places.append(Packing(torch.zeros(0, dtype=torch.int32), flat, len(texts), width, width))
    restore = torch.empty(int(cu[-1]), dtype=torch.long)
    restore[torch.cat(tokens)] = torch.arange(int(cu[-1]))
    return AttentionGroups(tokens, places, restore)


def pad_ragged(inputs: Ragged, pad_token_id: int) -> Padded:
    """Ragged -> one padded block, padding on the right."""
    lengths = inputs.lengths
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    ids = torch.full(mask.shape, pad_token_id, dtype=torch.long, device=lengths.device)
    ids[mask] = inputs.input_ids
    return Padded(ids, mask.long())


def length_chunks(lengths: torch.Tensor, chunks: int) -> tuple[torch.Tensor, list[slice]]:
    """``group_runs`` for padded chunks: at most ``chunks`` runs of at least ``MIN_CHUNK_ROWS``
    texts each; padded one run at a time, each is padded only to its own longest text."""
    return group_runs(lengths, max(1, min(chunks, len(lengths) // MIN_CHUNK_ROWS)))


def padded_tokens(lengths: torch.Tensor, chunks: int = 1) -> int:
    """Tokens computed when these texts are padded in ``length_chunks`` (1: one padded block)."""
    if not len(lengths):
        return 0
    if chunks <= 1:
        return len(lengths) * int(lengths.max())
    order, parts = length_chunks(lengths, chunks)
    ordered = lengths[order]
    return sum((part.stop - part.start) * int(ordered[part.start]) for part in parts)


# The CPU's costs of encoding (forward and backward), fitted to 360 timed steps of MiniLM-L6 on a
# 2-core x86 CPU (torch 2.13): questions and answers of both packaged sets at lengths 128 to 512,
# 16 to 64 texts, in every layout (median error of the fit 5%). FLOPs per second of the dense
# layers and of attention; seconds per layer of an attention call and of a pass of the encoder;
# hidden units per second moved per layer by packed attention's scatter into groups and back.
# Only their ratios matter: they decide which layout costs least, not how long it takes.
CPU_DENSE_FLOPS = 2.305e11
CPU_ATTENTION_FLOPS = 2.595e10
CPU_ATTENTION_CALL_SECONDS = 7.88e-4
CPU_PASS_SECONDS = 7.64e-3
CPU_REGROUP_UNITS = 2.71e7
GROUP_COUNTS = (1, 2, 4, 8, 16, 32)  # attention groups tried for packed texts


@dataclass(frozen=True)
class Plan:
    """A batch's layout: ``packed`` with attention in ``parts`` groups of texts of about one length
    (0: no groups, each text its own attention call on the CPU), or padded in ``parts``
    length-sorted chunks."""

    packed: bool
    parts: int


@dataclass(frozen=True)
class LayoutChoice:
    """Which layout a training batch's texts take.

    With ``by_cost`` (the CPU) it is the ``Plan`` that a model of the forward and backward time puts
    lowest, from the texts' lengths alone. Packing saves the dense layers' padding; its attention
    runs in groups of texts of about one length, each group one padded call, so more groups cost
    more calls and less padding in attention. Padded chunks cost a pass of the encoder each and
    their padding. The choice is a function of the lengths, so a batch takes the same layout in
    every run, resumed or not; every layout gives the same embeddings (packing is checked against
    padding when the model loads). Without ``by_cost`` (a GPU, or ``model.layout_by_cost=false``):
    packed whenever packing is on (no groups: on the CPU one attention call per text), else
    ``max_chunks`` chunks.
    """

    packed: bool  # packing is on for this model and device
    max_chunks: int = 1  # model.padded_chunks
    by_cost: bool = False
    token: float = 0.0  # cost of a token through the dense layers
    score: float = 0.0  # of an attention score (a query token against a key token)
    call: float = 0.0  # of an attention call
    encoder_pass: float = 0.0  # of a pass of the encoder (one per padded chunk, one for packed texts)
    regroup: float = 0.0  # of a packed token's way into its attention group and back

    @classmethod
    def for_model(cls, config: Any, packed: bool, max_chunks: int, device: torch.device,
                  by_cost: bool = True) -> LayoutChoice:
        """The costs of this architecture on ``device`` (by cost on the CPU only)."""
        if device.type != "cpu" or not by_cost:
            return cls(packed, max_chunks)
        hidden = int(config.hidden_size)
        layers = int(getattr(config, "num_hidden_layers", 1))
        inter = int(getattr(config, "intermediate_size", 4 * hidden))
        # Forward and backward: three times the forward's 2 FLOPs per multiply-add.
        dense = 6 * layers * (4 * hidden * hidden + 2 * hidden * inter)
        attention = 6 * layers * 2 * hidden  # scores and their weighted values
        return cls(packed, max_chunks, True, dense / CPU_DENSE_FLOPS, attention / CPU_ATTENTION_FLOPS,
                   layers * CPU_ATTENTION_CALL_SECONDS, layers * CPU_PASS_SECONDS,
                   layers * hidden / CPU_REGROUP_UNITS)

    def plans(self, rows: int, max_chunks: int) -> list[Plan]:
        packed = [Plan(True, g) for g in GROUP_COUNTS if g == 1 or g <= rows] if self.packed else []
        chunks = sorted({1, max_chunks, *(k for k in (2, 4, 8, 16, 32) if k < max_chunks)})
        return packed + [Plan(False, k) for k in chunks]

    def cost(self, lengths: torch.Tensor, plan: Plan) -> float:
        """The modelled cost of encoding texts of these lengths as ``plan`` says."""
        order, runs = group_runs(lengths, plan.parts) if plan.packed else length_chunks(lengths, plan.parts)
        widths = [(run.stop - run.start, int(lengths[order[run.start]])) for run in runs]
        scores_and_calls = sum(self.score * n * w * w + self.call for n, w in widths)
        if plan.packed:
            return (self.token + self.regroup) * int(lengths.sum()) + self.encoder_pass + scores_and_calls
        return scores_and_calls + sum(self.token * n * w + self.encoder_pass for n, w in widths)

    def choose(self, lengths: torch.Tensor, max_chunks: int | None = None) -> Plan:
        """The layout for texts of these lengths (``max_chunks`` below the model's: fewer chunks)."""
        top = self.max_chunks if max_chunks is None else max_chunks
        if not self.by_cost or not len(lengths):
            return Plan(True, 0) if self.packed else Plan(False, top)
        # Ties go to the first plan: packed, fewest groups.
        return min(self.plans(len(lengths), top), key=lambda plan: self.cost(lengths, plan))

    def computed_tokens(self, lengths: torch.Tensor) -> int:
        """Tokens the dense layers compute for texts of these lengths (padding included)."""
        plan = self.choose(lengths)
        return int(lengths.sum()) if plan.packed else padded_tokens(lengths, plan.parts)


def pad_chunked(inputs: Ragged, pad_token_id: int, chunks: int) -> Chunked:
    """Ragged -> ``length_chunks`` padded one by one, with the row of each text in their
    concatenated output."""
    padded = pad_ragged(inputs, pad_token_id)
    order, parts = length_chunks(inputs.lengths, chunks)
    ordered = inputs.lengths[order]
    pieces = []
    for part in parts:
        rows, width = order[part], int(ordered[part.start])
        pieces.append(Padded(padded.input_ids[rows, :width], padded.attention_mask[rows, :width]))
    restore = torch.empty_like(order)
    restore[order] = torch.arange(len(order))
    return Chunked(pieces, restore)


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
