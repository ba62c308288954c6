"""The embedding model: a transformer encoder, pooling and optional normalization; its export.

``EmbeddingModel.forward`` takes one input object per layout (``model.packing``), so the same
module serves padded evaluation, packed or chunked training, and GradCache's mini-batches.

Decoder embedders (Qwen2, Mistral, Llama... in the e5-mistral / gte-Qwen2 style) keep their causal
attention in every layout, and pool their last token: the tokenizer itself is made to append its
EOS token (``model.append_eos``), so training, the collator and the exported model all see it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tokenizers import processors
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from embedtune.files import read_json_object, write_json
from embedtune.model.folder import ST_POOLING, ModelFolder, ModelLoadError, Pooling, read_model_folder
from embedtune.model.modules import Dense, load_dense, load_transformer, st_dense
from embedtune.model.packing import (
    MIN_CHUNK_ROWS,
    PACKED_ATTENTION,
    PACKED_CALL,
    VARLEN_CAUSAL,
    Chunked,
    Layout,
    LayoutChoice,
    Packed,
    Padded,
    Ragged,
    attention_dropout,
    choose_cuda_routes,
    pack_padded,
    pack_ragged,
    packed_attention,
    packed_mask,
    pad_chunked,
    pad_ragged,
    pool_packed,
)

logger = logging.getLogger(__name__)

# Causal language-model backbones that embedding models are built on; their configs do not say
# is_decoder, so they are known by their type.
DECODER_TYPES = frozenset({"qwen2", "qwen3", "mistral", "llama", "gemma", "gemma2", "gemma3_text", "phi3"})
EOS_PROBE = "an eos probe"


def is_decoder(config: object) -> bool:
    """Whether an encoder config describes a decoder (causal attention)."""
    return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", None) in DECODER_TYPES


def position_limit(encoder: nn.Module) -> int | None:
    """The most tokens a text may have for a model with a learned table of absolute positions
    (BERT, XLM-R: a longer text indexes past the table); None for rotary positions (no table)."""
    table = None
    for name, module in encoder.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            table = module
            break
    if table is None:
        return None
    # RoBERTa and XLM-R count positions from padding_idx + 1.
    offset = table.padding_idx + 1 if table.padding_idx is not None else 0
    return int(table.num_embeddings) - offset


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's own call ends every text with its EOS token (Qwen3-Embedding's does)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(EOS_PROBE)["input_ids"]
    return eos is not None and bool(ids) and ids[-1] == eos


def append_eos_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the tokenizer end every text with its EOS token, after whatever it added before.

    It is done in the Rust tokenizer's post-processor, so every route through the tokenizer
    appends it (its own call, the collator's direct use of the backend, the tokenizer saved with
    the export and loaded by sentence-transformers), and truncation keeps room for it.
    """
    if appends_eos(tokenizer):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        raise ModelLoadError("model.append_eos: the tokenizer has no eos_token to append; set model.append_eos=false "
                             "or use a tokenizer with an EOS token")
    if backend is None:
        raise ModelLoadError(f"model.append_eos: the tokenizer {type(tokenizer).__name__} has no fast (Rust) backend "
                             "to append its EOS token with; set model.append_eos=false or use a fast tokenizer")
    append = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                           special_tokens=[(eos, eos_id)])
    current = backend.post_processor
    backend.post_processor = append if current is None else processors.Sequence([current, append])
    try:
        works = appends_eos(tokenizer)
    except BaseException as exc:  # the Rust side panics on some processor combinations
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        works = False
    if not works:
        backend.post_processor = current
        raise ModelLoadError(f"model.append_eos: the tokenizer {type(tokenizer).__name__} cannot end texts with "
                             f"{eos!r} through its post-processor; set model.append_eos=false")
    logger.info("the tokenizer now ends every text with its EOS token %r (model.append_eos)", eos)


def resolve_append_eos(requested: bool | None, pooling: Pooling, decoder: bool) -> bool:
    """``model.append_eos``: null means on for a decoder pooled by its last token; true needs last-token pooling."""
    if requested is None:
        return decoder and pooling == "last"
    if requested and pooling != "last":
        raise ModelLoadError(f"model.append_eos=true pools the appended EOS token, which needs last-token pooling, "
                             f"but this model pools by {pooling}; set model.pooling=last or model.append_eos=false")
    return requested


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
    """Transformer encoder -> pooled sentence embedding (-> Dense layers) (-> unit length when
    ``normalize``): the module stack of a sentence-transformers folder."""

    def __init__(self, encoder: PreTrainedModel, pooling: Pooling = "mean", normalize: bool = True,
                 dense: Sequence[Dense] = (), folder: ModelFolder | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.dense = nn.ModuleList(dense)  # trained with the encoder
        # What the base folder says that training does not change (prompts, similarity), for the export.
        self.folder = folder
        # The export keeps include_prompt=false only with the base's own (last-token) pooling.
        self.include_prompt = True
        self.trust_remote_code = False  # the export loads the saved encoder again with it
        self.packed = False  # see enable_packing
        # Padded training batches are encoded in this many length-sorted chunks (see length_chunks).
        self.padded_chunks = 1
        self.layout_by_cost = True  # model.layout_by_cost
        self._layouts: tuple[tuple[bool, int, str, bool], LayoutChoice] | None = None
        self.pad_token_id = int(getattr(encoder.config, "pad_token_id", None) or 0)

    @classmethod
    def from_pretrained(cls, name: str, pooling: str = "auto", normalize: bool | None = None,
                        trust_remote_code: bool = False, append_eos: bool | None = None
                        ) -> tuple[EmbeddingModel, PreTrainedTokenizerBase]:
        """The model a folder or Hub name describes, module by module; ``pooling`` and ``normalize``
        replace the folder's own settings when given. ``trust_remote_code`` lets the code that
        comes with a model run (transformers' models and tokenizers, a Dense activation).
        ``append_eos`` (``model.append_eos``) makes the tokenizer end every text with its EOS token."""
        folder = read_model_folder(name)
        chosen_pooling = folder.pooling_for(pooling)
        chosen_normalize = normalize if normalize is not None else (folder.normalize if folder.normalize is not None
                                                                    else True)
        encoder, tokenizer = load_transformer(folder, name, trust_remote_code)
        decoder = is_decoder(encoder.config)
        if decoder:  # embedding never generates: a key/value cache would only hold memory
            encoder.config.use_cache = False
        if resolve_append_eos(append_eos, chosen_pooling, decoder):
            append_eos_token(tokenizer)
        dense = [load_dense(spec, trust_remote_code) for spec in folder.dense]
        logger.info("model %s: %s pooling=%s normalize=%s", folder.path,
                    " -> ".join(folder.modules) or "plain transformers model", chosen_pooling, chosen_normalize)
        model = cls(encoder, chosen_pooling, chosen_normalize, dense, folder)
        model.include_prompt = folder.include_prompt or chosen_pooling != folder.pooling
        model.trust_remote_code = trust_remote_code
        model.freeze_unused(tokenizer)
        return model, tokenizer

    def freeze_unused(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Freeze weights that never reach the embedding (e.g. BERT's pooler head).

        They would get no gradient, and DDP waits for every trainable parameter; freezing them
        keeps them in the saved model unchanged, so the export still loads without warnings.
        """
        inputs = tokenizer(["a short probe sentence"], return_tensors="pt")
        self.zero_grad(set_to_none=True)
        self(Padded(inputs["input_ids"], inputs["attention_mask"])).sum().backward()
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
        """The embedding's size: the last Dense layer's output, else the encoder's hidden size."""
        return int(self.dense[-1].out_features) if len(self.dense) else int(self.encoder.config.hidden_size)

    def enable_packing(self, tokenizer: PreTrainedTokenizerBase, tolerance: float = 1e-4) -> bool:
        """Encode without padding from now on, if this architecture gives the same embeddings that
        way (checked here on a probe batch); otherwise stay on the padded path and say why."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        # Padded inputs (evaluation) still go through SDPA, with SDPA's padding mask; packed ones need none.
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_mask)
        previous = self.encoder.config._attn_implementation
        probe = tokenizer(["a short probe", "a somewhat longer probe sentence with more words in it", "x"],
                          padding=True, return_tensors="pt")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                padded = Padded(probe["input_ids"], probe["attention_mask"])
                expected = self(padded.to(device))
                self.encoder.set_attn_implementation(PACKED_ATTENTION)
                self.packed = True
                got = self(pack_padded(padded).to(device))
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
            logger.info("unpadded encoding on: texts are packed end to end, each text attends only to itself")
            choose_cuda_routes(device)
        return self.packed

    def keep_packing_for(self, device: torch.device, half: bool) -> bool:
        """On CUDA, training packed pays only with the varlen kernel (half precision, no attention
        dropout, and for a decoder its causal form); otherwise padded batches are faster, and
        packing is turned off for training."""
        if not self.packed or device.type != "cuda":
            return self.packed
        dropout = attention_dropout(self.encoder.config) > 0
        routes = choose_cuda_routes(device)
        causal_slow = is_decoder(self.encoder.config) and not VARLEN_CAUSAL["checked"]
        if routes.get((dropout, half)) != "varlen" or causal_slow:
            self.packed = False
            logger.info("padded batches on this GPU: packed attention has no fast kernel here for %s",
                        "attention dropout" if dropout else "causal attention" if causal_slow else "this precision")
        return self.packed

    def layout_choice(self, device: torch.device) -> LayoutChoice:
        """How batches are laid out on ``device``: by cost on the CPU (see ``LayoutChoice``)."""
        key = (self.packed, self.padded_chunks, device.type, self.layout_by_cost)
        if self._layouts is None or self._layouts[0] != key:
            self._layouts = (key, LayoutChoice.for_model(self.encoder.config, self.packed, self.padded_chunks,
                                                         device, self.layout_by_cost))
        return self._layouts[1]

    def prepare(self, inputs: Ragged | Padded, device: torch.device) -> Layout:
        """CPU inputs -> the layout ``forward`` takes, on ``device``: packed, one padded block, or
        (in training) padded in length-sorted chunks, as ``layout_choice`` says for their lengths.
        Evaluation's padded blocks are already of texts of about one length."""
        choice = self.layout_choice(device)
        ready: Layout
        if isinstance(inputs, Padded):
            plan = choice.choose(inputs.attention_mask.sum(dim=1), max_chunks=1)
            ready = pack_padded(inputs, plan.parts) if self.packed and plan.packed else inputs
        else:
            plan = choice.choose(inputs.lengths, max_chunks=None if self.training else 1)
            if plan.packed:
                ready = pack_ragged(inputs, plan.parts)
            elif plan.parts > 1 and inputs.rows >= 2 * MIN_CHUNK_ROWS:
                ready = pad_chunked(inputs, self.pad_token_id, plan.parts)
            else:
                ready = pad_ragged(inputs, self.pad_token_id)
        return ready.to(device)

    def forward(self, inputs: Layout | Ragged) -> torch.Tensor:
        if isinstance(inputs, Chunked):  # padded chunk by chunk, then put back in the texts' order
            return torch.cat([self(chunk) for chunk in inputs.chunks])[inputs.restore]
        if isinstance(inputs, Ragged):  # as the collator gives it (prepare does this off the device)
            device = inputs.input_ids.device
            return self(self.prepare(Ragged(inputs.input_ids.cpu(), inputs.lengths.cpu()), device))
        if isinstance(inputs, Packed):
            packed_call = PACKED_CALL.set(True)
            try:
                hidden = self.encoder(input_ids=inputs.input_ids[None], position_ids=inputs.position_ids[None],
                                      embedtune_packing=inputs.packing).last_hidden_state[0]
            finally:
                PACKED_CALL.reset(packed_call)
            embeddings = pool_packed(hidden, inputs.packing, self.pooling)
        else:
            hidden = self.encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
            embeddings = pool(hidden, inputs.attention_mask, self.pooling)
        for layer in self.dense:
            embeddings = layer(embeddings)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def save_sentence_transformer(self, path: str, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                                  prompts: dict[str, str] | None = None,
                                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a folder that ``SentenceTransformer(path)`` loads, with safetensors weights: the
        base's module stack (Transformer, Pooling with the same mode, the trained Dense layers,
        Normalize), its prompts with ``prompts`` replacing those of the same name, its default
        prompt and similarity function.

        ``state_dict`` is this model's full state (``encoder.*``, ``dense.*``) when it was sharded
        (FSDP, DeepSpeed).
        """
        from sentence_transformers import SentenceTransformer
        from sentence_transformers import models as st_models

        encoder_state = None
        dense_states: list[dict[str, torch.Tensor] | None] = [None] * len(self.dense)
        if state_dict is not None:
            encoder_state = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
            dense_states = [{k.removeprefix(f"dense.{i}."): v for k, v in state_dict.items()
                             if k.startswith(f"dense.{i}.")} for i in range(len(self.dense))]
        os.makedirs(path, exist_ok=True)
        self.encoder.save_pretrained(path, state_dict=encoder_state, safe_serialization=True)
        tokenizer.save_pretrained(path)
        # A model with its own code loads again only with it (the files come along with save_pretrained).
        trusted = {f"{kind}_args": {"trust_remote_code": True} for kind in ("model", "tokenizer", "config")} \
            if self.trust_remote_code else {}
        modules: list[nn.Module] = [
            st_models.Transformer(path, max_seq_length=max_seq_length, **trusted),
            st_models.Pooling(int(self.encoder.config.hidden_size), pooling_mode=ST_POOLING[self.pooling],
                              include_prompt=self.include_prompt),
            *(st_dense(layer, state) for layer, state in zip(self.dense, dense_states)),
        ]
        if self.normalize:
            modules.append(st_models.Normalize())
        folder = self.folder or ModelFolder(path, path, False)
        merged = {**folder.prompts, **(prompts or {})}
        st_model = SentenceTransformer(modules=modules, prompts=merged or None, device="cpu",
                                       default_prompt_name=folder.default_prompt_name,
                                       similarity_fn_name=folder.similarity)
        st_model.save(path, safe_serialization=True)
        if folder.do_lower_case:
            # sentence-transformers 6 no longer writes do_lower_case, and a tokenizer class rebuilds its
            # own normalizer on load, dropping the Lowercase step: the flag keeps the export lower-casing.
            config_file = os.path.join(path, "sentence_bert_config.json")
            write_json(config_file, {**read_json_object(config_file), "do_lower_case": True})
