"""An ``embedtune score`` run: every Q&A record gets its teacher's scores, streamed in chunks.

A record's scores are [score(question, answer), score(question, negative 1), ...], in the order
of its negatives: what ``data.scores_field`` reads for distillation. Held-out records (the hashed
split of training's ``data.eval_fraction``) are written as they were read, without scores, so
the evaluation's answers never meet the teacher's judgement of them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from embedtune.config import DataConfig
from embedtune.data.records import Pair, Reject, is_held_out, read_records, resolve_files
from embedtune.mining import MineError
from embedtune.mining.corpus import bad_record
from embedtune.mining.run import atomic_output, chunks, json_line, same_file
from embedtune.mining.teacher import Teacher, TeacherStats, scores_clash

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreOptions:
    """What a scoring run is asked for; ``embedtune score`` builds it from its arguments."""

    teacher: str
    input: str
    output: str
    kind: str = "auto"  # auto, cross-encoder or embedding
    field: str = "scores"  # written, replaced where it holds a list already
    batch_size: int = 32  # pairs (cross-encoder) or texts (embedding model) per forward pass
    max_length: int | None = None  # None: the teacher's own
    chunk_size: int = 1024  # records read, scored and written at once
    held_out: float = 0.0  # training's data.eval_fraction: those records are written unchanged
    query_field: str = "question"
    positive_field: str = "answer"
    negatives_field: str = "negatives"
    trust_remote_code: bool = False
    logits: bool = False  # a cross-encoder's raw logits, without its activation

    @property
    def data(self) -> DataConfig:
        # Every negative a record lists is scored, not only the first data.max_negatives that training
        # reads: the scores must line up with the list as it stands.
        limit = DataConfig().max_negatives_per_record
        return DataConfig(query_field=self.query_field, positive_field=self.positive_field,
                          negatives_field=self.negatives_field, max_negatives=limit, max_negatives_per_record=limit)


@dataclass
class ScoreSummary:
    records: int = 0  # scored
    held_out: int = 0  # written unchanged
    pairs: int = 0  # (question, text) pairs the teacher scored
    without_negatives: int = 0  # scored records with only the answer to score
    replaced: int = 0  # records whose scores field held scores already
    seconds: float = 0.0
    kind: str = ""
    stats: TeacherStats = field(default_factory=TeacherStats)

    def lines(self, teacher: str, output: str) -> list[str]:
        rate = self.records / max(self.seconds, 1e-9)
        lines = [f"scored {self.records} records ({self.pairs} pairs) with the teacher {teacher} ({self.kind}) in "
                 f"{self.seconds:.1f} s ({rate:.1f} records/s)", self.stats.line()]
        if self.stats.inverted:
            lines.append(f"{self.stats.inverted} records have a negative the teacher scores at or above their "
                         "positive (likely false negatives)")
        if self.without_negatives:
            lines.append(f"{self.without_negatives} records have no negatives: only their positive was scored")
        if self.held_out:
            lines.append(f"{self.held_out} held-out records written unchanged, without scores")
        if self.replaced:
            lines.append(f"{self.replaced} records had scores already; they were replaced")
        lines.append(f"wrote {output}")
        return lines


def check_options(options: ScoreOptions) -> list[str]:
    """The input files, or a MineError for options that would overwrite an input or a field the
    scores are about."""
    inputs = resolve_files([options.input])
    for path in inputs:
        if "://" not in path and same_file(path, options.output):
            raise MineError(f"OUTPUT {options.output} is an input file; write the scored records elsewhere")
    if options.field in (options.query_field, options.positive_field, options.negatives_field):
        raise MineError(f"--field {options.field!r} would overwrite the question, the answer or the negatives")
    return inputs


def read_scored_input(files: list[str], cfg: DataConfig) -> Iterator[tuple[Any, Pair]]:
    """(the raw line or row, its pair) of every record, in order; the first bad record stops the run."""
    for item, raw in read_records(files, cfg):
        if isinstance(item, Reject):
            raise bad_record(item, "Fix it: every input record is written to the output, so none is skipped.")
        yield raw, item


def score_chunk(chunk: list[tuple[Any, Pair]], teacher: Teacher, options: ScoreOptions,
                summary: ScoreSummary) -> list[bytes]:
    """The output lines of ``chunk``: held-out records as read, the others with their scores."""
    lines: list[bytes | None] = []
    todo: list[tuple[int, dict[str, Any], Pair]] = []
    for raw, pair in chunk:
        if is_held_out(pair, options.held_out):
            # As read: a JSONL line byte for byte (less a \r before its \n), a Parquet or CSV row as JSON.
            lines.append(raw.encode("utf-8") + b"\n" if isinstance(raw, str) else json_line(raw))
            summary.held_out += 1
            continue
        record = json.loads(raw) if isinstance(raw, str) else dict(raw)
        if clash := scores_clash(record, options.field, pair.id):
            raise clash
        todo.append((len(lines), record, pair))
        lines.append(None)
    scored = teacher.score([p.query for _, _, p in todo], [[p.positive, *p.negatives] for _, _, p in todo])
    for (at, record, pair), scores in zip(todo, scored):
        summary.replaced += record.get(options.field) is not None
        record[options.field] = scores
        summary.stats.add(scores)
        summary.pairs += len(scores)
        summary.without_negatives += not pair.negatives
        lines[at] = json_line(record)
    summary.records += len(todo)
    return [line for line in lines if line is not None]


def score(options: ScoreOptions) -> ScoreSummary:
    """Score every record of ``options.input`` with the teacher and write them to ``options.output``."""
    started = time.perf_counter()
    inputs = check_options(options)
    teacher = Teacher.load(options.teacher, options.kind, options.batch_size, options.max_length,
                           options.trust_remote_code, options.logits)
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    summary = ScoreSummary(kind=teacher.kind)
    with atomic_output(options.output) as out, tqdm(desc="score", unit=" records") as bar:
        for chunk in chunks(read_scored_input(inputs, options.data), options.chunk_size):
            out.writelines(score_chunk(chunk, teacher, options, summary))
            bar.update(len(chunk))
    summary.seconds = time.perf_counter() - started
    logger.info("%d records scored, %d held out, in %.1f s", summary.records, summary.held_out, summary.seconds)
    return summary
