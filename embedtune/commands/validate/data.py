"""The data rows, from one pass over the files: counts, bad records, empty texts, duplicates,
the held-out split, and, on a seeded sample, token lengths and padding.

Memory is bounded by the sample and one integer per distinct question, pair and held-out
question, whatever the size of the files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from embedtune.commands.validate.checks import FAIL, OK, WARN, Check, number
from embedtune.commands.validate.environment import LoadedModel
from embedtune.config import Config, ConfigError, DataConfig
from embedtune.data.collate import query_prefix
from embedtune.data.index import build_index, index_place
from embedtune.data.records import (
    DataError,
    Pair,
    Reject,
    document_tokens,
    read_records,
    resolve_files,
    text_key,
    trains_on,
)
from embedtune.data.split import MAX_REJECTS_SHOWN, HeldOutQuestions, source_problems, weighted_total
from embedtune.distributed import cores_per_process
from embedtune.files import human_bytes
from embedtune.model.packing import padded_tokens

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE = 5000
TRUNCATION_WARN = 0.05  # share of texts cut by the max length above which a run is worth a second look
TOKENIZE_CHUNK = 1000
MAX_FILES_SHOWN = 5
ROLES = ("query", "positive", "negative")


@dataclass
class DataStats:
    """What one pass over the files found; ``sample`` is a seeded reservoir of good pairs."""

    files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    records: int = 0  # non-blank lines or rows of the training files
    pairs: int = 0  # good records of the training files
    train: int = 0  # training pairs in the files (data.source_weights may repeat or thin them: epoch_pairs)
    sources: dict[str | None, int] = field(default_factory=dict)  # training pairs per source
    epoch_pairs: int = 0  # training pairs of one epoch, after data.source_weights
    held_out: int = 0  # carved off the training files, or the good records of the eval files
    eval_queries: int = 0  # distinct held-out questions usable for evaluation (before max_eval_queries)
    eval_in_train: int = 0  # training pairs whose question is also a held-out one (eval files only)
    rejects: int = 0
    first_rejects: list[Reject] = field(default_factory=list)
    empty: Counter[str] = field(default_factory=Counter)  # role -> empty texts
    duplicate_questions: int = 0
    duplicate_pairs: int = 0
    sample: list[Pair] = field(default_factory=list)
    seen_for_sample: int = 0


def empty_texts(raw: Any, cfg: DataConfig) -> Counter[str]:
    """Empty or blank texts (and nulls, which is what an empty CSV cell becomes) in one raw record.

    The reader rejects such records; counting them apart tells an empty answer from a broken line.
    """
    found: Counter[str] = Counter()
    record = raw
    if isinstance(raw, str):
        try:
            record = json.loads(raw)
        except ValueError:
            return found
    if not isinstance(record, dict):
        return found
    for role, name in (("query", cfg.query_field), ("positive", cfg.positive_field)):
        if name in record and (record[name] is None or (isinstance(record[name], str) and not record[name].strip())):
            found[role] += 1
    if cfg.negatives_field and isinstance(record.get(cfg.negatives_field), (str, list)):
        value = record[cfg.negatives_field]
        items = [value] if isinstance(value, str) else value
        found["negative"] += sum(1 for v in items if v is None or (isinstance(v, str) and not v.strip()))
    return +found


class DataScan:
    """The pass over the files, one record at a time, into ``stats``."""

    def __init__(self, cfg: Config, sample_size: int) -> None:
        self.data_cfg = cfg.data
        self.sample_size = sample_size
        self.rng = random.Random(cfg.train.seed)
        self.stats = DataStats(files=resolve_files(cfg.data.train_files), eval_files=resolve_files(cfg.data.eval_files))
        # Evaluation's own rule for which held-out pairs it uses (one per question, positives only).
        self.evaluated = HeldOutQuestions()
        self.eval_file_questions: frozenset[int] = frozenset()
        self.questions: set[int] = set()
        self.pairs: set[int] = set()

    def reject(self, item: Reject, raw: Any) -> None:
        self.stats.rejects += 1
        self.stats.empty.update(empty_texts(raw, self.data_cfg))
        if len(self.stats.first_rejects) < MAX_REJECTS_SHOWN:
            self.stats.first_rejects.append(item)

    def sample(self, pair: Pair) -> None:
        """Reservoir sampling: every good pair has the same chance to be measured."""
        stats = self.stats
        stats.seen_for_sample += 1
        if len(stats.sample) < self.sample_size:
            stats.sample.append(pair)
        elif self.sample_size:
            slot = self.rng.randrange(stats.seen_for_sample)
            if slot < self.sample_size:
                stats.sample[slot] = pair

    def hold_out(self, pair: Pair) -> None:
        self.stats.held_out += 1
        if self.evaluated.admit(pair):
            self.stats.eval_queries += 1

    def eval_record(self, item: Pair | Reject, raw: Any) -> None:
        if isinstance(item, Reject):
            self.reject(item, raw)
        else:
            self.hold_out(item)
            self.sample(item)

    def train_record(self, item: Pair | Reject, raw: Any) -> None:
        stats = self.stats
        stats.records += 1
        if isinstance(item, Reject):
            self.reject(item, raw)
            return
        stats.pairs += 1
        query_key = text_key(item.query)
        pair_key = (query_key << 64) | text_key(item.positive)
        if query_key in self.questions:
            stats.duplicate_questions += 1
            if pair_key in self.pairs:
                stats.duplicate_pairs += 1
        self.questions.add(query_key)
        self.pairs.add(pair_key)
        self.sample(item)
        if not trains_on(item, self.data_cfg):
            self.hold_out(item)
        else:
            stats.train += 1
            stats.sources[item.source] = stats.sources.get(item.source, 0) + 1
            if query_key in self.eval_file_questions:
                stats.eval_in_train += 1


def scan_data(cfg: Config, sample_size: int, require_negatives: bool = False) -> DataStats:
    """One pass over the eval files, then the training files, parsed as training parses them
    (``require_negatives``: the loss trains on triplets, so a record without a negative is bad)."""
    scan = DataScan(cfg, sample_size)
    # Evaluation reads no teacher scores: held-out files need none.
    for item, raw in read_records(scan.stats.eval_files, cfg.data.model_copy(update={"scores_field": None}),
                                  require_negatives):
        scan.eval_record(item, raw)
    # The held-out questions of the eval files, for the overlap with training.
    scan.eval_file_questions = frozenset(scan.evaluated.seen)
    for item, raw in read_records(scan.stats.files, cfg.data, require_negatives):
        scan.train_record(item, raw)
    scan.stats.epoch_pairs = weighted_total(scan.stats.sources, cfg.data.source_weights)
    return scan.stats


def show_files(files: list[str]) -> str:
    lines = []
    for path in files[:MAX_FILES_SHOWN]:
        size = f", {human_bytes(os.path.getsize(path))}" if os.path.isfile(path) else ""
        lines.append(f"{path}{size}")
    if len(files) > MAX_FILES_SHOWN:
        lines.append(f"... and {len(files) - MAX_FILES_SHOWN} more")
    return "\n".join(lines)


def records_check(d: DataConfig, stats: DataStats) -> Check:
    records = Check("data", "records", OK,
                    f"{number(stats.records)} records, {number(stats.pairs)} good pairs: {number(stats.train)} "
                    f"training, {number(stats.held_out)} held out ({number(stats.eval_queries)} distinct questions, "
                    f"evaluation uses up to {number(d.max_eval_queries)})",
                    {"records": stats.records, "pairs": stats.pairs, "train": stats.train,
                     "held_out": stats.held_out, "eval_queries": stats.eval_queries})
    if stats.train == 0:
        records.status = FAIL
        records.detail += "\nno training pair: every record is bad or held out; check the files and data.eval_fraction"
    elif stats.held_out == 0 and (d.eval_files or d.eval_fraction > 0):
        records.status = WARN
        records.detail += "\nno held-out pair: the run cannot report retrieval metrics"
    return records


def bad_records_check(d: DataConfig, stats: DataStats) -> Check:
    bad = {"count": stats.rejects, "first": [asdict(r) | {"raw": r.raw[:200]} for r in stats.first_rejects]}
    if not stats.rejects:
        return Check("data", "bad records", OK, "none", bad)
    lines = [f"{number(stats.rejects)} bad record{'s' * (stats.rejects != 1)}:"]
    lines += [f"  {r.message()}" for r in stats.first_rejects]
    if stats.rejects > len(stats.first_rejects):
        lines.append(f"  ... and {number(stats.rejects - len(stats.first_rejects))} more")
    if d.on_bad_record == "error":
        lines.append("the run stops at the first (data.on_bad_record=error): fix them, or set "
                     "data.on_bad_record=skip")
    else:
        lines.append("skipped (data.on_bad_record=skip) and kept in output_dir/rejected.jsonl")
    return Check("data", "bad records", FAIL if d.on_bad_record == "error" else WARN, "\n".join(lines), bad)


def duplicates_check(cfg: Config, stats: DataStats) -> Check:
    masked = cfg.loss.mask_false_negatives
    detail = (f"{number(stats.duplicate_questions)} records repeat an earlier question, "
              f"{number(stats.duplicate_pairs)} repeat an earlier question and answer")
    if stats.duplicate_pairs:
        detail += "\nrepeated pairs are trained on more than once per epoch; drop them unless meant as weights"
    if stats.duplicate_questions and not masked:
        detail += ("\nloss.mask_false_negatives is off: a duplicate question's answer counts as a negative "
                   "when both land in one batch")
    status = WARN if stats.duplicate_pairs or (stats.duplicate_questions and not masked) else OK
    return Check("data", "duplicates", status, detail,
                 {"questions": stats.duplicate_questions, "pairs": stats.duplicate_pairs})


def data_checks(cfg: Config, stats: DataStats) -> list[Check]:
    d = cfg.data
    checks = [Check("data", "files", OK,
                    f"{len(stats.files)} training file{'s' * (len(stats.files) != 1)}:\n{show_files(stats.files)}"
                    + (f"\n{len(stats.eval_files)} eval file(s):\n{show_files(stats.eval_files)}"
                       if stats.eval_files else ""),
                    {"train_files": stats.files, "eval_files": stats.eval_files}),
              records_check(d, stats)]
    if d.eval_files:
        status = WARN if stats.eval_in_train else OK
        checks.append(Check("data", "eval overlap", status,
                            f"{number(stats.eval_in_train)} training pairs ask a question of the eval files"
                            + (": held-out metrics will look better than they are" if stats.eval_in_train else ""),
                            {"eval_in_train": stats.eval_in_train}))
    checks.append(bad_records_check(d, stats))
    empty_total = sum(stats.empty.values())
    parts = ", ".join(f"{stats.empty[r]} {r}" for r in ROLES if stats.empty[r])
    checks.append(Check("data", "empty texts", WARN if empty_total else OK,
                        f"{empty_total} ({parts}; counted among the bad records)" if empty_total else "none",
                        {"total": empty_total, **{r: stats.empty[r] for r in ROLES}}))
    checks.append(duplicates_check(cfg, stats))
    if d.batch_by_source or d.source_weights or len(stats.sources) > 1:
        checks.append(sources_check(cfg, stats))
    return checks


def sources_check(cfg: Config, stats: DataStats) -> Check:
    """The training pairs per source, and what data.source_weights and data.batch_by_source make of them."""
    d = cfg.data
    problem, notes = source_problems(stats.sources, d, cfg.train.batch_size)
    shown = ", ".join(f"{name if name is not None else '(none)'} {number(n)}"
                      + (f" x{d.source_weights[name]:g}" if name in (d.source_weights or {}) else "")
                      for name, n in sorted(stats.sources.items(), key=lambda kv: -kv[1]))
    detail = f"{len(stats.sources)} source(s) of training pairs: {shown}"
    if d.source_weights:
        detail += f"; {number(stats.epoch_pairs)} pairs per epoch after data.source_weights"
    status = FAIL if problem else WARN if notes else OK
    detail = "\n".join([detail, *([problem] if problem else notes)])
    return Check("data", "sources", status, detail,
                 {"sources": {str(k): v for k, v in stats.sources.items()}, "epoch_pairs": stats.epoch_pairs})


# --- token lengths and padding, on the sample ---------------------------------------------------


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens per text with the special tokens, uncut: what the collator's max_length applies to."""
    lengths: list[int] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        encoded = tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=True, truncation=False,
                            return_attention_mask=False, return_token_type_ids=False, verbose=False)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def length_check(kind: str, lengths: list[int], max_length: int, key: str, positions: int | None,
                 sample_note: str) -> Check:
    ordered = sorted(lengths)
    stats = {p: percentile(ordered, q) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
    stats["max"] = ordered[-1] if ordered else 0
    over = sum(1 for n in ordered if n > max_length)
    rate = over / len(ordered) if ordered else 0.0
    data = {"texts": len(ordered), **stats, "max_length": max_length, "truncated": over, "truncation_rate": rate}
    detail = (f"p50 {stats['p50']}, p90 {stats['p90']}, p99 {stats['p99']}, max {stats['max']} tokens vs "
              f"{key}={max_length}: {number(over)} of {number(len(ordered))} ({rate:.1%}) cut ({sample_note})")
    status = OK
    if positions and max_length > positions:
        if stats["max"] > positions:
            status = FAIL
            detail += (f"\n{key}={max_length} is beyond the model's {positions} positions and some texts are "
                       f"longer: the model cannot embed them; set {key}={positions} or less")
        else:
            status = WARN
            detail += f"\n{key}={max_length} is beyond the model's {positions} positions; no sampled text reaches it"
    if rate > TRUNCATION_WARN and status == OK:
        status = WARN
        suggested = min(stats["p99"], positions) if positions else stats["p99"]
        detail += (f"\nmore than {TRUNCATION_WARN:.0%} of the {kind} texts are cut: {key}={suggested} covers 99% "
                   f"of the sample" + (f" (capped at the model's {positions} positions)" if suggested == positions
                                       and stats["p99"] > positions else ""))
        data["suggested_max_length"] = suggested
    return Check("data", f"{kind} lengths", status, detail, data)


def length_checks(cfg: Config, stats: DataStats, model: LoadedModel) -> list[Check]:
    d = cfg.data
    if not stats.sample:
        return [Check("data", "token lengths", WARN, "not measured (no good record, or --sample 0)")]
    total = stats.seen_for_sample
    note = (f"all {number(total)} records" if len(stats.sample) == total
            else f"a random sample of {number(len(stats.sample))} of {number(total)} records")
    try:
        prefix = query_prefix(d, model.folder)
    except ConfigError:  # an unknown prompt name: the config row says so; measure without it
        prefix = d.query_prefix
    # As the collator builds them: a record's own instruction replaces the prefix.
    queries = [(prefix if p.prompt is None else p.prompt) + p.query for p in stats.sample]
    documents = [d.document_prefix + t for p in stats.sample for t in (p.positive, *p.negatives)]
    document_lengths = token_lengths(model.tokenizer, documents)
    return [
        length_check("query", token_lengths(model.tokenizer, queries), d.query_max_length,
                     "data.query_max_length", model.positions, note),
        length_check("document", document_lengths, d.document_max_length,
                     "data.document_max_length", model.positions, note),
        padding_check(cfg, stats.sample, document_lengths, note),
    ]


def padding_check(cfg: Config, sample: list[Pair], document_lengths: list[int], note: str) -> Check:
    """How much of a padded batch of documents is real text: in one block, in the model's
    length-sorted chunks, and with batches grouped by length as well (full batches of the sample,
    in its order, as one process would get them)."""
    per_batch = cfg.train.micro_batch_size()
    if len(sample) < per_batch:
        return Check("data", "padding", OK, f"not estimated: the sample holds fewer pairs than a batch ({note})")
    # The documents of each pair (positive, then negatives), cut at the max length as the collator cuts them.
    cut, per_pair, at = [min(n, cfg.data.document_max_length) for n in document_lengths], [], 0
    for pair in sample:
        per_pair.append(cut[at:at + 1 + len(pair.negatives)])
        at += 1 + len(pair.negatives)

    def efficiency(order: list[int], chunks: int) -> float:
        real = computed = 0
        for start in range(0, len(order) - per_batch + 1, per_batch):
            lengths = torch.tensor([n for i in order[start:start + per_batch] for n in per_pair[i]])
            real += int(lengths.sum())
            computed += padded_tokens(lengths, chunks)
        return real / max(computed, 1)

    chunks, window = cfg.model.padded_chunks, cfg.data.group_by_length or 16
    grouped: list[int] = []
    for start in range(0, len(sample), window * per_batch):
        grouped += sorted(range(start, min(start + window * per_batch, len(sample))),
                          key=lambda i: document_tokens(sample[i]))
    figures = {"batch": per_batch, "one_block": efficiency(list(range(len(sample))), 1),
               "chunks": chunks, "in_chunks": efficiency(list(range(len(sample))), chunks),
               "group_by_length": window, "grouped_in_chunks": efficiency(grouped, chunks)}
    detail = (f"real share of the document tokens a padded batch of {per_batch} computes: "
              f"{figures['one_block']:.2f} in one block, {figures['in_chunks']:.2f} in length-sorted chunks "
              f"(model.padded_chunks={chunks}), {figures['grouped_in_chunks']:.2f} with data.group_by_length="
              f"{window}{'' if cfg.data.group_by_length else ' as well (off now)'}; packed batches (model.unpad) "
              f"compute no padding ({note})")
    return Check("data", "padding", OK, detail, figures)


def index_check(cfg: Config, require_negatives: bool) -> Check:
    """data.order=indexed: the training files indexed now, where the run reads their indexes, so a
    job started after this (on GPUs, say) reads no record before its first step."""
    folder, keys = index_place(cfg)
    files = resolve_files(cfg.data.train_files)
    started = time.perf_counter()
    try:
        index = build_index(files, cfg.data, folder, require_negatives, cores_per_process(), keys)
    except DataError as exc:
        return Check("data", "index", FAIL, str(exc))
    seconds = time.perf_counter() - started
    return Check("data", "index", OK, f"{number(index.built)} of {number(len(files))} file(s) indexed now, in "
                 f"{seconds:.0f} s ({number(index.total)} training pairs in {number(len(index.blocks))} blocks); kept "
                 f"in {folder}, where the run reads them",
                 {"files": len(files), "built": index.built, "pairs": index.total, "blocks": len(index.blocks),
                  "folder": folder, "seconds": seconds})


def data_section(cfg: Config, sample_size: int, require_negatives: bool, model: LoadedModel | None
                 ) -> tuple[list[Check], DataStats | None]:
    """The data rows, and the figures of the pass (None when the files could not be read)."""
    started = time.perf_counter()
    try:
        stats = scan_data(cfg, sample_size, require_negatives)
    except DataError as exc:
        return [Check("data", "files", FAIL, str(exc))], None
    except Exception as exc:  # a reader's own error (network, codec...): reported, not raised
        return [Check("data", "files", FAIL, f"cannot read the data: {type(exc).__name__}: {exc}")], None
    checks = data_checks(cfg, stats)
    if cfg.data.order == "indexed":
        checks.append(index_check(cfg, require_negatives))
    if model is not None:
        checks += length_checks(cfg, stats, model)
    else:
        checks.append(Check("data", "token lengths", WARN, "not measured: the model's tokenizer did not load"))
    logger.info("data: %d records read in %.1f s", stats.records, time.perf_counter() - started)
    return checks, stats
