"""Retrieval evaluation: queries against a corpus, with relevance judgements.

A retrieval set comes from held-out Q&A pairs (each question against the corpus of held-out
answers) or from BEIR-style queries / corpus / qrels files. Encoding is split across processes;
scoring is chunked so a (queries x corpus) matrix is never held whole; metrics are averaged over
queries, and per source when the queries carry one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from embedtune.data.collate import PairCollator
from embedtune.data.records import DataError, Pair, file_format, line_problem, read_file, resolve_files, token_estimate
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.packing import Ragged

logger = logging.getLogger(__name__)

Encoder = Callable[[list[str], str], torch.Tensor]  # (texts, "query" | "document") -> embeddings

MAP_CUTOFF = 100
RECALL_CUTOFFS = (1, 10, 100)
SCORE_CHUNK = 1024  # queries scored at a time
TABLE_TEXT = 300  # characters of a text shown in the table of examples
MAX_SOURCES = 20  # more distinct sources than this are not broken down (they would flood the charts)

ID_FIELDS = ("_id", "id", "query_id", "query-id", "qid", "doc_id", "docid", "corpus_id", "corpus-id")
QUERY_TEXT_FIELDS = ("text", "query", "question")
DOC_TEXT_FIELDS = ("text", "document", "passage", "answer", "contents")
QRELS_QUERY_FIELDS = ("query-id", "query_id", "qid")
QRELS_DOC_FIELDS = ("corpus-id", "corpus_id", "doc_id", "docid", "pid")


@dataclass
class RetrievalSet:
    queries: list[str]
    corpus: list[str]
    relevant: list[set[int]]  # per query, the corpus indices that answer it
    sources: list[str | None] = field(default_factory=list)  # per query, when the records say
    # Per query, its record's own instruction (data.prompt_field; None: the query prefix); empty: none has one.
    prompts: list[str | None] = field(default_factory=list)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair]) -> RetrievalSet:
        """Identical answers become one corpus entry, relevant to every query they answer."""
        index: dict[str, int] = {}
        corpus: list[str] = []
        relevant: list[set[int]] = []
        for pair in pairs:
            if pair.positive not in index:
                index[pair.positive] = len(corpus)
                corpus.append(pair.positive)
            relevant.append({index[pair.positive]})
        prompts = [p.prompt for p in pairs]
        return cls([p.query for p in pairs], corpus, relevant, [p.source for p in pairs],
                   prompts if any(p is not None for p in prompts) else [])

    @classmethod
    def from_files(cls, queries: str, corpus: str, qrels: str, max_queries: int | None = None) -> RetrievalSet:
        """BEIR-style files: queries and corpus as JSONL (``_id``, ``text``, optional ``title`` and
        ``source``), qrels as TSV (``query-id corpus-id score``, with header) or JSONL. A score
        above 0 is relevant; queries without a relevant document are left out, as BEIR does."""
        query_rows = dict(_records(queries, QUERY_TEXT_FIELDS, title=False))
        doc_rows = list(_records(corpus, DOC_TEXT_FIELDS, title=True))
        doc_index = {doc_id: i for i, (doc_id, _) in enumerate(doc_rows)}
        judged: dict[str, set[int]] = defaultdict(set)
        for where, qid, did, score in _qrels(qrels):
            if qid not in query_rows:
                raise DataError(f"{where}: query id {qid!r} is not in {queries}; fix the id or add the query")
            if did not in doc_index:
                raise DataError(f"{where}: corpus id {did!r} is not in {corpus}; fix the id or add the document")
            if score > 0:
                judged[qid].add(doc_index[did])
        ids = [qid for qid in query_rows if qid in judged][:max_queries]
        if not ids:
            raise DataError(f"{qrels}: no query has a relevant document (score > 0); check the ids and scores")
        return cls([query_rows[q][0] for q in ids], [text for _, (text, _) in doc_rows], [judged[q] for q in ids],
                   [query_rows[q][1] for q in ids])

    def __len__(self) -> int:
        return len(self.queries)


def _field(record: dict[str, Any], names: Sequence[str]) -> Any:
    return next((record[n] for n in names if n in record), None)


def _objects(path: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, line, record) per JSONL / Parquet / CSV record; a record that is no object is {}."""
    for file in resolve_files([path]):
        for line, raw in read_file(file, file_format(file, "auto")):
            if isinstance(raw, str):
                if not raw.strip():
                    continue
                problem = line_problem(raw)
                if problem:
                    raise DataError(f"{file}:{line}: {problem}")
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{line}: not valid JSON ({exc.msg}); write one JSON object per line"
                                    ) from exc
            yield file, line, raw if isinstance(raw, dict) else {}


def _records(path: str, text_fields: Sequence[str], title: bool) -> Iterator[tuple[str, tuple[str, str | None]]]:
    """(id, (text, source)) per JSONL / Parquet / CSV record, errors named by file and line."""
    seen: set[str] = set()
    for file, line, record in _objects(path):
        rid, text = _field(record, ID_FIELDS), _field(record, text_fields)
        if rid is None or not isinstance(text, str) or not text.strip():
            raise DataError(f"{file}:{line}: expected an object with an id ({', '.join(ID_FIELDS[:2])}) and "
                            f"a non-empty text ({', '.join(text_fields)})")
        rid = str(rid)
        if rid in seen:
            raise DataError(f"{file}:{line}: id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
        heading = record.get("title") if title else None
        if isinstance(heading, str) and heading.strip():
            text = f"{heading.strip()} {text}"
        source = record.get("source")
        yield rid, (text, None if source is None else str(source))


def _qrels(path: str) -> Iterator[tuple[str, str, str, float]]:
    """(where, query id, corpus id, score) from a BEIR TSV or a JSONL file."""
    if path.lower().endswith((".tsv", ".txt")):
        with open(path, encoding="utf-8", newline="") as f:
            for line, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
                if not row or (line == 1 and not _is_number(row[-1])):
                    continue  # blank line, or the header
                if len(row) < 3 or not _is_number(row[2]):
                    raise DataError(f"{path}:{line}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r:.120}")
                yield f"{path}:{line}", row[0], row[1], float(row[2])
        return
    for file, line, record in _objects(path):
        qid, did = _field(record, QRELS_QUERY_FIELDS), _field(record, QRELS_DOC_FIELDS)
        score = record.get("score", 1)
        if qid is None or did is None or not _is_number(score):
            raise DataError(f"{file}:{line}: expected query-id, corpus-id and a numeric score")
        yield f"{file}:{line}", str(qid), str(did), float(score)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


# --- metrics ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_query: list[dict[str, float]]  # each query's own metrics, in query order
    top: list[list[tuple[int, float]]]  # each query's best corpus entries with their scores
    first_rank: list[int | None]  # 1-based rank of the first relevant entry, None past the cutoff


def query_metrics(ranked: Sequence[int], rel: set[int], k: int = 10) -> dict[str, float]:
    """One query's nDCG@k, MRR@k, MAP@100 and Recall@1/k/10/100, for binary relevance."""
    hits = [i for i, doc in enumerate(ranked) if doc in rel]
    dcg = sum(1 / math.log2(i + 2) for i in hits if i < k)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(rel), k)))
    precisions = [(n + 1) / (i + 1) for n, i in enumerate(h for h in hits if h < MAP_CUTOFF)]
    out = {f"ndcg@{k}": dcg / ideal if ideal else 0.0,
           f"mrr@{k}": 1 / (hits[0] + 1) if hits and hits[0] < k else 0.0,
           f"map@{MAP_CUTOFF}": sum(precisions) / min(len(rel), MAP_CUTOFF) if rel else 0.0}
    for cutoff in sorted({*RECALL_CUTOFFS, k}):
        out[f"recall@{cutoff}"] = sum(1 for i in hits if i < cutoff) / len(rel) if rel else 0.0
    return out


def score_and_rank(queries: torch.Tensor, corpus: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``depth`` (scores, indices) per query by cosine similarity, a chunk of queries at a time."""
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    corpus = torch.nn.functional.normalize(corpus.float(), dim=-1)
    depth = min(depth, corpus.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], SCORE_CHUNK):
        top = (queries[start:start + SCORE_CHUNK] @ corpus.T).topk(depth, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)


def metrics_from_ranking(indices: torch.Tensor, relevant: list[set[int]], k: int = 10,
                         sources: Sequence[str | None] = ()) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Mean metrics over queries (and per source, as ``source/metric``), plus each query's own."""
    per_query = [query_metrics(ranked, rel, k) for ranked, rel in zip(indices.tolist(), relevant)]
    means = _mean(per_query)
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for row, source in zip(per_query, sources):
        if source is not None:
            groups[source].append(row)
    if len(groups) > MAX_SOURCES:
        logger.info("queries come from %d sources: metrics per source are only reported for at most %d",
                    len(groups), MAX_SOURCES)
    elif len(groups) > 1 or (groups and sum(map(len, groups.values())) < len(per_query)):
        for source, rows in sorted(groups.items()):
            means.update({f"{source}/{name}": value for name, value in _mean(rows).items()})
    return means, per_query


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}


def metrics_from_scores(scores: torch.Tensor, relevant: list[set[int]], k: int = 10) -> dict[str, float]:
    """The metrics from a full (queries x corpus) score matrix."""
    depth = min(max(MAP_CUTOFF, k, *RECALL_CUTOFFS), scores.shape[1])
    return metrics_from_ranking(scores.topk(depth, dim=1).indices, relevant, k)[0]


def paired_change(before: Sequence[float], after: Sequence[float], resamples: int = 10_000,
                  seed: int = 0) -> dict[str, float]:
    """How one metric changed, query by query, between two models on the same queries: the mean
    change, a paired bootstrap 95% interval on it (queries resampled with replacement), and how
    many queries got better, worse or stayed the same."""
    if len(before) != len(after) or len(before) == 0:
        raise ValueError(f"paired_change needs the same queries on both sides ({len(before)} vs {len(after)})")
    diff = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for start in range(0, resamples, 1000):  # a thousand resamples at a time keeps memory flat
        rows = min(1000, resamples - start)
        means[start:start + rows] = diff[torch.randint(len(diff), (rows, len(diff)), generator=generator)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"change": float(diff.mean()), "low": low, "high": high, "better": int((diff > 1e-12).sum()),
            "worse": int((diff < -1e-12).sum()), "same": int((diff.abs() <= 1e-12).sum()), "queries": len(diff)}


def describe_change(name: str, change: dict[str, float]) -> str:
    return (f"{name} change over {change['queries']:,} queries: {change['change']:+.4f} (95% interval "
            f"{change['low']:+.4f} to {change['high']:+.4f}); better on {change['better']:,}, worse on "
            f"{change['worse']:,}, the same on {change['same']:,}")


# --- encoding --------------------------------------------------------------------------------


def length_order(texts: Sequence[str]) -> list[int]:
    """Indices of ``texts``, longest first by estimated tokens: neighbours make batches with little padding."""
    return sorted(range(len(texts)), key=lambda i: -token_estimate(texts[i]))


def embed_rows(model: EmbeddingModel, tokenize: Callable[[list[str]], Ragged], texts: Sequence[str],
               rows: Sequence[int], batch_size: int, device: torch.device, passes: int = 0,
               wrapped: torch.nn.Module | None = None) -> torch.Tensor:
    """Float32 embeddings of ``texts[i]`` for each ``i`` in ``rows``, in that order, on ``device``.

    The one eval-mode embedder: ``encode_texts`` runs it on each process's share, mining on one
    process, so evaluation and mining embed a text the same way. The model runs in eval mode
    without gradients, ``batch_size`` rows per forward pass, into one preallocated tensor; its
    training mode is restored afterwards. Mixed precision is the caller's: call this inside an
    autocast context. ``passes``: the forward passes to run at the least (the extra ones embed
    the first text for nothing). ``wrapped``: the model as wrapped for distributed training
    (DDP, FSDP), which then runs the forward passes.
    """
    runner = wrapped if wrapped is not None else model
    out = torch.empty(len(rows), model.dim, device=device)
    passes = max(passes, math.ceil(len(rows) / batch_size))
    was_training = runner.training
    runner.eval()
    try:
        with torch.no_grad():
            for start in range(0, passes * batch_size, batch_size):
                batch = rows[start:start + batch_size]
                chunk = [texts[i] for i in batch] or list(texts[:1])
                embedded = runner(model.prepare(tokenize(chunk), device)).float()
                if len(batch):
                    out[start:start + len(batch)] = embedded
    finally:
        runner.train(was_training)
    return out


def encode_texts(model: torch.nn.Module, tokenize: Callable[[list[str]], Ragged],
                 texts: list[str], batch_size: int, accelerator: Any) -> torch.Tensor:
    """Embed texts in eval mode, split across processes; every process gets all rows (fp32, CPU).

    Texts are sorted by (estimated token) length and cut into batches, so batches carry little
    padding; the batches are dealt out in turn, so every process gets a similar share of long and
    short ones, and a text is embedded in the same batch whatever the number of processes (its
    embedding, and so evaluation and mining, do not change with it).
    """
    order = length_order(texts)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # Only the last batch of all can be short, and it is the last of its process's: the process
    # cuts its share back into exactly these batches.
    share = [row for batch in batches[accelerator.process_index::accelerator.num_processes] for row in batch]
    # Every process runs as many forward passes as the busiest one: under FSDP a forward pass
    # is collective, and a process that stopped early would leave the others waiting.
    passes = math.ceil(len(batches) / accelerator.num_processes)
    with accelerator.autocast():
        local = embed_rows(accelerator.unwrap_model(model), tokenize, texts, share, batch_size, accelerator.device,
                           passes, model)
    rows = torch.tensor(share, dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
        rows = accelerator.gather(accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
    out = torch.empty(len(texts), local.shape[1])
    kept = rows >= 0
    out[rows[kept].cpu()] = local[kept].cpu()
    return out


def set_encoder(model: torch.nn.Module, collate: PairCollator, data: RetrievalSet, batch_size: int,
                accelerator: Any) -> Encoder:
    """The encoder of a retrieval set's two sides, as training tokenizes them: each question with
    its record's own instruction where it has one, else the query prefix; documents with the
    document prefix."""

    def encode(texts: list[str], kind: str) -> torch.Tensor:
        if kind == "document":
            return encode_texts(model, collate.documents, texts, batch_size, accelerator)
        if data.prompts:
            prompted = [(collate.query_prefix if p is None else p) + t for t, p in zip(texts, data.prompts, strict=True)]
            return encode_texts(model, collate.queries_as_given, prompted, batch_size, accelerator)
        return encode_texts(model, collate.queries, texts, batch_size, accelerator)

    return encode


def run_retrieval(encode: Encoder, data: RetrievalSet, k: int = 10, compute: bool = True) -> EvalResult | None:
    """Encoding is collective (every process calls this); the ranking and metrics are computed
    where ``compute`` (the main process), which gets the result; the others get None."""
    queries = encode(data.queries, "query")
    corpus = encode(data.corpus, "document")
    if not compute:
        return None
    scores, indices = score_and_rank(queries, corpus, max(MAP_CUTOFF, k, *RECALL_CUTOFFS))
    metrics, per_query = metrics_from_ranking(indices, data.relevant, k, data.sources)
    top = [list(zip(i, s)) for i, s in zip(indices[:, :3].tolist(), scores[:, :3].tolist())]
    first_rank = []
    for ranked, rel in zip(indices.tolist(), data.relevant):
        first_rank.append(next((n + 1 for n, doc in enumerate(ranked) if doc in rel), None))
    return EvalResult(metrics, per_query, top, first_rank)


def evaluate(encode: Encoder, data: RetrievalSet, k: int = 10, compute: bool = True) -> dict[str, float]:
    result = run_retrieval(encode, data, k, compute)
    return result.metrics if result is not None else {}


# --- presentation ----------------------------------------------------------------------------


def example_columns(k: int = 10) -> list[str]:
    return ["kind", "query", "source", "relevant", "rank", "top 1", "score 1", "top 2", "score 2", "top 3",
            "score 3", f"ndcg@{k}"]


def example_rows(result: EvalResult, data: RetrievalSet, n: int = 10, k: int = 10) -> list[list[Any]]:
    """Rows for a table of example retrievals: the first ``n`` queries and the ``n`` worst
    (lowest nDCG, then relevant answer ranked lowest), each with its top 3 documents."""
    def cut(text: str) -> str:
        return text if len(text) <= TABLE_TEXT else text[:TABLE_TEXT - 1] + "…"

    never = MAP_CUTOFF + 1
    worst = sorted(range(len(data)), key=lambda i: (result.per_query[i][f"ndcg@{k}"],
                                                    -(result.first_rank[i] or never)))[:n]
    rows = []
    for kind, picked in (("sample", list(range(min(n, len(data))))), ("worst", worst)):
        for i in picked:
            top = result.top[i] + [(None, float("nan"))] * (3 - len(result.top[i]))
            relevant = min(data.relevant[i])
            row: list[Any] = [kind, cut(data.queries[i]), data.sources[i] if data.sources else None,
                              cut(data.corpus[relevant]), result.first_rank[i]]
            for doc, score in top:
                row += [None if doc is None else cut(data.corpus[doc]), round(score, 4)]
            rows.append(row + [round(result.per_query[i][f"ndcg@{k}"], 4)])
    return rows


def format_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """A plain before/after table for the console and the log."""
    width = max([12, *(len(name) + 2 for name in after)])
    rows = [f"{'metric':<{width}}{'before':>10}{'after':>10}{'change':>10}"]
    for name, value in after.items():
        old = before.get(name) if before else None
        rows.append(f"{name:<{width}}{'' if old is None else f'{old:.4f}':>10}{value:>10.4f}"
                    f"{'' if old is None else f'{value - old:+.4f}':>10}")
    return "\n".join(rows)


def metrics_table(metrics: dict[str, float]) -> str:
    """Overall metrics, then one row per source when there are any."""
    overall = {k: v for k, v in metrics.items() if "/" not in k}
    rows = [f"{'':<24}" + "".join(f"{name:>12}" for name in overall),
            f"{'all':<24}" + "".join(f"{v:>12.4f}" for v in overall.values())]
    sources = sorted({k.rsplit("/", 1)[0] for k in metrics if "/" in k})
    for source in sources:
        rows.append(f"{source[:23]:<24}" + "".join(f"{metrics.get(f'{source}/{name}', float('nan')):>12.4f}"
                                                   for name in overall))
    return "\n".join(rows)
