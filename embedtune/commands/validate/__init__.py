"""``embedtune validate``: check a training setup end to end without training.

It takes the arguments of ``embedtune train`` and answers, in one table, what a run would only
find out minutes or hours in: whether the environment can run the config (precision, GPUs,
package versions, the model loading offline), whether the config and the loss fit the data,
what the data holds (bad records by file and line, duplicates, empty texts, token lengths
against the configured limits), how many steps the run has, and whether its checkpoints fit on
the disk. Every training file is streamed once, with memory bounded by the token-length sample
and one integer per distinct question and pair. Exit status 0: nothing blocks a run (warnings
allowed); 1: something does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from embedtune.config import Config, ConfigError, make_parser, parse_args, resolve_config_path
from embedtune.data.records import (
    DataError,
    Pair,
    Reject,
    file_format,
    parse_record,
    read_file,
    resolve_files,
    text_key,
)
from embedtune.data.split import MAX_REJECTS_SHOWN, POSITIVE_LABEL, is_held_out
from embedtune.data.stream import document_tokens

logger = logging.getLogger(__name__)

OK, WARN, FAIL = "OK", "WARN", "FAIL"
DEFAULT_SAMPLE = 5000
TRUNCATION_WARN = 0.05  # share of texts cut by the max length above which a run is worth a second look
TOKENIZE_CHUNK = 1000
# Bytes per parameter: fp32 weights, and AdamW's two fp32 moments for the trained ones.
WEIGHT_BYTES, ADAM_BYTES = 4, 8
MAX_FILES_SHOWN = 5
PACKAGES = ("accelerate", "transformers", "datasets", "sentence-transformers", "wandb", "safetensors")


@dataclass
class Check:
    """One row of the report; ``data`` holds the figures behind the detail, for --json."""

    section: str
    check: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def blocking(checks: Iterable[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def _n(value: int) -> str:
    return f"{value:,}"


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --- environment ------------------------------------------------------------------------------


def effective_precision(cfg: Config | None) -> tuple[str, str]:
    """The mixed precision a run gets, and where it comes from.

    ``train.mixed_precision: null`` leaves it to Accelerate, which reads what ``accelerate
    launch`` exported; a plain ``python train.py`` then runs in fp32.
    """
    if cfg is not None and cfg.train.mixed_precision is not None:
        return cfg.train.mixed_precision, "train.mixed_precision"
    from_launch = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if from_launch:
        return from_launch, "accelerate launch (ACCELERATE_MIXED_PRECISION)"
    return "no", "train.mixed_precision is null and no accelerate launch setting"


def precision_check(precision: str, source: str, cuda: bool) -> Check:
    """What Accelerate does with the precision on this machine.

    On the CPU, Accelerate runs bf16 under CPU autocast, but ignores fp16 (no autocast, no loss
    scaler: the run is plain fp32). On a GPU it refuses bf16 only when torch says the GPU cannot
    hold bf16 at all; GPUs before Ampere pass that test by emulation, which is slow.
    """
    import torch

    data = {"mixed_precision": precision, "source": source, "device": "cuda" if cuda else "cpu"}
    if precision == "no":
        return Check("environment", "precision", OK, f"fp32 ({source})", data)
    if precision == "bf16":
        if not cuda:
            capability = torch.backends.cpu.get_cpu_capability()
            return Check("environment", "precision", OK,
                         f"bf16 autocast on the CPU ({source}); Accelerate supports it on any CPU, fast with "
                         f"AVX512-BF16/AMX (this CPU: {capability})", {**data, "cpu_capability": capability})
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Check("environment", "precision", OK, f"bf16 autocast ({source}); the GPU supports bf16", data)
        if torch.cuda.is_bf16_supported():
            return Check("environment", "precision", WARN,
                         f"bf16 ({source}) runs on this GPU only by emulation, which is slow: use fp16 here "
                         "(train.mixed_precision=fp16)", data)
        return Check("environment", "precision", FAIL,
                     f"bf16 ({source}) is not supported by this GPU, and Accelerate refuses it: "
                     "set train.mixed_precision=fp16 or no", data)
    if precision == "fp16":
        if not cuda:
            return Check("environment", "precision", WARN,
                         f"fp16 ({source}) on the CPU: Accelerate uses neither autocast nor a loss scaler there, "
                         "so the run is fp32; use bf16 for mixed precision on the CPU", data)
        return Check("environment", "precision", OK, f"fp16 autocast with loss scaling ({source})", data)
    return Check("environment", "precision", WARN, f"{precision} ({source}): not checked here", data)


def _requirements() -> dict[str, str]:
    """embedtune's own version ranges, when it is installed (not when run from a bare checkout)."""
    try:
        required = metadata.requires("embedtune") or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for line in required:
        if "extra ==" in line:
            continue
        name = line.split(";")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        ranges[name.strip().lower()] = line.split(";")[0].strip()
    return ranges


def _outside(name: str, version: str, ranges: dict[str, str]) -> str | None:
    """The version range of embedtune's requirements that ``version`` misses, if any."""
    wanted = ranges.get(name)
    if not wanted:
        return None
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    return None if Requirement(wanted).specifier.contains(version, prereleases=True) else wanted


def package_checks(report_to: str | None, ranges: dict[str, str]) -> list[Check]:
    checks = []
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            needed = name != "wandb" or report_to == "wandb"
            checks.append(Check("environment", name, FAIL if needed else WARN,
                                f"not installed; pip install {name}", {"version": None}))
            continue
        outside = _outside(name, version, ranges)
        checks.append(Check("environment", name, WARN if outside else OK,
                            f"{version}, outside embedtune's range {outside}" if outside else version,
                            {"version": version, "required": ranges.get(name)}))
    return checks


def environment_checks(cfg: Config | None) -> list[Check]:
    import torch

    ranges = _requirements()
    checks = [Check("environment", "python", OK, f"{platform.python_version()} ({sys.executable})",
                    {"version": platform.python_version()})]
    cuda_build = torch.version.cuda
    build = f"CUDA {cuda_build}" if cuda_build else ("ROCm " + torch.version.hip if torch.version.hip else "CPU")
    outside = _outside("torch", torch.__version__.split("+")[0], ranges)
    checks.append(Check("environment", "torch", WARN if outside else OK,
                        f"{torch.__version__} ({build} build)" + (f", outside embedtune's range {outside}"
                                                                    if outside else ""),
                        {"version": torch.__version__, "cuda": cuda_build, "required": ranges.get("torch")}))
    cuda = torch.cuda.is_available()
    if cuda:
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory": props.total_memory,
                         "capability": f"{props.major}.{props.minor}"})
        lines = [f"cuda:{i} {g['name']}, {human_bytes(g['memory'])}, compute {g['capability']}"
                 for i, g in enumerate(gpus)]
        checks.append(Check("environment", "GPU", OK, "\n".join(lines), {"gpus": gpus}))
    elif cuda_build:
        checks.append(Check("environment", "GPU", WARN,
                            f"a CUDA build, but no GPU is visible (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): training runs on the CPU",
                            {"gpus": []}))
    else:
        checks.append(Check("environment", "GPU", OK, "none (CPU build of torch): training runs on the CPU",
                            {"gpus": []}))
    checks.append(precision_check(*effective_precision(cfg), cuda=cuda))
    checks.extend(package_checks(cfg.tracking.report_to if cfg else None, ranges))
    if cfg is not None:
        checks.append(wandb_check(cfg))
    return checks


def wandb_check(cfg: Config) -> Check:
    from embedtune.training.tracking import wandb_mode

    if cfg.tracking.report_to != "wandb":
        return Check("environment", "W&B", OK, "off (tracking.report_to=none)", {"mode": None})
    mode = wandb_mode()
    if os.environ.get("WANDB_MODE"):
        why = "set by WANDB_MODE"
    else:
        why = "an API key is configured" if mode == "online" else "no API key; upload later with `wandb sync`"
    return Check("environment", "W&B", OK, f"{mode} ({why}), project {cfg.tracking.project}", {"mode": mode})


@dataclass
class LoadedModel:
    tokenizer: Any
    parameters: int
    trainable: int
    positions: int | None


def model_check(cfg: Config) -> tuple[Check, LoadedModel | None]:
    """Load the model the way a run does, and say where it came from."""
    from embedtune.model.encoder import EmbeddingModel
    from embedtune.model.folder import resolve_model_path

    name = cfg.model.base_model
    path = resolve_model_path(name)
    if os.path.isdir(path):
        origin = "local folder" if path == name else "installed package"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        except Exception:  # an odd name is for the loader to explain
            cached = False
        origin = "Hugging Face cache" if cached else "the Hugging Face Hub (not cached: needs the network)"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
    started = time.perf_counter()
    try:
        model, tokenizer = EmbeddingModel.from_pretrained(name, cfg.model.pooling, cfg.model.normalize)
    except Exception as exc:  # ModelLoadError says what to give instead; anything else is shown as is
        return Check("environment", "model load", FAIL, str(exc), {"name": name, "path": path}), None
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    detail = (f"{name}: loads {'offline ' if offline or os.path.isdir(path) else ''}from {origin} "
              f"({path})\n{parameters / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trained), dim {model.dim}, "
              f"pooling {model.pooling}, {'normalized' if model.normalize else 'not normalized'}, "
              f"{positions or '?'} positions; loaded in {seconds:.1f} s")
    data = {"name": name, "path": path, "origin": origin, "parameters": parameters, "trainable": trainable,
            "dim": model.dim, "positions": positions, "load_seconds": round(seconds, 2)}
    return Check("environment", "model load", OK, detail, data), LoadedModel(tokenizer, parameters, trainable, positions)


# --- config -----------------------------------------------------------------------------------


def config_checks(cfg: Config, source: str, loss: Check) -> list[Check]:
    """The settings that decide a run, as resolved from the file, the flags and the overrides."""
    d, t = cfg.data, cfg.train
    held_out = (f"held out: {', '.join(d.eval_files)}" if d.eval_files
                else f"held out: {d.eval_fraction:g} of the questions (by hash)" if d.eval_fraction
                else "no held-out evaluation")
    run_length = (f"max_steps {t.max_steps}" if t.max_steps else f"{t.epochs} epoch{'s' * (t.epochs != 1)}")
    prefixes = ""
    if d.query_prefix or d.document_prefix:
        prefixes = f"; prefixes {d.query_prefix!r} / {d.document_prefix!r}"
    rows = [
        ("config", source),
        ("model", f"{cfg.model.base_model} (pooling {cfg.model.pooling}, normalize "
                  f"{'auto' if cfg.model.normalize is None else cfg.model.normalize})"),
        ("train files", f"{', '.join(d.train_files)} (format {d.format}, fields {d.query_field!r} -> "
                        f"{d.positive_field!r}{f', negatives {d.negatives_field!r}' if d.negatives_field else ''}"
                        f"{f', label {d.label_field!r}' if d.label_field else ''}); {held_out}"),
        ("batch", f"{t.batch_size} pairs per step, {t.gradient_accumulation_steps} micro-batch"
                  f"{'es' * (t.gradient_accumulation_steps != 1)}; learning rate {t.learning_rate:g}, "
                  f"{t.scheduler} schedule, warmup {t.warmup_ratio:g}"),
        ("lengths", f"query {d.query_max_length} tokens, document {d.document_max_length} tokens{prefixes}"),
        ("run length", f"{run_length}, seed {t.seed}"),
        ("output_dir", f"{cfg.output_dir} ({os.path.abspath(cfg.output_dir)})"),
    ]
    checks = [Check("config", name, OK, detail) for name, detail in rows]
    return checks[:-2] + [loss] + checks[-2:]


def loss_check(cfg: Config) -> Check:
    """The trainer's own check that the loss gets the data it needs (it also marks triplet losses,
    so records without a negative count as bad below)."""
    from embedtune.losses import build_loss, check_loss_data, required_data

    try:
        loss = build_loss(cfg.loss)
        check_loss_data(required_data(loss), cfg.data, cfg.loss.name)
    except (ConfigError, ValueError) as exc:
        return Check("config", "loss", FAIL, str(exc), {"name": cfg.loss.name})
    needs = getattr(loss, "needs", "pairs")
    extra = f", Matryoshka {cfg.loss.matryoshka_dims}" if cfg.loss.matryoshka_dims else ""
    return Check("config", "loss", OK, f"{cfg.loss.name} (trains on {needs}{extra})",
                 {"name": cfg.loss.name, "needs": needs})


# --- data -------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What one pass over the files found; ``sample`` is a seeded reservoir of good pairs."""

    files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    records: int = 0  # non-blank lines or rows of the training files
    pairs: int = 0  # good records of the training files
    train: int = 0
    held_out: int = 0  # carved off the training files, or the good records of the eval files
    eval_queries: int = 0  # distinct held-out questions usable for evaluation (before max_eval_queries)
    eval_in_train: int = 0  # training pairs whose question is also a held-out one (eval files only)
    rejects: int = 0
    first_rejects: list[Reject] = field(default_factory=list)
    empty: Counter = field(default_factory=Counter)  # role -> empty texts
    duplicate_questions: int = 0
    duplicate_pairs: int = 0
    sample: list[Pair] = field(default_factory=list)
    seen_for_sample: int = 0


def empty_texts(raw: Any, cfg: Any) -> Counter:
    """Empty or blank texts (and nulls, which is what an empty CSV cell becomes) in one raw record.

    The reader rejects such records; counting them apart tells an empty answer from a broken line.
    """
    found: Counter = Counter()
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


def _records(files: list[str], cfg: Any) -> Iterable[tuple[Pair | Reject, Any]]:
    """Like ``read_pairs``, but with each record's raw line or row, for the empty-text count."""
    for path in files:
        fmt = file_format(path, cfg.format)
        for line, raw in read_file(path, fmt, cfg.max_record_bytes):
            item = parse_record(path, line, raw, cfg)
            if item is not None:
                yield item, raw


def scan_data(cfg: Config, sample_size: int) -> DataStats:
    """One pass over the eval files, then the training files. Memory: the sample, and one int per
    distinct question, pair and held-out question."""
    d = cfg.data
    stats = DataStats(files=resolve_files(d.train_files), eval_files=resolve_files(d.eval_files))
    rng = random.Random(cfg.train.seed)

    def note_reject(item: Reject, raw: Any) -> None:
        stats.rejects += 1
        stats.empty.update(empty_texts(raw, d))
        if len(stats.first_rejects) < MAX_REJECTS_SHOWN:
            stats.first_rejects.append(item)

    def note_sample(pair: Pair) -> None:
        stats.seen_for_sample += 1
        if len(stats.sample) < sample_size:
            stats.sample.append(pair)
        elif sample_size:
            slot = rng.randrange(stats.seen_for_sample)
            if slot < sample_size:
                stats.sample[slot] = pair

    eval_keys: set[int] = set()

    def note_held_out(pair: Pair) -> None:
        stats.held_out += 1
        if pair.label is not None and pair.label < POSITIVE_LABEL:
            return  # not a question with its answer; evaluation leaves it out
        key = text_key(pair.query)
        if key not in eval_keys:
            eval_keys.add(key)
            stats.eval_queries += 1

    for item, raw in _records(stats.eval_files, d):
        if isinstance(item, Reject):
            note_reject(item, raw)
        else:
            note_held_out(item)
            note_sample(item)
    held_out_files = set(eval_keys)

    carve = not d.eval_files
    questions: set[int] = set()
    pairs: set[int] = set()
    for item, raw in _records(stats.files, d):
        stats.records += 1
        if isinstance(item, Reject):
            note_reject(item, raw)
            continue
        stats.pairs += 1
        query_key = text_key(item.query)
        pair_key = (query_key << 64) | text_key(item.positive)
        if query_key in questions:
            stats.duplicate_questions += 1
            if pair_key in pairs:
                stats.duplicate_pairs += 1
        questions.add(query_key)
        pairs.add(pair_key)
        note_sample(item)
        if carve and is_held_out(item, d.eval_fraction):
            note_held_out(item)
        else:
            stats.train += 1
            if query_key in held_out_files:
                stats.eval_in_train += 1
    return stats


def _show_files(files: list[str]) -> str:
    lines = []
    for path in files[:MAX_FILES_SHOWN]:
        size = f", {human_bytes(os.path.getsize(path))}" if os.path.isfile(path) else ""
        lines.append(f"{path}{size}")
    if len(files) > MAX_FILES_SHOWN:
        lines.append(f"... and {len(files) - MAX_FILES_SHOWN} more")
    return "\n".join(lines)


def data_checks(cfg: Config, stats: DataStats) -> list[Check]:
    d = cfg.data
    checks = [Check("data", "files", OK,
                    f"{len(stats.files)} training file{'s' * (len(stats.files) != 1)}:\n{_show_files(stats.files)}"
                    + (f"\n{len(stats.eval_files)} eval file(s):\n{_show_files(stats.eval_files)}"
                       if stats.eval_files else ""),
                    {"train_files": stats.files, "eval_files": stats.eval_files})]
    records = Check("data", "records", OK,
                    f"{_n(stats.records)} records, {_n(stats.pairs)} good pairs: {_n(stats.train)} training, "
                    f"{_n(stats.held_out)} held out ({_n(stats.eval_queries)} distinct questions, evaluation uses "
                    f"up to {_n(d.max_eval_queries)})",
                    {"records": stats.records, "pairs": stats.pairs, "train": stats.train,
                     "held_out": stats.held_out, "eval_queries": stats.eval_queries})
    if stats.train == 0:
        records.status = FAIL
        records.detail += "\nno training pair: every record is bad or held out; check the files and data.eval_fraction"
    elif stats.held_out == 0 and (d.eval_files or d.eval_fraction > 0):
        records.status = WARN
        records.detail += "\nno held-out pair: the run cannot report retrieval metrics"
    checks.append(records)
    if d.eval_files:
        status = WARN if stats.eval_in_train else OK
        checks.append(Check("data", "eval overlap", status,
                            f"{_n(stats.eval_in_train)} training pairs ask a question of the eval files"
                            + (": held-out metrics will look better than they are" if stats.eval_in_train else ""),
                            {"eval_in_train": stats.eval_in_train}))

    bad = {"count": stats.rejects, "first": [asdict(r) | {"raw": r.raw[:200]} for r in stats.first_rejects]}
    if not stats.rejects:
        checks.append(Check("data", "bad records", OK, "none", bad))
    else:
        lines = [f"{_n(stats.rejects)} bad record{'s' * (stats.rejects != 1)}:"]
        lines += [f"  {r.message()}" for r in stats.first_rejects]
        if stats.rejects > len(stats.first_rejects):
            lines.append(f"  ... and {_n(stats.rejects - len(stats.first_rejects))} more")
        if d.on_bad_record == "error":
            lines.append("the run stops at the first (data.on_bad_record=error): fix them, or set "
                         "data.on_bad_record=skip")
        else:
            lines.append("skipped (data.on_bad_record=skip) and kept in output_dir/rejected.jsonl")
        checks.append(Check("data", "bad records", FAIL if d.on_bad_record == "error" else WARN,
                            "\n".join(lines), bad))

    empty_total = sum(stats.empty.values())
    parts = ", ".join(f"{stats.empty[r]} {r}" for r in ("query", "positive", "negative") if stats.empty[r])
    checks.append(Check("data", "empty texts", WARN if empty_total else OK,
                        f"{empty_total} ({parts}; counted among the bad records)" if empty_total else "none",
                        {"total": empty_total, **{r: stats.empty[r] for r in ("query", "positive", "negative")}}))

    masked = cfg.loss.mask_false_negatives
    dup_detail = (f"{_n(stats.duplicate_questions)} records repeat an earlier question, "
                  f"{_n(stats.duplicate_pairs)} repeat an earlier question and answer")
    if stats.duplicate_pairs:
        dup_detail += "\nrepeated pairs are trained on more than once per epoch; drop them unless meant as weights"
    if stats.duplicate_questions and not masked:
        dup_detail += ("\nloss.mask_false_negatives is off: a duplicate question's answer counts as a negative "
                       "when both land in one batch")
    status = WARN if stats.duplicate_pairs or (stats.duplicate_questions and not masked) else OK
    checks.append(Check("data", "duplicates", status, dup_detail,
                        {"questions": stats.duplicate_questions, "pairs": stats.duplicate_pairs}))
    return checks


# --- token lengths ----------------------------------------------------------------------------


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
              f"{key}={max_length}: {_n(over)} of {_n(len(ordered))} ({rate:.1%}) cut ({sample_note})")
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
    note = (f"all {_n(total)} records" if len(stats.sample) == total
            else f"a random sample of {_n(len(stats.sample))} of {_n(total)} records")
    queries = [d.query_prefix + p.query for p in stats.sample]
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
    import torch

    from embedtune.model.packing import padded_tokens

    per_batch = max(1, cfg.train.batch_size // cfg.train.gradient_accumulation_steps)
    if len(sample) < per_batch:
        return Check("data", "padding", OK, f"not estimated: the sample holds fewer pairs than a batch ({note})")
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


# --- steps ------------------------------------------------------------------------------------


def steps_per_epoch(train_pairs: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in one epoch, as the trainer counts them (``train.planned_steps``)."""
    full, rest = divmod(train_pairs, batch_size)
    return full + (rest > 0 and not drop_last)


def total_steps(cfg: Config, per_epoch: int) -> int:
    return cfg.train.max_steps or max(1, per_epoch * cfg.train.epochs)


def step_checks(cfg: Config, train_pairs: int) -> tuple[list[Check], int]:
    t = cfg.train
    per_epoch = steps_per_epoch(train_pairs, t.batch_size, cfg.data.drop_last)
    total = total_steps(cfg, per_epoch)
    rest = train_pairs % t.batch_size
    last = (f", the last of {rest} pairs" if rest and not cfg.data.drop_last
            else f", the last {rest} pairs dropped (data.drop_last)" if rest else "")
    data = {"train_pairs": train_pairs, "per_epoch": per_epoch, "total": total,
            "warmup": math.ceil(t.warmup_ratio * total)}
    status = OK
    detail = f"{_n(per_epoch)} per epoch ({_n(train_pairs)} pairs / batch {t.batch_size}{last}); "
    if t.max_steps:
        passes = t.max_steps / per_epoch if per_epoch else math.inf
        detail += f"{_n(total)} in all (train.max_steps: {passes:.2f} passes over the data)"
    else:
        detail += f"{_n(total)} in all ({t.epochs} epoch{'s' * (t.epochs != 1)})"
    detail += f"; {data['warmup']} warmup"
    if per_epoch == 0:
        status = FAIL
        detail += "\nan epoch has no training batch: check data.eval_fraction, train.batch_size and data.drop_last"
    checks = [Check("steps", "optimizer steps", status, detail, data)]

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    micro = t.batch_size // t.gradient_accumulation_steps
    per_process = micro // processes
    proc = Check("steps", "processes", OK,
                 f"{processes} process{'es' * (processes != 1)} (WORLD_SIZE): {micro} pairs per micro-batch, "
                 f"about {per_process} per process", {"processes": processes, "micro_batch": micro})
    if micro < processes:
        proc.status = FAIL
        proc.detail += ("\nfewer pairs per micro-batch than processes: raise train.batch_size or lower "
                        "train.gradient_accumulation_steps")
    checks.append(proc)
    return checks, total


# --- output and disk --------------------------------------------------------------------------


def planned_saves(steps: int, every_n_steps: int | None) -> int:
    """Checkpoints a run writes; without periodic ones a stop (signal, non-finite gradients) still
    writes one."""
    if not every_n_steps:
        return 1
    return max(1, math.ceil(steps / every_n_steps))


def checkpoint_bytes(parameters: int, trainable: int, keep_last: int, keep_best: bool, saves: int) -> dict[str, int]:
    """Disk a run needs at its peak: the checkpoints on disk at once, and the exported model.

    A checkpoint holds fp32 weights and AdamW's two moments for the trained weights. Retention
    runs after a new checkpoint is complete, so ``keep_last + 1`` exist for a moment, plus the
    best one when it is kept apart; never more than the run writes.
    """
    per_checkpoint = parameters * WEIGHT_BYTES + trainable * ADAM_BYTES
    at_once = min(saves, keep_last + 1 + int(keep_best))
    final_model = parameters * WEIGHT_BYTES
    return {"per_checkpoint": per_checkpoint, "checkpoints": at_once, "final_model": final_model,
            "total": per_checkpoint * at_once + final_model}


def existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def disk_check(estimate: dict[str, int], free: int, where: str) -> Check:
    """Blocking when the estimate does not fit in ``free`` bytes; a warning when it takes most of it."""
    need = estimate["total"]
    data = {**estimate, "free": free, "where": where}
    detail = (f"needs about {human_bytes(need)} ({estimate['checkpoints']} checkpoint"
              f"{'s' * (estimate['checkpoints'] != 1)} of {human_bytes(estimate['per_checkpoint'])} + final model "
              f"{human_bytes(estimate['final_model'])}); {human_bytes(free)} free at {where}")
    if need > free:
        return Check("output", "disk space", FAIL,
                     detail + "\ndoes not fit: free space, lower checkpoint.keep_last, or choose another output_dir",
                     data)
    if need > free / 2:
        return Check("output", "disk space", WARN, detail + "\nmore than half the free space", data)
    return Check("output", "disk space", OK, detail, data)


def output_check(cfg: Config) -> Check:
    """The trainer refuses an output_dir with an earlier run's checkpoints unless resuming it."""
    from embedtune import checkpoint

    out = cfg.output_dir
    found = checkpoint.complete_checkpoints(out)
    data = {"path": os.path.abspath(out), "checkpoints": len(found)}
    if cfg.checkpoint.resume_from:
        try:
            path = checkpoint.find_checkpoint(out, cfg.checkpoint.resume_from)
            state = checkpoint.TrainerState.load(path)
            changes = checkpoint.check_resume(state.config, cfg)
        except (checkpoint.CheckpointError, OSError, ValueError, TypeError) as exc:
            return Check("output", "checkpoints", FAIL, str(exc), data)
        detail = f"resumes from {path} (step {state.step}, epoch {state.epoch})"
        if changes:
            detail += "\nchanged since the checkpoint (allowed): " + "; ".join(changes)
        return Check("output", "checkpoints", OK, detail, data)
    if found:
        return Check("output", "checkpoints", FAIL,
                     f"{out} already holds {len(found)} checkpoint(s) of an earlier run: continue it with "
                     "--resume_from_checkpoint latest, or give another output_dir", data)
    state = "exists" if os.path.isdir(out) else "will be created"
    return Check("output", "checkpoints", OK, f"{os.path.abspath(out)} ({state}; no earlier checkpoints)", data)


# --- the whole check --------------------------------------------------------------------------


def run_checks(cfg: Config, sample_size: int = DEFAULT_SAMPLE, free_bytes: int | None = None,
               source: str = "command line") -> list[Check]:
    """Every check for a parsed config. ``free_bytes`` replaces the free space measured at
    output_dir (tests, or planning for another disk)."""
    started = time.perf_counter()
    checks = environment_checks(cfg)
    model_row, model = model_check(cfg)
    checks.append(model_row)
    logger.info("environment checked in %.1f s", time.perf_counter() - started)

    checks += config_checks(cfg, source, loss_check(cfg))

    stats = None
    mark = time.perf_counter()
    try:
        stats = scan_data(cfg, sample_size)
    except DataError as exc:
        checks.append(Check("data", "files", FAIL, str(exc)))
    except Exception as exc:  # a reader's own error (network, codec...): reported, not raised
        checks.append(Check("data", "files", FAIL, f"cannot read the data: {type(exc).__name__}: {exc}"))
    if stats is not None:
        checks += data_checks(cfg, stats)
        if model is not None:
            checks += length_checks(cfg, stats, model)
        else:
            checks.append(Check("data", "token lengths", WARN, "not measured: the model's tokenizer did not load"))
        logger.info("data: %d records read in %.1f s", stats.records, time.perf_counter() - mark)

    total = None
    if stats is not None:
        step_rows, total = step_checks(cfg, stats.train)
        checks += step_rows
    checks.append(output_check(cfg))
    if model is not None:
        saves = planned_saves(total or cfg.train.max_steps or 1, cfg.checkpoint.every_n_steps)
        estimate = checkpoint_bytes(model.parameters, model.trainable, cfg.checkpoint.keep_last,
                                    bool(cfg.checkpoint.best_metric), saves)
        where = existing_parent(cfg.output_dir)
        free = shutil.disk_usage(where).free if free_bytes is None else free_bytes
        checks.append(disk_check(estimate, free, where))
    else:
        checks.append(Check("output", "disk space", WARN, "not estimated: the model did not load"))
    return checks


SECTIONS = ("environment", "config", "data", "steps", "output")


def format_table(checks: list[Check]) -> str:
    """Aligned columns; a multi-line detail continues under its own column."""
    ordered = sorted(checks, key=lambda c: SECTIONS.index(c.section) if c.section in SECTIONS else len(SECTIONS))
    header = Check("section", "check", "status", "detail")
    widths = [max(len(getattr(c, name)) for c in [header, *ordered]) for name in ("section", "check", "status")]
    lines = []
    previous = None
    for c in [header, *ordered]:
        section = c.section if c.section != previous else ""
        previous = c.section
        first, *more = c.detail.splitlines() or [""]
        lead = f"{section:<{widths[0]}}  {c.check:<{widths[1]}}  {c.status:<{widths[2]}}  "
        lines.append((lead + first).rstrip())
        lines += [(" " * len(lead) + line).rstrip() for line in more]
    return "\n".join(lines)


def summary(checks: list[Check], seconds: float) -> str:
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    verdict = "blocked: fix the FAIL rows before training" if fails else "ready to train"
    return f"{verdict} ({fails} blocking, {warns} warning{'s' * (warns != 1)}; checked in {seconds:.1f} s)"


def _own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split off validate's own flags; the rest goes to the trainer's parser unchanged."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--json")
    own.add_argument("--sample", type=int, default=DEFAULT_SAMPLE)
    return own.parse_known_args(argv)


def main(argv: list[str] | None = None, prog: str = "embedtune validate") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    started = time.perf_counter()
    # The trainer's parser with validate's flags added: --help lists both, and a usage error
    # is reported the way `embedtune train` reports it.
    parser = make_parser(prog)
    parser.description = ("Check a training setup without training: environment, config, data, steps and "
                          "disk. Takes the arguments of `embedtune train`.")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                        help=f"records whose token lengths are measured (default {DEFAULT_SAMPLE}; 0: none)")
    args = parser.parse_intermixed_args(argv)
    if args.sample < 0:
        parser.error("--sample must be 0 or more")
    _, train_argv = _own_flags(argv)

    cfg = None
    source = "command line"
    try:
        if args.config:
            source = str(resolve_config_path(args.config))
        cfg = parse_args(train_argv, prog=prog)
    except ConfigError as exc:
        checks = environment_checks(None)
        checks.append(Check("config", "config", FAIL, str(exc)))
    else:
        checks = run_checks(cfg, args.sample, source=source)
    seconds = time.perf_counter() - started
    print(format_table(checks))
    print()
    print(summary(checks, seconds))
    code = 1 if blocking(checks) else 0
    if args.json:
        report = {"ok": code == 0, "exit_code": code, "seconds": round(seconds, 2),
                  "blocking": sum(c.status == FAIL for c in checks), "warnings": sum(c.status == WARN for c in checks),
                  "config": cfg.to_dict() if cfg else None, "checks": [asdict(c) for c in checks]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
