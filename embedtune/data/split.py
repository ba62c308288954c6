"""The held-out split and the reads before training: preflight, held-out pairs, the pair count.

A held-out pair comes from ``data.eval_files``, or, when there are none, is carved off the
training stream by a stable hash of its question, so the same question lands on the same side
on any machine and is never trained on. Training, ``embedtune eval``, ``mine`` and ``validate``
all split through ``is_held_out`` and choose evaluation questions through ``HeldOutQuestions``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from embedtune.config import DataConfig
from embedtune.data.records import (
    DataError,
    Pair,
    Reject,
    format_stream_reject,
    read_pairs,
    resolve_files,
    text_key,
    trains_on,
)

logger = logging.getLogger(__name__)


def weighted_total(sizes: dict[str | None, int], weights: dict[str, float] | None) -> int:
    """The training pairs of an epoch once ``data.source_weights`` has repeated or thinned each
    source's (``stream.weighted`` makes exactly these)."""
    total = 0
    for name, n in sizes.items():
        weight = (weights or {}).get(name, 1.0) if name is not None else 1.0
        total += int(weight) * n + round((weight - int(weight)) * n)
    return total


def source_problems(sizes: dict[str | None, int], cfg: DataConfig, batch_size: int) -> tuple[str | None, list[str]]:
    """What the sources of the training data say about ``data.source_weights`` and
    ``data.batch_by_source``: an error (a weight for a source no training record has), and notes
    (a source with fewer pairs in an epoch than a batch, whose pairs then train in the mixed
    batches at the end of each epoch)."""
    known = {name for name in sizes if name is not None}
    listed = ", ".join(f"{name} ({n:,})" for name, n in sorted(sizes.items(), key=lambda kv: str(kv[0]))
                       if name is not None)[:400] or "none: no training record has the field"
    for name in cfg.source_weights or {}:
        if name not in known:
            return (f"data.source_weights names the source {name!r}, which no training record has in its "
                    f"'{cfg.source_field}' field (sources: {listed}); fix the name or leave it out"), []
    notes = []
    if cfg.batch_by_source:
        for name, n in sorted(sizes.items(), key=lambda kv: str(kv[0])):
            pairs = weighted_total({name: n}, cfg.source_weights)
            if 0 < pairs < batch_size:
                notes.append(f"source {name!r} has {pairs} training pair(s) per epoch, fewer than a batch of "
                             f"{batch_size}: with data.batch_by_source they train in the mixed batches at the end "
                             "of each epoch (raise its data.source_weights entry to give it batches of its own)")
    return None, notes

PREFLIGHT_RECORDS = 1000
MAX_REJECTS_SHOWN = 5
POSITIVE_LABEL = 0.5  # labelled pairs at or above this count as question and answer for evaluation


class HeldOutQuestions:
    """Which held-out pairs evaluation uses: a labelled pair below ``POSITIVE_LABEL`` is no
    question with its answer, and a question asked again is evaluated once."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def admit(self, pair: Pair) -> bool:
        if pair.label is not None and pair.label < POSITIVE_LABEL:
            return False
        key = text_key(pair.query)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@dataclass
class DataPlan:
    """What training needs to know of its data before step 1."""

    eval_pairs: list[Pair]
    train_pairs: int | None  # training pairs in one epoch (after data.source_weights); None when not counted
    sources: dict[str | None, int] | None = None  # each source's training pairs; None when not counted


def plan_data(cfg: DataConfig, count: bool, held_out: bool = True, require_negatives: bool = False) -> DataPlan:
    """The held-out pairs (when ``held_out``) and the training pairs of an epoch (when ``count``),
    reading each file once: when the held-out pairs are carved off the training files, one pass
    does both."""
    carved = not cfg.eval_files
    held: list[Pair] = []
    if held_out and not carved:
        held = _eval_file_pairs(cfg, require_negatives)
    collect = held_out and carved and cfg.eval_fraction > 0
    if not count and not collect:
        return DataPlan(held, None)
    questions, sources = HeldOutQuestions(), {}
    for item in read_pairs(resolve_files(cfg.train_files), cfg, require_negatives):
        if isinstance(item, Reject):
            continue  # the training stream reports its own bad records
        if trains_on(item, cfg):
            sources[item.source] = sources.get(item.source, 0) + 1
        elif collect and len(held) < cfg.max_eval_queries and questions.admit(item):
            held.append(item)
            if not count and len(held) >= cfg.max_eval_queries:
                break
    if not count:
        return DataPlan(held, None)
    return DataPlan(held, weighted_total(sources, cfg.source_weights), sources)


def _eval_file_pairs(cfg: DataConfig, require_negatives: bool) -> list[Pair]:
    questions, pairs = HeldOutQuestions(), []
    # Evaluation reads no teacher scores: held-out files need none.
    reading = cfg.model_copy(update={"scores_field": None})
    for item in read_pairs(resolve_files(cfg.eval_files), reading, require_negatives):
        if isinstance(item, Reject):
            if cfg.on_bad_record == "error":
                raise DataError(format_stream_reject(item))
            logger.warning("held-out record skipped: %s", item.message())
        elif questions.admit(item):
            pairs.append(item)
            if len(pairs) >= cfg.max_eval_queries:
                break
    return pairs


def eval_pairs(cfg: DataConfig, require_negatives: bool = False) -> list[Pair]:
    """The held-out pairs: the eval files, or the hashed fraction carved off the train stream."""
    return plan_data(cfg, count=False, require_negatives=require_negatives).eval_pairs


def count_train_pairs(cfg: DataConfig, require_negatives: bool = False) -> int:
    """The training pairs of one epoch, counted exactly (parsed and split, not tokenized)."""
    return plan_data(cfg, count=True, held_out=False, require_negatives=require_negatives).train_pairs or 0


# --- checks before training ------------------------------------------------------------------


def preflight(cfg: DataConfig, require_negatives: bool = False) -> list[Reject]:
    """Read the first records of every file so a broken file stops the run before any work."""
    rejects: list[Reject] = []
    for pattern_list in (cfg.train_files, cfg.eval_files):
        for path in resolve_files(pattern_list):
            good = bad = 0
            for count, item in enumerate(read_pairs([path], cfg, require_negatives)):
                if isinstance(item, Reject):
                    rejects.append(item)
                    bad += 1
                else:
                    good += 1
                if count + 1 >= PREFLIGHT_RECORDS:
                    break
            if good == 0 and not bad:
                raise DataError(f"{path}: no records found; give it one JSON record per line")
    if rejects and cfg.on_bad_record == "error":
        raise DataError(format_rejects(rejects))
    return rejects


def format_rejects(rejects: list[Reject]) -> str:
    lines = [f"{len(rejects)} bad record(s) in the first {PREFLIGHT_RECORDS} of each file:"]
    lines += [f"  {r.message()}" for r in rejects[:MAX_REJECTS_SHOWN]]
    if len(rejects) > MAX_REJECTS_SHOWN:
        lines.append(f"  ... and {len(rejects) - MAX_REJECTS_SHOWN} more")
    lines.append("Fix these records, or set data.on_bad_record=skip to skip them "
                 "(they are then kept in output_dir/rejected.jsonl).")
    return "\n".join(lines)
