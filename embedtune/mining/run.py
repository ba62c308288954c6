"""A mining run: the options, the model, the two passes over the input and the summary."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from embedtune.config import DataConfig
from embedtune.data.collate import PairCollator
from embedtune.data.records import (
    Pair,
    is_held_out,
    resolve_files,
    text_key,
)
from embedtune.mining import MineError
from embedtune.mining.corpus import Corpus, embed_corpus, encode, gather_corpus, read_input
from embedtune.mining.negatives import Selection, choose_backend, choose_negatives
from embedtune.mining.teacher import Teacher, TeacherStats, scores_clash, vet_negatives
from embedtune.model.encoder import EmbeddingModel

if sys.platform != "win32":
    import resource  # for the peak memory in the log; Windows has no such module


logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SCORE_BUDGET = 1 << 25  # query x document scores held at once (128 MiB in float32)



# --- settings from the model folder ----------------------------------------------------------


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MineOptions:
    """What a mining run is asked for; ``embedtune mine`` builds it from its flags."""

    model: str
    input: str
    output: str
    corpus: tuple[str, ...] = ()  # files of extra documents
    selection: Selection = field(default_factory=Selection)
    held_out: float = 0.0  # training's data.eval_fraction
    batch_size: int = 64  # texts per forward pass
    chunk_size: int = 4096  # questions read, encoded and searched at once
    corpus_chunk_size: int | None = None  # documents scored at once; None: SCORE_BUDGET scores per chunk
    query_max_length: int | None = None  # None: DataConfig's, capped by the model's max length
    document_max_length: int | None = None
    query_prefix: str | None = None  # None: the model folder's prompt
    document_prefix: str | None = None
    query_field: str = "question"
    positive_field: str = "answer"
    negatives_field: str = "negatives"  # written, replaced where present
    backend: str = "auto"  # auto, faiss or torch
    dtype: str = "float16"  # how the corpus embeddings are held: float16 or float32
    trust_remote_code: bool = False  # run the code that comes with the model
    teacher: str | None = None  # a cross-encoder or embedding model that scores the negatives
    teacher_kind: str = "auto"  # auto, cross-encoder or embedding
    teacher_logits: bool = False  # a cross-encoder teacher's raw logits, without its activation
    teacher_max_ratio: float | None = None  # drop candidates the teacher scores above this x the positive's score
    scores_field: str = "scores"  # with a teacher: written, replaced where present

    @property
    def data(self) -> DataConfig:
        # Negatives already in the input are not read (they are replaced), so they cannot reject a record.
        return DataConfig(query_field=self.query_field, positive_field=self.positive_field)

    @property
    def corpus_chunk(self) -> int:
        return self.corpus_chunk_size or max(1024, SCORE_BUDGET // self.chunk_size)


@dataclass(frozen=True)
class Setup:
    """The model side of a run, and where the search runs."""

    model: EmbeddingModel
    collate: PairCollator
    device: torch.device  # where the model runs
    backend: str  # faiss or torch
    store: torch.device  # where the corpus embeddings are held: the CPU for FAISS
    dtype: torch.dtype  # of the corpus embeddings


@dataclass
class Summary:
    records: int = 0
    corpus: int = 0
    answers: int = 0
    negatives: int = 0
    short_margin: int = 0  # fewer than asked: the margin (within max_candidates) left too few
    short_corpus: int = 0  # fewer than asked: the corpus has too few other documents
    replaced: int = 0  # records whose negatives field was there already
    held_out: int = 0  # records passed through without negatives (--held-out)
    seconds: float = 0.0
    teacher: TeacherStats = field(default_factory=TeacherStats)  # a teacher's scores (none without one)
    short_teacher: int = 0  # fewer than asked: the teacher dropped candidates and no more were found
    teacher_dropped: int = 0  # candidates the teacher scored above max_ratio x the positive's score
    teacher_unsigned: int = 0  # records whose positive the teacher scores at 0 or below: a ratio says little
    stale_scores: int = 0  # records whose scores (of the negatives replaced) were left out, without a teacher

    def count(self, got: int, asked: int, available: int, dropped: int = 0) -> None:
        """One record's negatives; ``available``: the documents that could have been its negatives;
        ``dropped``: the candidates the teacher dropped."""
        self.negatives += got
        if got < asked:
            if dropped:
                self.short_teacher += 1
            elif available < asked and got == max(available, 0):
                self.short_corpus += 1
            else:
                self.short_margin += 1

    def lines(self, asked: int, output: str, ratio: float | None = None, scores_field: str = "scores") -> list[str]:
        mean = self.negatives / max(self.records, 1)
        rate = self.records / max(self.seconds, 1e-9)
        lines = [f"mined {self.records} records against {self.corpus} documents ({self.answers} answers, "
                 f"{self.corpus - self.answers} extra) in {self.seconds:.1f} s ({rate:.1f} records/s)",
                 f"negatives per record: {mean:.2f} on average ({asked} asked)"]
        short = self.short_margin + self.short_corpus + self.short_teacher
        if short:
            teacher = f"{self.short_teacher} because the teacher dropped candidates, " if self.short_teacher else ""
            lines.append(f"{short} records got fewer than {asked}: {self.short_margin} because of the margin, "
                         f"{teacher}{self.short_corpus} because the corpus has too few other documents")
        if self.teacher.positives:
            lines.append(self.teacher.line())
        if ratio is not None:
            lines.append(f"the teacher dropped {self.teacher_dropped} candidates scored above {ratio:g} x the "
                         "positive's score")
            if self.teacher_unsigned:
                lines.append(f"{self.teacher_unsigned} records: the teacher scores the positive at 0 or below, "
                             "where a ratio of scores means little (a teacher whose scores are logits)")
        if self.held_out:
            lines.append(f"{self.held_out} held-out records passed through without negatives")
        if self.replaced:
            lines.append(f"{self.replaced} records had negatives already; they were replaced")
        if self.stale_scores:
            lines.append(f"{self.stale_scores} records had teacher scores in '{scores_field}', which scored the "
                         "negatives replaced: left out of the output (add new ones with embedtune score, or mine "
                         "with --teacher)")
        lines.append(f"wrote {output}")
        return lines


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Line breaks to str.splitlines, which JSON leaves unescaped: escaped, so any reader sees one line.
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, default=str).translate(LINE_BREAKS)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate from a \ud8xx escape: keep the escapes
        return json.dumps(record, default=str).encode("ascii") + b"\n"


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_options(options: MineOptions) -> tuple[list[str], list[str]]:
    """The input files and the extra documents' files, or a MineError for options that would
    overwrite an input or a record's question or answer."""
    inputs = resolve_files([options.input])
    extra = resolve_files(list(options.corpus))
    for path in inputs + extra:
        if "://" not in path and same_file(path, options.output):
            raise MineError(f"--output {options.output} is an input file; write the mined records elsewhere")
    if options.negatives_field in (options.query_field, options.positive_field):
        raise MineError(f"--negatives-field {options.negatives_field!r} would overwrite the question or the answer")
    if options.teacher and options.scores_field in (options.query_field, options.positive_field,
                                                     options.negatives_field):
        raise MineError(f"--scores-field {options.scores_field!r} would overwrite the question, the answer or the "
                        "negatives")
    if options.teacher_max_ratio is not None and not options.teacher:
        raise MineError("--teacher-max-ratio needs --teacher: the model whose scores it compares")
    return inputs, extra


def load_model(options: MineOptions) -> Setup:
    """The model in eval mode on its device, with its folder's prompts and max length where the
    options give none; the search backend is checked before the model loads."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = choose_backend(options.backend, device)
    store = torch.device("cpu") if backend == "faiss" else device
    dtype = {"float16": torch.float16, "float32": torch.float32}[options.dtype]

    model, tokenizer = EmbeddingModel.from_pretrained(options.model, trust_remote_code=options.trust_remote_code)
    model.to(device).eval()
    # The prompts and max length the folder was saved with (embedtune saves its training prefixes
    # as the query and document prompts), where the options give none.
    folder = model.folder
    cap = folder.max_seq_length or 1 << 30
    query_prefix = folder.query_prompt if options.query_prefix is None else options.query_prefix
    document_prefix = folder.document_prompt if options.document_prefix is None else options.document_prefix
    query_max = options.query_max_length or min(DataConfig().query_max_length, cap)
    document_max = options.document_max_length or min(DataConfig().document_max_length, cap)
    collate = PairCollator(tokenizer, query_max, document_max, query_prefix, document_prefix)
    logger.info("model %s on %s, %s search; prefixes %r / %r, max length %d / %d", options.model, device, backend,
                query_prefix, document_prefix, query_max, document_max)
    return Setup(model, collate, device, backend, store, dtype)


def prepare_corpus(inputs: list[str], extra: list[str], spool: IO[bytes], options: MineOptions, setup: Setup,
                   started: float) -> tuple[Corpus, torch.Tensor]:
    """The first pass over the input, then the corpus embeddings (``started``: when the run began)."""
    corpus = gather_corpus(inputs, extra, options.data, spool, options.held_out)
    logger.info("%d records, corpus of %d documents (%d answers, %d extra), read in %.1f s", corpus.records,
                len(corpus), corpus.answers, len(corpus) - corpus.answers, time.perf_counter() - started)
    phase = time.perf_counter()
    embeddings = embed_corpus(corpus, setup.model, setup.collate, options.batch_size, setup.device, setup.store,
                              setup.dtype)
    logger.info("corpus embedded in %.1f s (%.0f documents/s), %.0f MiB of %s embeddings",
                time.perf_counter() - phase, len(corpus) / max(time.perf_counter() - phase, 1e-9),
                embeddings.numel() * embeddings.element_size() / 2**20, options.dtype)
    return corpus, embeddings


def mine_chunk(chunk: list[tuple[dict[str, Any], Pair]], corpus: Corpus, embeddings: torch.Tensor, setup: Setup,
               options: MineOptions, summary: Summary, teacher: Teacher | None = None) -> None:
    """Give every record of ``chunk`` its negatives (and, with a teacher, their scores), in
    place, and count them in ``summary``."""
    field_name, selection = options.negatives_field, options.selection
    kept = []
    for record, pair in chunk:
        if teacher is not None and (clash := scores_clash(record, options.scores_field, pair.id)):
            raise clash
        summary.replaced += field_name in record
        if teacher is None and isinstance(record.get(options.scores_field), list):
            # A teacher's scores of the negatives about to be replaced would pair with the new
            # ones by position and train as theirs: they go (the input keeps them).
            del record[options.scores_field]
            summary.stale_scores += 1
        if is_held_out(pair, options.held_out):
            # Held-out records pass through without negatives: evaluation never sees mining.
            record[field_name] = []
            if teacher is not None:
                record.pop(options.scores_field, None)  # they scored negatives the record no longer has
            summary.held_out += 1
        else:
            kept.append((record, pair))
    if not kept:
        return
    pairs = [pair for _, pair in kept]
    queries = encode(setup.model, setup.collate.queries, [p.query for p in pairs], options.batch_size,
                     setup.device).to(setup.store)
    positive_rows = corpus.rows([text_key(p.positive) for p in pairs])
    excluded = [corpus.excluded(text_key(p.query), row) for p, row in zip(pairs, positive_rows)]

    def candidates(index: list[int], depth: int) -> list[list[int]]:
        """The first ``depth`` candidates of these questions, in the embedding model's order."""
        return choose_negatives(queries[index], embeddings, [positive_rows[i] for i in index],
                                [excluded[i] for i in index], replace(selection, num_negatives=depth),
                                options.corpus_chunk, setup.backend)[0]

    everyone = list(range(len(pairs)))
    if teacher is None:
        chosen, dropped, scores = candidates(everyone, selection.num_negatives), [0] * len(pairs), []
    else:
        vetted = vet_negatives(teacher, [p.query for p in pairs], [p.positive for p in pairs], candidates,
                               corpus.texts, selection.num_negatives, options.teacher_max_ratio,
                               max(selection.max_candidates, selection.num_negatives))
        chosen, dropped, scores = vetted.chosen, vetted.dropped, vetted.scores
    texts = corpus.texts([row for rows in chosen for row in rows])
    for i, ((record, _), rows, skip) in enumerate(zip(kept, chosen, excluded)):
        record[field_name] = [texts[row] for row in rows]
        if teacher is not None:
            record[options.scores_field] = scores[i]
            summary.teacher.add(scores[i])
            summary.teacher_unsigned += options.teacher_max_ratio is not None and scores[i][0] <= 0
        summary.teacher_dropped += dropped[i]
        summary.count(len(rows), selection.num_negatives, len(corpus) - len(skip) - selection.skip_top, dropped[i])
    summary.records += len(kept)


@contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A file written beside ``path`` and renamed over it once complete: a failed run leaves no
    half file, and whatever ``path`` held stays as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_mined(inputs: list[str], corpus: Corpus, embeddings: torch.Tensor, setup: Setup, options: MineOptions,
                summary: Summary, teacher: Teacher | None = None) -> None:
    """The second pass: the input in chunks, each record written out with its negatives, in order."""
    with atomic_output(options.output) as out, tqdm(total=corpus.records, desc="mine", unit=" records") as bar:
        for chunk in chunks(read_input(inputs, options.data), options.chunk_size):
            mine_chunk(chunk, corpus, embeddings, setup, options, summary, teacher)
            for record, _ in chunk:
                out.write(json_line(record))
            bar.update(len(chunk))


def log_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        logger.info("peak GPU memory %.0f MiB", torch.cuda.max_memory_allocated() / 2**20)
    if sys.platform != "win32":
        logger.info("peak memory (RSS) %.0f MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def mine(options: MineOptions) -> Summary:
    """Mine negatives for every record of ``options.input`` and write them to ``options.output``."""
    started = time.perf_counter()
    inputs, extra = check_options(options)
    teacher = None
    if options.teacher:  # loaded first: a teacher that does not load stops the run before any work
        teacher = Teacher.load(options.teacher, options.teacher_kind, options.batch_size,
                               trust_remote_code=options.trust_remote_code, logits=options.teacher_logits)
    setup = load_model(options)
    folder = os.path.dirname(os.path.abspath(options.output))
    os.makedirs(folder, exist_ok=True)
    summary = Summary()
    with tempfile.TemporaryFile(dir=folder, prefix=".mine-spool-") as spool:
        corpus, embeddings = prepare_corpus(inputs, extra, spool, options, setup, started)
        summary.corpus, summary.answers = len(corpus), corpus.answers
        phase = time.perf_counter()
        write_mined(inputs, corpus, embeddings, setup, options, summary, teacher)
    summary.seconds = time.perf_counter() - started
    logger.info("questions encoded, searched and written in %.1f s", time.perf_counter() - phase)
    log_peak_memory(setup.device)
    return summary
