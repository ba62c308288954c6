"""``embedtune bench throughput``: training speed on a fixed workload, optionally side by side with
sentence-transformers' ``SentenceTransformerTrainer`` on the identical workload.

The workload is real question/answer pairs (the packaged Python-docs set unless ``--data`` names
another file), repeated to fill the steps, with one max length for queries and documents as a
sentence-transformers model has; ``--negatives 1`` gives each pair another record's answer as a
hard negative (which one does not change the speed). ``--suite`` runs a table of workloads on
both packaged sets (short and long texts, small and large batches, a hard negative) and names the
one where embedtune leads least. Both trainers run ``2 x --steps`` optimizer steps with
MultipleNegativesRankingLoss; the first half warms up (compilation, allocator, workers) and the
second half is timed. The figures: pairs/s, real tokens/s, padding efficiency, an MFU estimate,
peak memory, and the data loader's own pairs/s against what training consumes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import transformers
from accelerate.state import AcceleratorState
from transformers import AutoConfig, AutoModel, AutoTokenizer

import embedtune
from embedtune.config import Config, DataConfig
from embedtune.data.collate import PairCollator
from embedtune.data.records import resolve_files
from embedtune.data.stream import PairBatches, auto_workers, make_loader
from embedtune.files import write_json
from embedtune.model.folder import read_model_folder, resolve_model_path
from embedtune.tools.memory import peak_mib
from embedtune.training.trainer import run_training

DEFAULT_DATA = "embedtune:resources/python_docs_qa.jsonl.gz"
MANPAGES_DATA = "embedtune:resources/manpages_qa.jsonl.gz"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    data: str
    batch_size: int
    max_length: int
    negatives: int = 0


# --suite: the CPU workloads (a GPU takes 8x the batch of each).
SUITE = (
    Workload("short", "batch 32, length 128", DEFAULT_DATA, 32, 128),
    Workload("medium", "batch 64, length 256", DEFAULT_DATA, 64, 256),
    Workload("negative", "MNRL + 1 hard negative, batch 32, length 128", DEFAULT_DATA, 32, 128, negatives=1),
    Workload("manpages", "batch 64, length 256", MANPAGES_DATA, 64, 256),
    Workload("long", "long documents, batch 32, length 512", MANPAGES_DATA, 32, 512),
)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def peak_flops(precision: str) -> tuple[float, str]:
    """The datasheet's dense peak for known GPUs; else a measured large matmul (a reachable peak)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in DATASHEET_BF16.items():
            if key in name and precision in ("bf16", "fp16"):
                return flops, f"{name} datasheet dense {precision}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" and device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 10 if device == "cuda" else 4
    sync()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - started), f"measured {n}x{n} {dtype} matmul"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_folder(name: str, out: str) -> str:
    """A loadable model folder. A folder with a config but no weights (as carried for benchmarks)
    becomes that architecture with random weights: speed does not depend on the values."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        transformer_dir = read_model_folder(path).transformer_dir
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(transformer_dir))
        if has_weights:
            return path
        torch.manual_seed(0)
        model = AutoModel.from_config(AutoConfig.from_pretrained(transformer_dir))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(transformer_dir).save_pretrained(out)
        return out
    return path


def workload(data: str, pairs: int, path: str, negatives: int = 0) -> int:
    """Write ``pairs`` records cycling through the Q&A file, each with ``negatives`` other records'
    answers as hard negatives; returns the distinct pairs."""
    [source] = resolve_files([data])
    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(pairs):
            r = records[i % len(records)]
            row = {"question": r["question"], "answer": r["answer"]}
            if negatives:  # answers from half the file away: never the pair's own
                row["negatives"] = [records[(i + len(records) // 2 + k) % len(records)]["answer"]
                                    for k in range(negatives)]
            f.write(json.dumps(row) + "\n")
    return len(records)


def tokens_per_pair(model_dir: str, path: str, max_length: int, sample: int = 2000) -> float:
    """Real tokens (query, answer and hard negatives) per pair, over the first ``sample`` pairs."""
    tokenizer = AutoTokenizer.from_pretrained(read_model_folder(model_dir).transformer_dir)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(sample))]
    total = 0
    for texts in ([r["question"] for r in rows], [r["answer"] for r in rows],
                  [n for r in rows for n in r.get("negatives", [])]):
        if texts:
            encoded = tokenizer(texts, truncation=True, max_length=max_length)
            total += sum(len(ids) for ids in encoded["input_ids"])
    return total / len(rows)


def flops_per_token(model_dir: str, mean_length: float) -> float:
    """Training FLOPs per real token: 6 x non-embedding parameters, plus attention scores."""
    config = AutoConfig.from_pretrained(read_model_folder(model_dir).transformer_dir)
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = layers * (4 * h * h + 2 * h * inter)
    return 6 * dense + 12 * layers * h * mean_length


def profiled(work: Any, path: str, rows: int = 40) -> None:
    """Run ``work`` under torch.profiler; write its operators, by their own device time (CPU time
    without a GPU), as a table to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        work()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=rows) + "\n")


def run_embedtune(model_dir: str, data: str, args: argparse.Namespace, out: str) -> dict[str, float]:
    """``2 x --steps`` steps of embedtune's own training; the figures of the timed second half."""
    cfg = Config.model_validate({
        "output_dir": out,
        "model": {"base_model": model_dir, "unpad": args.unpad, "compile": args.compile,
                  "padded_chunks": args.padded_chunks, "layout_by_cost": args.layout_by_cost},
        "data": {"train_files": [data], "eval_fraction": 0.0, "num_workers": args.workers,
                 "negatives_field": "negatives" if args.negatives else None, "max_negatives": args.negatives,
                 "group_by_length": args.group_by_length,
                 "query_max_length": args.max_length, "document_max_length": args.max_length},
        "train": {"batch_size": args.batch_size, "max_steps": 2 * args.steps, "learning_rate": 2e-5,
                  "mixed_precision": args.precision,
                  "hard_negatives": None},  # the steps' speed: a mining round is not a training step
        "eval": {"before": False},
        "checkpoint": {"every_n_steps": None},
        "tracking": {"report_to": "none", "log_every_n_steps": args.steps},
    })
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.profile:
        profiled(lambda: run_training(cfg), args.profile)
    else:
        run_training(cfg)
    # Accelerate's state is process-wide: reset it so that SentenceTransformerTrainer's Accelerator
    # starts from its own settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    with open(os.path.join(out, "training_metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    timed = rows[-1]  # the second window: steps+1 .. 2*steps
    return {"pairs_per_s": timed["pairs_per_s"], "tokens_per_s": timed["tokens_per_s"],
            "padding_efficiency": timed["padding_efficiency"], "peak_mib": peak_mib(),
            "packed": timed["padding_efficiency"] == 1.0,
            "loss": timed["loss"]}


@dataclass(frozen=True)
class STSetup:
    """One way of running SentenceTransformerTrainer: its DataLoader workers, the attention
    implementation its transformer loads with, and its own ``torch_compile``."""

    name: str
    workers: int
    attention: str = "sdpa"
    compile: bool = False


def st_setups(args: argparse.Namespace) -> list[STSetup]:
    """The setups ``--compare`` tries; the fastest one is the figure compared. On a GPU (or with
    ``--st_best``): SDPA, SDPA compiled, and FlashAttention-2 where it is installed (with it
    sentence-transformers drops the padding itself)."""
    given = STSetup(f"sdpa, {args.st_workers} worker{'s' if args.st_workers != 1 else ''}", args.st_workers)
    if not args.st_best:
        return [given]
    workers = max(args.st_workers, 4)
    setups = [replace(given, name=f"sdpa, {workers} workers", workers=workers),
              STSetup(f"sdpa + torch_compile, {workers} workers", workers, compile=True)]
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        setups.append(STSetup(f"flash_attention_2, {workers} workers", workers, "flash_attention_2"))
    return setups


def run_st_trainer(model_dir: str, data: str, args: argparse.Namespace, out: str,
                   setup: STSetup | None = None) -> dict[str, Any]:
    """The same steps with SentenceTransformerTrainer, timed over the second half by a callback."""
    import datasets
    from datasets.table import InMemoryTable
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers import TrainerCallback

    with open(data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    columns = {"anchor": [r["question"] for r in rows], "positive": [r["answer"] for r in rows]}
    for k in range(args.negatives):  # MNRL takes (anchor, positive, negative_1, ...)
        columns[f"negative_{k + 1}"] = [r["negatives"][k] for r in rows]
    table = InMemoryTable.from_pydict(columns)
    dataset = datasets.Dataset(table, fingerprint="embedtune-bench")  # no hashing of the data
    setup = setup or st_setups(args)[0]
    model = SentenceTransformer(model_dir, device="cuda" if torch.cuda.is_available() else "cpu",
                                model_kwargs={"attn_implementation": setup.attention})
    model.max_seq_length = args.max_length
    marks: dict[int, float] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (args.steps, 2 * args.steps):
                sync()
                marks[state.global_step] = time.perf_counter()

    loss = losses.MultipleNegativesRankingLoss(model)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=2 * args.steps, learning_rate=2e-5,
        warmup_steps=0.1, bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        dataloader_num_workers=setup.workers, torch_compile=setup.compile,
        report_to="none", save_strategy="no", logging_steps=args.steps, seed=42, dataloader_drop_last=True,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                                         callbacks=[Timer()])
    trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)  # the next setup's Trainer starts afresh
    seconds = marks[2 * args.steps] - marks[args.steps]
    pairs = args.steps * args.batch_size
    return {"pairs_per_s": pairs / seconds, "peak_mib": peak_mib(), "setup": setup.name}


def loader_pairs_per_s(model_dir: str, data: str, args: argparse.Namespace, batches: int) -> float:
    """The DataLoader alone: reading, shuffling and tokenizing in workers, nothing trained."""
    tokenizer = AutoTokenizer.from_pretrained(read_model_folder(model_dir).transformer_dir)
    cfg = DataConfig(train_files=[data], eval_fraction=0.0, num_workers=args.workers,
                     negatives_field="negatives" if args.negatives else None, max_negatives=args.negatives,
                     group_by_length=args.group_by_length, query_max_length=args.max_length,
                     document_max_length=args.max_length)
    dataset = PairBatches(cfg, args.batch_size, 1, 0, PairCollator(tokenizer, args.max_length, args.max_length))
    loader = iter(make_loader(dataset, auto_workers(args.workers), pin_memory=torch.cuda.is_available()))
    next(loader)  # workers started
    started, pairs = time.perf_counter(), 0
    for _ in range(batches):
        try:
            pairs += next(loader).global_size
        except StopIteration:
            break
    return pairs / (time.perf_counter() - started)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="model folder or name; a folder with only config and tokenizer runs random weights")
    parser.add_argument("--data", default=DEFAULT_DATA, help="Q&A JSONL (question, answer), cycled to fill")
    parser.add_argument("--batch_size", type=int, default=256 if gpu else 64)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=0, metavar="N",
                        help="hard negatives per pair (other records' answers), for both trainers")
    parser.add_argument("--steps", type=int, default=30 if gpu else 4, help="timed steps (as many warm up first)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16" if gpu else "no")
    parser.add_argument("--workers", type=int, default=None, help="embedtune's DataLoader workers "
                        "(default: as in training, one per spare core up to 8)")
    parser.add_argument("--st_workers", type=int, default=4 if gpu else 1,
                        help="SentenceTransformerTrainer's dataloader_num_workers")
    parser.add_argument("--st_best", action=argparse.BooleanOptionalAction, default=gpu,
                        help="run SentenceTransformerTrainer in several setups (SDPA, compiled, FlashAttention-2 "
                        "where installed) and compare with the fastest (default: on a GPU)")
    parser.add_argument("--unpad", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--padded_chunks", type=int, default=4, metavar="N",
                        help="model.padded_chunks: padded batches encoded in N length-sorted chunks (default 4)")
    parser.add_argument("--layout_by_cost", action=argparse.BooleanOptionalAction, default=True,
                        help="model.layout_by_cost: on the CPU, each batch packed or padded as costs least "
                        "(--no-layout_by_cost: packed whenever --unpad, else --padded_chunks chunks)")
    parser.add_argument("--group_by_length", type=int, default=None, metavar="N",
                        help="embedtune's data.group_by_length (batches of about one length; default off)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on a GPU only, as in training")
    parser.add_argument("--compare", action="store_true", help="also run SentenceTransformerTrainer")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--profile", metavar="PATH", help="profile embedtune's run (all its steps) with "
                        "torch.profiler and write the operators' table here")
    parser.add_argument("--suite", nargs="*", default=None, metavar="NAME",
                        help="run the table of workloads (all, or those named: "
                        + ", ".join(w.name for w in SUITE) + "); --data, --batch_size, --max_length and "
                        "--negatives then come from each workload")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark in a temporary folder; its figures as one JSON-ready dict."""
    tmp = tempfile.mkdtemp(prefix="embedtune-bench-")
    try:
        model_dir = model_folder(args.model, os.path.join(tmp, "model"))
        data = os.path.join(tmp, "pairs.jsonl")
        distinct = workload(args.data, args.batch_size * (2 * args.steps + 2), data, args.negatives)
        per_pair = tokens_per_pair(model_dir, data, args.max_length)
        per_token = flops_per_token(model_dir, per_pair / 2)
        peak, peak_source = peak_flops(args.precision)
        ours = run_embedtune(model_dir, data, args, os.path.join(tmp, "ours"))
        ours["mfu"] = ours["tokens_per_s"] * per_token / peak
        loader = loader_pairs_per_s(model_dir, data, args, batches=max(8, 2 * args.steps))
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"), "device": device_name(), "precision": args.precision,
            "versions": {"embedtune": embedtune.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "workload": {"model": args.model, "data": args.data, "distinct_pairs": distinct,
                         "batch_size": args.batch_size, "max_length": args.max_length, "negatives": args.negatives,
                         "timed_steps": args.steps,
                         "tokens_per_pair": per_pair, "workers": auto_workers(args.workers),
                         "st_workers": args.st_workers,
                         "unpad": args.unpad, "compile": args.compile, "group_by_length": args.group_by_length,
                         "padded_chunks": args.padded_chunks, "layout_by_cost": args.layout_by_cost},
            "peak_flops": {"value": peak, "source": peak_source},
            "embedtune": ours, "loader_pairs_per_s": loader, "loader_ratio": loader / ours["pairs_per_s"],
        }
        if args.compare:
            import sentence_transformers

            result["versions"]["sentence_transformers"] = sentence_transformers.__version__
            tried = [run_st_trainer(model_dir, data, args, os.path.join(tmp, f"st{i}"), setup)
                     for i, setup in enumerate(st_setups(args))]
            theirs = max(tried, key=lambda r: r["pairs_per_s"])
            theirs["tried"] = {r["setup"]: r["pairs_per_s"] for r in tried}
            theirs["mfu"] = theirs["pairs_per_s"] * per_pair * per_token / peak
            result["sentence_transformers"] = theirs
            result["speedup"] = ours["pairs_per_s"] / theirs["pairs_per_s"]
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    w, ours = result["workload"], result["embedtune"]
    lines = [f"{result['date']}  {result['device']}  {result['precision']}  "
             + "  ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"workload: {w['model']}, batch {w['batch_size']}, max length {w['max_length']}, "
             f"{w['tokens_per_pair']:.0f} tokens per pair, {w['timed_steps']} timed steps, workers {w['workers']} "
             f"(sentence-transformers {w['st_workers']}), "
             f"unpad={w['unpad']} (packed: {ours['packed']}) compile={w['compile']} "
             f"padded_chunks={w.get('padded_chunks')} layout_by_cost={w.get('layout_by_cost')} "
             f"group_by_length={w.get('group_by_length')}",
             f"{'trainer':<26}{'pairs/s':>10}{'tokens/s':>12}{'padding eff':>13}{'MFU':>8}{'peak MiB':>10}",
             f"{'embedtune':<26}{ours['pairs_per_s']:>10,.0f}{ours['tokens_per_s']:>12,.0f}"
             f"{ours['padding_efficiency']:>13.2f}{ours['mfu']:>8.1%}{ours['peak_mib']:>10,.0f}"]
    if "sentence_transformers" in result:
        st = result["sentence_transformers"]
        lines.append(f"{'SentenceTransformerTrainer':<26}{st['pairs_per_s']:>10,.0f}"
                     f"{st['pairs_per_s'] * w['tokens_per_pair']:>12,.0f}{'':>13}{st['mfu']:>8.1%}"
                     f"{st['peak_mib']:>10,.0f}")
        lines.append(f"speedup: {result['speedup']:.2f}x (SentenceTransformerTrainer: {st['setup']}"
                     + (", the fastest of " + ", ".join(f"{name} {rate:,.1f}" for name, rate in st["tried"].items())
                        if len(st["tried"]) > 1 else "") + ")")
    lines.append(f"data loader alone: {result['loader_pairs_per_s']:,.0f} pairs/s = "
                 f"{result['loader_ratio']:.1f}x what training consumes")
    lines.append(f"MFU against {result['peak_flops']['source']} ({result['peak_flops']['value'] / 1e12:.1f} TFLOP/s)")
    return "\n".join(lines)


def suite_workloads(names: list[str]) -> list[Workload]:
    known = {w.name: w for w in SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --suite {' '.join(unknown)}: no such workload; the suite has "
                         + ", ".join(known))
    return [known[n] for n in names] if names else list(SUITE)


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload of the suite, one after the other in this process; on a GPU each batch is 8x."""
    scale = 8 if torch.cuda.is_available() else 1
    rows = []
    for w in suite_workloads(args.suite):
        print(f"--- {w.name}: {w.title} ({w.data})", flush=True)
        one = argparse.Namespace(**{**vars(args), "data": w.data, "batch_size": w.batch_size * scale,
                                    "max_length": w.max_length, "negatives": w.negatives})
        result = run(one)
        print(report(result), flush=True)
        rows.append({"workload": replace(w, batch_size=w.batch_size * scale).__dict__, "result": result})
    summary: dict[str, Any] = {"workloads": rows}
    if args.compare:
        worst = min(rows, key=lambda r: r["result"]["speedup"])
        summary["worst"] = {"name": worst["workload"]["name"], "speedup": worst["result"]["speedup"]}
    return summary


def suite_report(summary: dict[str, Any]) -> str:
    """One line per workload: the data, tokens per pair, both trainers' pairs/s and the ratio."""
    compare = "worst" in summary
    lines = [f"{'workload':<10}{'data':<14}{'batch':>6}{'length':>7}{'negs':>5}{'tok/pair':>9}"
             f"{'padding eff':>12}{'embedtune':>11}" + (f"{'ST':>9}{'speedup':>9}" if compare else "")]
    for row in summary["workloads"]:
        w, r = row["workload"], row["result"]
        data = "manual pages" if "manpages" in w["data"] else "python docs"
        line = (f"{w['name']:<10}{data:<14}{w['batch_size']:>6}{w['max_length']:>7}{w['negatives']:>5}"
                f"{r['workload']['tokens_per_pair']:>9.0f}{r['embedtune']['padding_efficiency']:>12.2f}"
                f"{r['embedtune']['pairs_per_s']:>11,.1f}")
        if compare:
            line += f"{r['sentence_transformers']['pairs_per_s']:>9,.1f}{r['speedup']:>8.2f}x"
        lines.append(line)
    if compare:
        lines.append(f"worst: {summary['worst']['name']} at {summary['worst']['speedup']:.2f}x")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.suite is not None:
        summary = run_suite(args)
        print(suite_report(summary))
        if args.json:
            write_json(args.json, summary)
        return 0
    result = run(args)
    print(report(result))
    if args.json:
        write_json(args.json, result)
    sys.stdout.flush()
    return 0
