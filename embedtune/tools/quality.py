"""``embedtune bench quality``: held-out retrieval quality of embedtune's default recipe and, with
``--compare``, of sentence-transformers' ``SentenceTransformerTrainer`` trained on the same pairs.

Both trainers start from the same base model and train on the same pairs: the training side of
embedtune's hashed split of ``--data`` (``data.eval_fraction``), written in reading order to one
JSONL file that ``embedtune train`` reads and that becomes the (anchor, positive) dataset of
SentenceTransformerTrainer. Epochs, batch size, max length, learning rate, warmup ratio, seed and
precision (fp32) are the same; everything else is each trainer's own default, listed in the
report (loss settings, weight decay, clipping, the order of the pairs). Each trainer trains once
per seed.

The base model and every final model are scored by one evaluator, embedtune's ``run_retrieval``
on one ``RetrievalSet`` (the held-out pairs of the split, or BEIR-style files), with the same max
length. The difference embedtune - SentenceTransformerTrainer comes with a paired bootstrap 95%
interval over queries: each query's score is averaged over the seeds for each trainer, then the
queries are resampled with replacement (per seed as well, in the JSON). Each run trains in a
fresh process (nothing carries over from the run before); its time is its wall time from loading
the base model to the saved final model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import embedtune
from embedtune.commands import train as train_command
from embedtune.config import Config, ConfigError, DataConfig, parse_args
from embedtune.data.collate import PairCollator
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
from embedtune.data.split import eval_pairs
from embedtune.distributed import cpu_processes
from embedtune.files import read_json, write_json
from embedtune.mining.corpus import read_documents
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import resolve_model_path
from embedtune.retrieval import EvalResult, RetrievalSet, paired_change, run_retrieval, set_encoder
from embedtune.tools.throughput import DEFAULT_DATA, device_name

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "Recall@10"}
ST = "sentence_transformers"
NAMES = {"embedtune": "embedtune", ST: "SentenceTransformerTrainer"}
RESAMPLES = 10_000
EVAL_BATCH = 64  # eval.batch_size's default
SHARED_OPTIONS = ("epochs", "batch_size", "max_length", "learning_rate", "warmup_ratio")


@dataclass
class Split:
    """What both trainers train on, and what every model is evaluated on."""

    train: list[Pair]
    held_out: RetrievalSet
    held_out_ids: list[str]  # the held-out pairs' ids (file:line), or the BEIR queries' texts
    source: str  # where the held-out set comes from, in words


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``embedtune bench quality``."""
    parser.add_argument("--compare", action="store_true", help="also train with SentenceTransformerTrainer")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model: a folder or a Hub name")
    parser.add_argument("--data", nargs="+", default=[DEFAULT_DATA], metavar="FILE",
                        help="Q&A records (question, answer), split by embedtune's hashed held-out split")
    parser.add_argument("--eval-fraction", type=float, default=None, metavar="FRACTION",
                        help="held-out share of --data (data.eval_fraction; default 0.1, 0 with --eval-queries)")
    parser.add_argument("--eval-queries", help="BEIR-style queries JSONL instead of the held-out pairs")
    parser.add_argument("--eval-corpus", help="BEIR-style corpus JSONL (with --eval-queries)")
    parser.add_argument("--eval-qrels", help="BEIR-style qrels TSV or JSONL (with --eval-queries)")
    parser.add_argument("--eval-distractors", nargs="+", default=[], metavar="FILE",
                        help="documents (JSONL with 'text', optional 'title') added to the held-out corpus")
    parser.add_argument("--negatives-field", metavar="FIELD", help="hard negatives in --data's records: embedtune "
                        "trains them (data.negatives_field; --set data.negatives_field=null leaves them out); "
                        "SentenceTransformerTrainer trains on the pairs")
    parser.add_argument("--scores-field", metavar="FIELD", help="a teacher's scores in --data's records (the "
                        "positive's, then one per negative), for embedtune's distillation (data.scores_field)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per query and per document")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps warming up (0 to <1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--max-train-pairs", type=int, default=None, help="train on the first N training pairs")
    parser.add_argument("--max-eval-queries", type=int, default=1000, help="held-out queries evaluated")
    parser.add_argument("--out", default="outputs/quality", help="the runs' folders and models (kept)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure, per seed too, as JSON")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="embedtune settings beyond its default recipe (e.g. data.batch_by_source=true), "
                        "as `embedtune train` takes them; the shared settings cannot be overridden")


# --- the data ------------------------------------------------------------------------------------


def load_split(args: argparse.Namespace) -> Split:
    """The training pairs and the held-out set, through embedtune's own split."""
    beir = [args.eval_queries, args.eval_corpus, args.eval_qrels]
    if any(beir) and not all(beir):
        raise DataError("--eval-queries, --eval-corpus and --eval-qrels go together")
    fraction = args.eval_fraction if args.eval_fraction is not None else (0.0 if all(beir) else 0.1)
    cfg = DataConfig(train_files=args.data, eval_fraction=fraction, max_eval_queries=args.max_eval_queries,
                     negatives_field=getattr(args, "negatives_field", None),
                     scores_field=getattr(args, "scores_field", None))
    train = []
    for item in read_pairs(resolve_files(cfg.train_files), cfg):
        if isinstance(item, Reject):
            raise DataError(format_stream_reject(item))
        if trains_on(item, cfg):
            train.append(item)
    train = train[:args.max_train_pairs]
    if all(beir):
        held = RetrievalSet.from_files(*beir, max_queries=args.max_eval_queries)
        ids, source = list(held.queries), f"queries {args.eval_queries}"
    else:
        pairs = eval_pairs(cfg)
        held, ids = RetrievalSet.from_pairs(pairs), [p.id for p in pairs]
        source = f"held out of --data by question hash (eval_fraction {fraction})"
    if args.eval_distractors:
        known = set(held.corpus)
        extra = [t for t in dict.fromkeys(read_documents(resolve_files(args.eval_distractors))) if t not in known]
        held = replace(held, corpus=held.corpus + extra)
        source += f", with {len(extra):,} distractor documents from {' '.join(args.eval_distractors)}"
    if not train:
        raise DataError("no training pair: the files hold none, or all are held out")
    if not len(held):
        raise DataError("no held-out query: raise --eval-fraction, or give --eval-queries/--eval-corpus/--eval-qrels")
    return Split(train, held, ids, source)


def ids_hash(ids: Sequence[str]) -> str:
    """A short fingerprint of a multiset of ids (order does not count)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:16]


def set_hash(data: RetrievalSet) -> str:
    """A short fingerprint of exactly what an evaluation searched: queries, corpus, judgements."""
    payload = json.dumps([data.queries, data.corpus, [sorted(r) for r in data.relevant]])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def canonical_ids(pairs: Sequence[Pair]) -> dict[tuple[str, str], str]:
    """Each (question, answer) text's id: identical records cannot be told apart once trained on,
    so they count as the first of them."""
    canonical: dict[tuple[str, str], str] = {}
    for pair in pairs:
        canonical.setdefault((pair.query, pair.positive), pair.id)
    return canonical


def write_train_file(pairs: Sequence[Pair], path: str) -> list[str]:
    """The training pairs as JSONL in reading order; returns the ids embedtune gives its records."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            record: dict[str, Any] = {"question": pair.query, "answer": pair.positive}
            if pair.source is not None:  # for embedtune's source-aware settings
                record["source"] = pair.source
            if pair.negatives:  # --negatives-field, for embedtune
                record["negatives"] = list(pair.negatives)
            if pair.scores is not None:  # --scores-field
                record["scores"] = list(pair.scores)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return [item.id for item in read_pairs([path], DataConfig(train_files=[path], eval_fraction=0.0))
            if isinstance(item, Pair)]


# --- training ------------------------------------------------------------------------------------


def fresh_accelerate() -> None:
    """Forget Accelerate's process-wide state, so each trainer and evaluation starts from its own settings."""
    AcceleratorState._reset_state(reset_partial_state=True)


def yaml_float(value: float) -> str:
    """A float as YAML reads it back as a float (``2e-05`` would be a string, which the config refuses)."""
    text = repr(float(value))
    return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text


def train_embedtune(model_dir: str, train_file: str, args: argparse.Namespace, seed: int,
                    out: str) -> dict[str, Any]:
    """``embedtune train`` with the default config, only the shared settings given. Nothing is held
    out again (the file is the training side already), the base model is not evaluated (the bench
    does that once), no checkpoint is written (SentenceTransformerTrainer saves none either), and
    every batch's ids are logged so the pairs trained on can be checked."""
    argv = ["--input_jsonl", train_file, "--base_model", model_dir, "--output_dir", out,
            "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
            "--max_seq_length", str(args.max_length), f"train.learning_rate={yaml_float(args.learning_rate)}",
            f"train.warmup_ratio={yaml_float(args.warmup_ratio)}", f"train.seed={seed}", "train.mixed_precision=no",
            "data.eval_fraction=0", "eval.before=false", "checkpoint.every_n_steps=null",
            "tracking.report_to=none", "tracking.log_batch_ids=true",
            *(["data.negatives_field=negatives"] if getattr(args, "negatives_field", None) else []),
            *(["data.scores_field=scores"] if getattr(args, "scores_field", None) else []),
            *getattr(args, "overrides", [])]
    cfg = parse_args(argv)
    shutil.rmtree(out, ignore_errors=True)  # a folder with an earlier run is refused
    started = time.perf_counter()
    status = train_command.main(argv)
    seconds = time.perf_counter() - started
    fresh_accelerate()
    if status:
        raise RuntimeError(f"embedtune train stopped with status {status}; see {out}/logs/train.log")
    with open(os.path.join(out, "training_progress.json"), encoding="utf-8") as f:
        progress = json.load(f)
    with open(os.path.join(out, "batches.jsonl"), encoding="utf-8") as f:
        trained = [pair_id for line in f if line.strip() for pair_id in json.loads(line)["ids"]]
    # loop_seconds: the trainer's own count (the loop and the export), beside the wall time from the start.
    return {"seconds": seconds, "loop_seconds": progress["duration_s"], "steps": progress["step"],
            "trained": trained, "model": os.path.join(out, "final_model"),
            "settings": embedtune_settings(cfg, progress["step"], getattr(args, "overrides", []))}


def embedtune_settings(cfg: Config, steps: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What embedtune's run used beyond the shared settings, from its resolved config."""
    return {"loss": cfg.loss.name, "scale": cfg.loss.scale, "similarity": "cosine",
            "mask_false_negatives": cfg.loss.mask_false_negatives, "optimizer": "AdamW (no decay on biases, norms)",
            "weight_decay": cfg.train.weight_decay, "max_grad_norm": cfg.train.max_grad_norm,
            "scheduler": cfg.train.scheduler, "warmup_steps": cfg.train.warmup_steps(steps), "steps": steps,
            "order": f"seeded streaming shuffle (buffer {cfg.data.shuffle_buffer:,} records), by train.seed and epoch",
            "drop_last": cfg.data.drop_last, "overrides": list(overrides),
            "hard_negatives": cfg.train.hard_negatives.model_dump() if cfg.train.hard_negatives else None}


class RecordingCollator:
    """SentenceTransformerTrainer's data collator, noting each (anchor, positive) it hands on: the
    pairs that trainer actually trained on."""

    def __init__(self, inner: Any, seen: list[tuple[str, str]]) -> None:
        self.inner, self.seen = inner, seen

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.seen.extend((f["anchor"], f["positive"]) for f in features)
        return self.inner(features)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "seen"):  # not set yet (copying, unpickling): no endless lookup
            raise AttributeError(name)
        return getattr(self.inner, name)


def train_st(model_dir: str, train_file: str, args: argparse.Namespace, seed: int, out: str) -> dict[str, Any]:
    """SentenceTransformerTrainer with its defaults, MultipleNegativesRankingLoss, the shared settings,
    no evaluation, and only the final model saved; the pairs are the training file's, in its order."""
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers.trainer_callback import PrinterCallback

    shutil.rmtree(out, ignore_errors=True)
    pairs = [p for p in read_pairs([train_file], DataConfig(train_files=[train_file], eval_fraction=0.0))
             if isinstance(p, Pair)]
    dataset = datasets.Dataset.from_dict({"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]})
    started = time.perf_counter()
    model = SentenceTransformer(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = args.max_length
    loss = losses.MultipleNegativesRankingLoss(model)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_ratio, seed=seed, eval_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    seen: list[tuple[str, str]] = []
    trainer.data_collator = RecordingCollator(trainer.data_collator, seen)
    trainer.remove_callback(PrinterCallback)  # its log dicts would land in the middle of the bench's output
    loop_started = time.perf_counter()
    trainer.train()
    loop_seconds = time.perf_counter() - loop_started
    final = os.path.join(out, "final_model")
    model.save(final)
    seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    sampler = training_args.batch_sampler
    settings = {"loss": type(loss).__name__, "scale": loss.scale, "similarity": loss.similarity_fct.__name__,
                "mask_false_negatives": False, "optimizer": str(getattr(training_args.optim, "value", training_args.optim)),
                "weight_decay": training_args.weight_decay, "max_grad_norm": training_args.max_grad_norm,
                "scheduler": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
                "warmup_steps": training_args.get_warmup_steps(steps), "steps": steps,
                "order": f"BatchSamplers.{str(getattr(sampler, 'value', sampler)).upper()}, a torch RandomSampler "
                         "seeded by the seed, cut into batches",
                "drop_last": training_args.dataloader_drop_last}
    del trainer, model
    fresh_accelerate()
    return {"seconds": seconds, "loop_seconds": loop_seconds, "steps": steps, "trained": seen, "model": final,
            "settings": settings}


def run_job(job_json: str) -> None:
    """One training run, in the process ``train_isolated`` started; its figures go to the job's file."""
    job = json.loads(job_json)
    train = train_embedtune if job["trainer"] == "embedtune" else train_st
    trained = train(job["model_dir"], job["train_file"], argparse.Namespace(**job["options"]), job["seed"],
                    job["out"])
    write_json(job["result"], trained)


def train_isolated(trainer: str, model_dir: str, train_file: str, args: argparse.Namespace, seed: int,
                   out: str) -> dict[str, Any]:
    """One training run in a fresh Python process, so that no state (Accelerate's, the allocator's,
    thread pools, warm caches) passes from one run to the next and each pays its own start-up."""
    result = f"{out}.result.json"
    if os.path.exists(result):
        os.remove(result)
    options = (*SHARED_OPTIONS, "overrides", "negatives_field", "scores_field")
    job = {"trainer": trainer, "model_dir": model_dir, "train_file": train_file, "seed": seed, "out": out,
           "result": result, "options": {name: getattr(args, name, None) for name in options}}
    code = "import sys; from embedtune.tools.quality import run_job; run_job(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)])
    figures = read_json(result)
    if done.returncode or not isinstance(figures, dict):
        raise RuntimeError(f"the {NAMES[trainer]} run on seed {seed} failed (status {done.returncode}); "
                           "its output is above")
    return figures


# --- evaluation and statistics -------------------------------------------------------------------


def evaluate_model(path: str, data: RetrievalSet, max_length: int) -> EvalResult:
    """The one evaluator of every model: embedtune's own retrieval evaluation, as ``embedtune eval`` runs it."""
    model, tokenizer = EmbeddingModel.from_pretrained(path)
    folder = model.folder
    collate = PairCollator(tokenizer, max_length, max_length, folder.query_prompt, folder.document_prompt)
    accelerator = Accelerator(cpu=cpu_processes())
    model.to(accelerator.device)
    result = run_retrieval(set_encoder(model, collate, data, EVAL_BATCH, accelerator), data, k=10)
    fresh_accelerate()
    assert result is not None  # one process computes
    return result


def paired_bootstrap(ours: Sequence[float], theirs: Sequence[float], resamples: int = RESAMPLES,
                     seed: int = 0) -> dict[str, float]:
    """Mean of ``ours - theirs`` over queries, with the paired bootstrap 95% interval of
    ``retrieval.paired_change`` (the one training reports)."""
    change = paired_change(theirs, ours, resamples, seed)
    return {"mean": change["change"], "low": change["low"], "high": change["high"]}


def per_query(result: EvalResult, metric: str) -> list[float]:
    """Each query's own value of ``metric``, in query order."""
    return [row[metric] for row in result.per_query]


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric, the mean and the standard deviation over seeds (0 for one seed)."""
    out = {}
    for metric in METRICS:
        values = [r["metrics"][metric] for r in runs]
        out[metric] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def differences(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """embedtune - SentenceTransformerTrainer per metric: pooled over seeds (each query's score
    averaged over the seeds first) and per seed, each with its paired bootstrap interval."""
    pooled = {}
    for metric in METRICS:
        ours = np.mean([r["per_query"][metric] for r in runs["embedtune"]], axis=0)
        theirs = np.mean([r["per_query"][metric] for r in runs[ST]], axis=0)
        pooled[metric] = paired_bootstrap(ours, theirs)
    per_seed = [{"seed": a["seed"], **{m: paired_bootstrap(a["per_query"][m], b["per_query"][m]) for m in METRICS}}
                for a, b in zip(runs["embedtune"], runs[ST], strict=True)]
    return {"pooled": pooled, "per_seed": per_seed, "resamples": RESAMPLES,
            "pooling": "each query's score averaged over the seeds, then the queries resampled"}


# --- the bench -----------------------------------------------------------------------------------


def run_record(seed: int, trained: dict[str, Any], ids: list[str], result: EvalResult,
               data: RetrievalSet) -> dict[str, Any]:
    """One trainer's run on one seed: what it trained on, how long it took, its held-out figures."""
    return {"seed": seed, "seconds": trained["seconds"], "loop_seconds": trained["loop_seconds"],
            "steps": trained["steps"], "pairs_trained": len(ids), "trained_ids_hash": ids_hash(ids),
            "evaluated_queries": len(data), "evaluated_set_hash": set_hash(data),
            "metrics": {m: result.metrics[m] for m in METRICS},
            "per_query": {m: per_query(result, m) for m in METRICS}, "model": trained["model"]}


def train_all(args: argparse.Namespace, split: Split, model_dir: str) -> tuple[dict[str, list[dict[str, Any]]],
                                                                                 dict[str, dict[str, Any]], str]:
    """Every trainer on every seed, each evaluated at once; the runs, each trainer's settings, the
    training file."""
    train_file = os.path.abspath(os.path.join(args.out, "train_pairs.jsonl"))
    file_ids = write_train_file(split.train, train_file)
    canonical = canonical_ids(split.train)
    by_file_id = {fid: canonical[(p.query, p.positive)] for fid, p in zip(file_ids, split.train, strict=True)}
    trainers = ["embedtune", *([ST] if args.compare else [])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trainers}
    settings: dict[str, dict[str, Any]] = {}
    for turn, seed in enumerate(args.seeds):
        # Interleaved, and each goes first on every other seed: the machine's changing load
        # falls on both alike.
        for name in trainers[::-1] if turn % 2 else trainers:
            out = os.path.join(args.out, f"seed-{seed}", name)
            trained = train_isolated(name, model_dir, train_file, args, seed, out)
            if name == "embedtune":
                ids = [by_file_id.get(i, f"unknown:{i}") for i in trained["trained"]]
            else:  # (anchor, positive) texts
                ids = [canonical.get((q, p), f"unknown:{q[:40]}") for q, p in trained["trained"]]
            settings[name] = trained["settings"]
            result = evaluate_model(trained["model"], split.held_out, args.max_length)
            runs[name].append(run_record(seed, trained, ids, result, split.held_out))
            print(f"[seed {seed}] {NAMES[name]}: {trained['seconds']:.0f} s, "
                  f"nDCG@10 {result.metrics['ndcg@10']:.4f}", flush=True)
    return runs, settings, train_file


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole bench; every figure as one JSON-ready dict."""
    split = load_split(args)
    model_dir = resolve_model_path(args.model)
    held = split.held_out
    base = evaluate_model(model_dir, held, args.max_length)
    print(f"base model: nDCG@10 {base.metrics['ndcg@10']:.4f} on {len(held)} queries", flush=True)
    runs, settings, train_file = train_all(args, split, model_dir)
    train_ids = [p.id for p in split.train]
    canonical = canonical_ids(split.train)
    expected = ids_hash([canonical[(p.query, p.positive)] for p in split.train] * args.epochs)
    trained_questions = {text_key(p.query) for p in split.train}
    versions = {"embedtune": embedtune.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    if args.compare:
        import sentence_transformers

        versions["sentence_transformers"] = sentence_transformers.__version__
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "device": device_name(), "precision": "fp32", "versions": versions,
        "setup": {"model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
                  "max_length": args.max_length, "learning_rate": args.learning_rate,
                  "warmup_ratio": args.warmup_ratio, "seeds": args.seeds, "max_train_pairs": args.max_train_pairs,
                  "max_eval_queries": args.max_eval_queries},
        "train": {"pairs": len(train_ids), "ids_hash": ids_hash(train_ids), "expected_trained_ids_hash": expected,
                  "file": train_file},
        "held_out": {"source": split.source, "queries": len(held), "documents": len(held.corpus),
                     "ids_hash": ids_hash(split.held_out_ids), "set_hash": set_hash(held),
                     "questions_also_trained_on": sum(text_key(q) in trained_questions for q in held.queries)},
        "base": {"metrics": {m: base.metrics[m] for m in METRICS}, "per_query": {m: per_query(base, m) for m in METRICS},
                 "evaluated_set_hash": set_hash(held)},
        "trainers": {name: {"name": NAMES[name], "settings": settings[name], "spread": spread(rows),
                            "seconds_mean": statistics.fmean(r["seconds"] for r in rows), "runs": rows}
                     for name, rows in runs.items()},
    }
    every = [r for rows in runs.values() for r in rows]
    result["same_training_pairs"] = all(r["trained_ids_hash"] == expected for r in every)
    result["same_evaluation"] = all(r["evaluated_set_hash"] == set_hash(held) for r in every)
    if args.compare:
        result["difference"] = differences(runs)
        trainers = result["trainers"]
        result["time_ratio"] = trainers[ST]["seconds_mean"] / trainers["embedtune"]["seconds_mean"]
    return result


def mining_line(h: dict[str, Any]) -> str:
    """train.hard_negatives in a few words."""
    when = ["before step 1"] * bool(h["before_training"]) + [f"every {h['every_n_steps']} steps"] * bool(
        h["every_n_steps"]) + ["every epoch"] * bool(h["every_epoch"])
    margin = f"margin {h['margin']:g}" if h["margin"] is not None else (
        f"relative margin {h['relative_margin']:g}" if h["relative_margin"] is not None else "no margin")
    how = "trained as in-batch negatives" if h["in_batch"] else "added to each pair"
    return f"{h['num']} per pair, {margin}, {', '.join(when)}, {how}"


def settings_line(s: dict[str, Any]) -> str:
    """A trainer's own settings in one line."""
    masked = "masked" if s["mask_false_negatives"] else "not masked"
    return (f"{s['loss']} scale {s['scale']:g} on {s['similarity']}, in-batch false negatives {masked}; "
            f"{s['optimizer']}, weight decay {s['weight_decay']:g}, gradient norm clipped at {s['max_grad_norm']}, "
            f"{s['scheduler']} schedule, {s['warmup_steps']} warmup step(s) of {s['steps']}; order: {s['order']}; "
            f"last partial batch {'dropped' if s['drop_last'] else 'trained'}"
            + (f"; hard negatives mined ({mining_line(s['hard_negatives'])})" if s.get("hard_negatives") else "")
            + (f"; beyond the defaults: {' '.join(s['overrides'])}" if s.get("overrides") else ""))


def report(result: dict[str, Any]) -> str:
    """The table, the difference with its interval, the times, and what each trainer used."""
    setup, held, train, trainers = result["setup"], result["held_out"], result["train"], result["trainers"]
    seeds = setup["seeds"]
    lines = [f"held-out retrieval after training {setup['model']}; {held['source']}",
             f"{train['pairs']:,} training pairs (ids {train['ids_hash']}), {held['queries']:,} queries against "
             f"{held['documents']:,} documents (ids {held['ids_hash']}); {setup['epochs']} epoch(s), batch "
             f"{setup['batch_size']}, max length {setup['max_length']}, learning rate {setup['learning_rate']:g}, "
             f"warmup ratio {setup['warmup_ratio']:g}; seeds {' '.join(map(str, seeds))}; "
             f"{result['device']}, {result['precision']}",
             "",
             f"{'':<28}" + "".join(f"{label:>18}" for label in METRICS.values()) + f"{'train s':>10}",
             f"{'base model':<28}" + "".join(f"{result['base']['metrics'][m]:>18.4f}" for m in METRICS)]
    for entry in trainers.values():
        cells = "".join(f"{entry['spread'][m]['mean']:>9.4f} ± {entry['spread'][m]['sd']:.4f}" for m in METRICS)
        lines.append(f"{entry['name']:<28}{cells}{entry['seconds_mean']:>10.0f}")
    lines.append(f"(mean ± standard deviation over {len(seeds)} seed(s); train s: wall time from loading the base "
                 "model to the saved final model, mean over seeds)")
    if "difference" in result:
        diff = result["difference"]
        lines += ["", f"embedtune - SentenceTransformerTrainer, paired bootstrap 95% interval over the "
                  f"{held['queries']:,} queries ({diff['resamples']:,} resamples; each query's score averaged over "
                  f"the {len(seeds)} seed(s) first):"]
        for metric, label in METRICS.items():
            d = diff["pooled"][metric]
            lines.append(f"  {label:<10}{d['mean']:>+9.4f}  [{d['low']:+.4f}, {d['high']:+.4f}]")
        lines.append(f"training time: SentenceTransformerTrainer / embedtune = {result['time_ratio']:.2f}x")
    lines.append("")
    for entry in trainers.values():
        per_seed = " ".join(f"{r['metrics']['ndcg@10']:.4f}" for r in entry["runs"])
        seconds = " ".join(f"{r['seconds']:.0f}" for r in entry["runs"])
        lines.append(f"{entry['name']}, per seed: nDCG@10 {per_seed}; seconds {seconds}")
    lines.append(f"same training pairs in every run: {'yes' if result['same_training_pairs'] else 'NO'} "
                 f"(ids over the epochs {train['expected_trained_ids_hash']}); same queries and documents "
                 f"for every model: {'yes' if result['same_evaluation'] else 'NO'}; held-out questions also trained "
                 f"on: {held['questions_also_trained_on']}")
    for entry in trainers.values():
        lines.append(f"{entry['name']}: {settings_line(entry['settings'])}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the bench, print its report (and write the JSON); 1 on a data error, 2 on bad options."""
    if not 0 <= args.warmup_ratio < 1:
        print("error: --warmup-ratio must be at least 0 and below 1", file=sys.stderr)
        return 2
    shared = {"train.epochs", "train.batch_size", "train.learning_rate", "train.warmup_ratio", "train.seed",
              "train.mixed_precision", "data.query_max_length", "data.document_max_length", "data.train_files",
              "data.eval_fraction", "model.base_model"}
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if "=" not in item or key in shared:
            print(f"error: --set {item}: " + (f"{key} is shared by both trainers; use the bench's own option"
                                               if key in shared else "expected KEY=VALUE"), file=sys.stderr)
            return 2
    try:
        parse_args(["--input_jsonl", "x.jsonl", *args.overrides])
    except ConfigError as exc:
        print(f"error: --set: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report(result))
    if args.json:
        write_json(args.json, result)
    sys.stdout.flush()
    return 0
