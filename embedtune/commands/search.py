"""``embedtune search MODEL_OR_OUTPUT_DIR``: the documents a model ranks first for each query.

The corpus is embedded once into an index on disk (the embeddings, the texts, and a fingerprint
of the model and the corpus); a later search reuses it while both are unchanged and rebuilds it
when either changed. Queries and documents get the prompts the model was saved with, as in
training. The search runs in FAISS when it is installed and the model runs on the CPU, else in
torch; both rank alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from embedtune.config import ConfigError, DataConfig, load_file
from embedtune.data.records import (
    DataError,
    Reject,
    file_format,
    line_problem,
    read_file,
    read_pairs,
    resolve_files,
    text_key,
)
from embedtune.files import files_under, hash_file, read_json_object, write_atomic, write_json
from embedtune.logs import log_to_console, scrub_console
from embedtune.mining import MineError
from embedtune.mining.corpus import _document_record, document_text, encode
from embedtune.mining.negatives import search
from embedtune.mining.run import SCORE_BUDGET, MineOptions, Setup, load_model
from embedtune.model.folder import EMBEDDED_MODELS, ModelLoadError, hub_snapshot, resolve_model_path

INDEX_FORMAT = 1  # raised when the files of an index change meaning
INDEX_FILE, EMBEDDINGS_FILE, TEXTS_FILE = "index.json", "embeddings.npy", "texts.jsonl"
EMBED_BLOCK = 4096  # documents embedded between two updates of the progress bar
SHOWN = 160  # characters of a document printed per hit (--json prints it whole)
GIVE = "give a training run's output folder (holding final_model/) or a model folder"


class SearchError(ValueError):
    """A search that cannot run as asked; the message says what to give instead."""


# --- what was given: a run's output folder or a model ----------------------------------------


@dataclass(frozen=True)
class Target:
    model: str  # a local model folder
    run_dir: str | None  # the training run's output folder, when one was given (or its final_model/)
    data: DataConfig | None  # the run's data section (its config.yaml)


def run_data(config_path: str) -> DataConfig:
    """The data section of a run's resolved config: its files and field names."""
    try:
        raw = load_file(Path(config_path))
        return DataConfig.model_validate(raw.get("data") or {})
    except ConfigError as exc:
        raise SearchError(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SearchError(f"{config_path}: data.{where}: {first['msg']}; give --corpus FILE instead of the run's "
                          "data") from None


def locate(path: str) -> Target:
    """The model and, for a training run's output folder (or its final_model/), the run's data."""
    if os.path.isdir(path):
        config = os.path.join(path, "config.yaml")
        final = os.path.join(path, "final_model")
        if os.path.isdir(final):
            return Target(final, path, run_data(config) if os.path.isfile(config) else None)
        if os.path.isfile(config):
            raise SearchError(f"{path}: a training run's folder without final_model/: the run has not finished; "
                              "wait for it, or turn a checkpoint into a model with `embedtune export`")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SearchError(f"{path}: neither a training run's output folder (no final_model/) nor a model "
                              f"folder (no config.json); {GIVE}")
        run_dir = os.path.dirname(os.path.abspath(path))
        config = os.path.join(run_dir, "config.yaml")
        if os.path.basename(os.path.abspath(path)) == "final_model" and os.path.isfile(config):
            return Target(path, run_dir, run_data(config))
        return Target(path, None, None)
    if os.path.exists(path):
        raise SearchError(f"{path}: a file, not a folder; {GIVE}")
    if path in EMBEDDED_MODELS:
        return Target(resolve_model_path(path), None, None)
    snapshot, why = hub_snapshot(path)
    if snapshot is None:
        raise SearchError(f"{path}: no such folder, and no model on the Hugging Face Hub ({why}); {GIVE}")
    return Target(snapshot, None, None)


# --- reading texts -----------------------------------------------------------------------------


def is_text_file(path: str) -> bool:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    return name.endswith(".txt")


def read_field(files: list[str], field: str, flag: str) -> Iterator[str]:
    """The text of ``field`` in every record of ``files`` (JSONL, Parquet, CSV), or every non-blank
    line of a .txt file; a record without it stops the reading, named by file and line. With
    ``field`` "text", a BEIR-style ``title`` goes before the text, as in ``embedtune mine --corpus``."""
    for path in resolve_files(files):
        if is_text_file(path):
            for line, raw in read_file(path, "json"):
                if problem := line_problem(raw):
                    raise DataError(f"{path}, line {line}: {problem}")
                if raw.strip():
                    yield raw.strip()
            continue
        for line, raw in read_file(path, file_format(path, "auto")):
            record = _document_record(path, line, raw)
            if isinstance(record, Reject):
                raise DataError(record.message())
            if record is None:
                continue
            if field not in record:
                keys = ", ".join(str(k) for k in sorted(record, key=str)[:10]) or "none"
                raise DataError(f"{path}, line {line}: no '{field}' field (fields here: {keys}); name the field "
                                f"that holds the text with {flag}")
            value = record[field]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}, line {line}: '{field}' must be a non-empty string, got {value!r:.60}; fix "
                                "the record or leave it out")
            # The text is checked above, so document_text gives it back (after its title).
            yield document_text(path, line, record) if field == "text" else value


def distinct(texts: Iterable[str]) -> list[str]:
    """Texts in order of first appearance, one per normalized text (as mining counts documents)."""
    seen: set[int] = set()
    out = []
    for text in texts:
        key = text_key(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


def run_answers(data: DataConfig) -> list[str]:
    """The distinct answers of a run's training and held-out files, read as training read them."""
    try:
        files = resolve_files(data.train_files + data.eval_files)
    except DataError as exc:  # a relative path, from the folder training ran in
        raise DataError(f"{exc}; the run's config.yaml names it in its data files") from None
    answers = []
    for item in read_pairs(files, data):
        if isinstance(item, Reject):
            if data.on_bad_record == "error":
                raise DataError(f"bad record: {item.message()}; fix it")
            continue
        answers.append(item.positive)
    return distinct(answers)


def read_queries(args: argparse.Namespace, target: Target) -> list[str]:
    queries = list(args.query or [])
    if args.queries == "-":
        queries += [line.strip() for line in sys.stdin if line.strip()]
    elif args.queries:
        field = args.query_field or (target.data.query_field if target.data else "question")
        queries += list(read_field([args.queries], field, "--query-field"))
    if not queries:
        raise SearchError(f"{args.queries}: no query in it; give one per line (a .txt file) or one record per line")
    return queries


def corpus_texts(args: argparse.Namespace, target: Target) -> list[str] | None:
    """The corpus: --corpus, else the run's answers; None: none named (an index is used as it is)."""
    if args.corpus:
        field = args.field or (target.data.positive_field if target.data else "answer")
        texts = distinct(read_field(args.corpus, field, "--field"))
        if not texts:
            raise DataError(f"{', '.join(args.corpus)}: no document in it (only blank lines); give one record per "
                            f"line with a non-empty '{field}', or one text per line in a .txt file")
        return texts
    if target.data is not None:
        try:
            texts = run_answers(target.data)
        except DataError as exc:
            raise DataError(f"{exc}, or give --corpus FILE") from None
        if not texts:
            raise DataError(f"{', '.join(target.data.train_files)}: no answer in the run's data; give --corpus FILE")
        return texts
    return None


# --- the index ---------------------------------------------------------------------------------


@dataclass
class Index:
    texts: list[str]
    embeddings: torch.Tensor  # float32, unit length, a row per text, on the CPU
    fingerprint: dict[str, str]  # model, encoding, corpus


def model_fingerprint(folder: str, skip: str | None = None) -> str:
    """A hash of every file of the model folder but its card (and an index kept inside it)."""
    digest = hashlib.sha256()
    for name in files_under(folder):
        path = os.path.join(folder, name)
        if name == "README.md" or (skip and os.path.abspath(path).startswith(os.path.abspath(skip) + os.sep)):
            continue
        digest.update(f"{name}\0{hash_file(path)[1]}\0".encode())
    return digest.hexdigest()


def corpus_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(json.dumps(text).encode("ascii") + b"\n")
    return digest.hexdigest()


def load_index(folder: str) -> Index | None:
    """The index saved in ``folder``, or None when there is no complete one."""
    meta = read_json_object(os.path.join(folder, INDEX_FILE))
    if meta.get("format") != INDEX_FORMAT or not isinstance(meta.get("fingerprint"), dict):
        return None
    try:
        embeddings = np.load(os.path.join(folder, EMBEDDINGS_FILE))
        with open(os.path.join(folder, TEXTS_FILE), encoding="utf-8") as f:
            texts = [json.loads(line) for line in f]
    except (OSError, ValueError):
        return None
    if embeddings.ndim != 2 or len(embeddings) != len(texts) or len(texts) != meta.get("documents"):
        return None
    return Index(texts, torch.from_numpy(embeddings.astype(np.float32, copy=False)), meta["fingerprint"])


def save_index(index: Index, folder: str, model: str) -> None:
    """Its description is written last (and removed first): a half-written index is never reused."""
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    embeddings = os.path.join(folder, EMBEDDINGS_FILE)
    with open(embeddings + ".tmp", "wb") as f:
        np.save(f, index.embeddings.numpy())
    os.replace(embeddings + ".tmp", embeddings)
    write_atomic(os.path.join(folder, TEXTS_FILE), "".join(json.dumps(t, ensure_ascii=False) + "\n"
                                                           for t in index.texts))
    write_json(meta_path, {"format": INDEX_FORMAT, "model": model, "documents": len(index.texts),
                           "dim": int(index.embeddings.shape[1]), "fingerprint": index.fingerprint})


def embed_documents(setup: Setup, texts: list[str], batch_size: int) -> torch.Tensor:
    out = torch.empty(len(texts), setup.model.dim)
    with tqdm(total=len(texts), desc="embed corpus", unit=" docs", leave=False) as bar:
        for start in range(0, len(texts), EMBED_BLOCK):
            block = texts[start:start + EMBED_BLOCK]
            out[start:start + len(block)] = encode(setup.model, setup.collate.documents, block, batch_size,
                                                   setup.device).cpu()
            bar.update(len(block))
    return out


def open_index(folder: str | None, texts: list[str] | None, setup: Setup, batch_size: int) -> tuple[Index, str]:
    """The index of ``texts`` (None: the one saved in ``folder``, as it is), reused from ``folder``
    when its fingerprint matches, else built (and saved there); with a line saying which."""
    collate = setup.collate
    fingerprint = {"model": model_fingerprint(setup.model.folder.path, skip=folder),
                   "encoding": f"{collate.query_prefix!r} {collate.document_prefix!r} {collate.query_max_length} "
                               f"{collate.document_max_length}"}
    saved = load_index(folder) if folder else None
    if texts is None:
        if saved is None:
            raise SearchError(f"--index {folder}: no index there, and no corpus to build one from; give --corpus FILE")
        if {k: saved.fingerprint.get(k) for k in fingerprint} != fingerprint:
            raise SearchError(f"--index {folder}: built with another model (or other prompts), and no corpus is "
                              "given to rebuild it; give --corpus FILE")
        return saved, f"index: reused {folder} ({len(saved.texts):,} documents)"
    fingerprint["corpus"] = corpus_fingerprint(texts)
    if saved is not None and saved.fingerprint == fingerprint:
        return saved, f"index: reused {folder} ({len(texts):,} documents)"
    started = time.perf_counter()
    index = Index(texts, embed_documents(setup, texts, batch_size), fingerprint)
    took = f"{len(texts):,} documents in {time.perf_counter() - started:.1f} s"
    if not folder:
        return index, f"index: built in memory ({took}); --index DIR keeps it for the next search"
    save_index(index, folder, os.path.abspath(setup.model.folder.path))
    if saved is None:
        return index, f"index: built {folder} ({took})"
    changed = " and ".join(k for k in ("model", "encoding", "corpus") if saved.fingerprint.get(k) != fingerprint[k])
    return index, f"index: rebuilt {folder}, the {changed} changed ({took})"


# --- searching and printing ----------------------------------------------------------------------


def search_index(index: Index, queries: list[str], setup: Setup, k: int,
                 batch_size: int) -> list[list[tuple[float, int]]]:
    """Each query's ``k`` best (score, document row), best first; scores are cosine similarities."""
    embedded = encode(setup.model, setup.collate.queries, queries, batch_size, setup.device).to(setup.store)
    corpus = index.embeddings.to(setup.store)
    scores, rows = search(embedded, corpus, k, max(1024, SCORE_BUDGET // len(queries)), setup.backend)
    return [list(zip(s, r)) for s, r in zip(scores.tolist(), rows.tolist())]


def one_line(text: str, width: int = SHOWN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def print_results(queries: list[str], hits: list[list[tuple[float, int]]], texts: list[str], as_json: bool) -> None:
    for query, found in zip(queries, hits):
        if as_json:
            rows = [{"rank": n, "score": round(score, 6), "text": texts[row]} for n, (score, row) in enumerate(found, 1)]
            print(json.dumps({"query": query, "hits": rows}, ensure_ascii=False))
            continue
        print(f"query: {one_line(query)}")
        for n, (score, row) in enumerate(found, 1):
            print(f"  {n:>2}  {score:.4f}  {one_line(texts[row])}")
        print()


# --- the command ---------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtune search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_OR_OUTPUT_DIR", help="a training run's output folder (its final_model/ is searched with, its "
                        "answers are the default corpus) or a model folder")
    parser.add_argument("--corpus", nargs="+", metavar="FILE", help="documents: records (JSONL, Parquet, CSV) whose "
                        "--field is the text, or a .txt file of one text per line; default: the distinct answers "
                        "of the run's data.train_files and data.eval_files")
    parser.add_argument("--field", help="the records' text field (default: the run's data.positive_field, "
                        "else 'answer'; 'text' takes a BEIR-style 'title' with it)")
    parser.add_argument("--query", action="append", metavar="TEXT", help="a query; repeatable")
    parser.add_argument("--queries", metavar="FILE", help="queries: a .txt file of one per line, records with "
                        "--query-field, or - for standard input")
    parser.add_argument("--query-field", metavar="FIELD", help="the query records' field (default: the run's data.query_field, "
                        "else 'question')")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="documents shown per query (default 5)")
    parser.add_argument("--index", metavar="DIR", help="where the index is kept and reused (default: "
                        "OUTPUT_DIR/search_index for a training run; in memory only for a model folder)")
    parser.add_argument("--json", action="store_true", help="one JSON object per query: query, hits (rank, "
                        "score, text)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per forward pass")
    parser.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto",
                        help="auto: faiss when installed and no GPU is used, else torch")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the code that comes with the model")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrub_console()  # main also runs without the embedtune command (python -m embedtune.commands.search)
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if not (args.query or args.queries):
            parser.error("give a query: --query TEXT (repeatable) or --queries FILE")
        for name in ("top_k", "batch_size"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    except SystemExit as exc:  # --help, or a usage error argparse has already explained
        return int(exc.code or 0)
    log_to_console(logging.WARNING)
    try:
        target = locate(args.model)
        queries = read_queries(args, target)
        texts = corpus_texts(args, target)
        folder = args.index or (os.path.join(target.run_dir, "search_index") if target.run_dir else None)
        if texts is None and folder is None:
            raise SearchError(f"{args.model}: a model folder, not a training run's output folder, so there are no "
                              "run answers to search; give --corpus FILE")
        # Mining's loader: the folder's prompts and max lengths, the device, and FAISS or torch.
        setup = load_model(MineOptions(model=target.model, input="", output="", backend=args.backend,
                                       dtype="float32", trust_remote_code=args.trust_remote_code))
        index, status = open_index(folder, texts, setup, args.batch_size)
        print(status, file=sys.stderr)
        hits = search_index(index, queries, setup, args.top_k, args.batch_size)
    except (SearchError, DataError, MineError, ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_results(queries, hits, index.texts, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
