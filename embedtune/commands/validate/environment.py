"""The environment rows: Python, torch, GPUs, mixed precision, package versions, W&B and the other
trackers of tracking.report_to, and the model loading the way a run loads it."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from packaging.requirements import Requirement

from embedtune.commands.validate.checks import FAIL, OK, WARN, Check
from embedtune.config import Config
from embedtune.files import human_bytes
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import EMBEDDED_MODELS, ModelFolder, resolve_model_path
from embedtune.secrets import scrub_text
from embedtune.training.trackers import (
    install_line,
    mlflow_default_uri,
    tensorboard_dir,
    tensorboard_dir_problem,
    tracker_version,
    wandb_mode,
)

PACKAGES = ("accelerate", "transformers", "datasets", "sentence-transformers", "wandb", "safetensors")


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


def requirements() -> dict[str, str]:
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


def outside(name: str, version: str, ranges: dict[str, str]) -> str | None:
    """The version range of embedtune's requirements that ``version`` misses, if any."""
    wanted = ranges.get(name)
    if not wanted:
        return None
    return None if Requirement(wanted).specifier.contains(version, prereleases=True) else wanted


def package_checks(report_to: list[str] | None, ranges: dict[str, str]) -> list[Check]:
    checks = []
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            # wandb is needed only by a run that reports to it.
            needed = name != "wandb" or "wandb" in (report_to or ())
            checks.append(Check("environment", name, FAIL if needed else WARN,
                                f"not installed; pip install {name}", {"version": None}))
            continue
        missed = outside(name, version, ranges)
        checks.append(Check("environment", name, WARN if missed else OK,
                            f"{version}, outside embedtune's range {missed}" if missed else version,
                            {"version": version, "required": ranges.get(name)}))
    return checks


def torch_check(ranges: dict[str, str]) -> Check:
    cuda_build = torch.version.cuda
    build = f"CUDA {cuda_build}" if cuda_build else ("ROCm " + torch.version.hip if torch.version.hip else "CPU")
    missed = outside("torch", torch.__version__.split("+")[0], ranges)
    return Check("environment", "torch", WARN if missed else OK,
                 f"{torch.__version__} ({build} build)" + (f", outside embedtune's range {missed}" if missed else ""),
                 {"version": torch.__version__, "cuda": cuda_build, "required": ranges.get("torch")})


def gpu_check() -> Check:
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory": props.total_memory,
                         "capability": f"{props.major}.{props.minor}"})
        lines = [f"cuda:{i} {g['name']}, {human_bytes(g['memory'])}, compute {g['capability']}"
                 for i, g in enumerate(gpus)]
        return Check("environment", "GPU", OK, "\n".join(lines), {"gpus": gpus})
    if torch.version.cuda:
        return Check("environment", "GPU", WARN,
                     f"a CUDA build, but no GPU is visible (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): training runs on the CPU", {"gpus": []})
    return Check("environment", "GPU", OK, "none (CPU build of torch): training runs on the CPU", {"gpus": []})


def environment_checks(cfg: Config | None) -> list[Check]:
    """The environment rows; without a config (it did not parse) those that need one are left out."""
    ranges = requirements()
    checks = [Check("environment", "python", OK, f"{platform.python_version()} ({sys.executable})",
                    {"version": platform.python_version()}),
              torch_check(ranges), gpu_check()]
    checks.append(precision_check(*effective_precision(cfg), cuda=torch.cuda.is_available()))
    checks.extend(package_checks(cfg.tracking.report_to if cfg else None, ranges))
    if cfg is not None:
        checks.append(wandb_check(cfg))
        checks.extend(tracker_checks(cfg))
    return checks


def wandb_check(cfg: Config) -> Check:
    if "wandb" not in cfg.tracking.report_to:
        why = "not in tracking.report_to" if cfg.tracking.report_to else "tracking.report_to=none"
        return Check("environment", "W&B", OK, f"off ({why})", {"mode": None})
    mode = wandb_mode()
    if os.environ.get("WANDB_MODE"):
        why = "set by WANDB_MODE"
    else:
        why = "an API key is configured" if mode == "online" else "no API key; upload later with `wandb sync`"
    return Check("environment", "W&B", OK, f"{mode} ({why}), project {cfg.tracking.project}", {"mode": mode})


def tracker_checks(cfg: Config) -> list[Check]:
    """A row per tracker of tracking.report_to besides W&B (whose rows are wandb's and W&B's): its
    version and where it writes, or FAIL with the line that installs it (a run would not start)."""
    checks = []
    for name in cfg.tracking.report_to:
        if name == "wandb":
            continue
        version = tracker_version(name)
        if version is None:
            checks.append(Check("environment", name, FAIL, f"not installed (tracking.report_to names it); "
                                f"{install_line(name)}", {"version": None}))
            continue
        if name == "tensorboard" and (problem := tensorboard_dir_problem(cfg)):
            checks.append(Check("environment", name, FAIL, problem, {"version": version}))
            continue
        if name == "tensorboard":
            where = f"writes to {tensorboard_dir(cfg)} (tensorboard --logdir {cfg.output_dir})"
        elif name == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            where = (f"experiment {cfg.tracking.project} in {scrub_text(uri)} (MLFLOW_TRACKING_URI)" if uri
                     else f"experiment {cfg.tracking.project} in {mlflow_default_uri(cfg.output_dir)}")
        else:
            where = "configured by its own settings"
        checks.append(Check("environment", name, OK, f"{version}; {where}", {"version": version}))
    return checks


@dataclass
class LoadedModel:
    """What the later checks need of the loaded model: its tokenizer, size and positions."""

    tokenizer: Any
    parameters: int
    trainable: int
    positions: int | None
    folder: ModelFolder  # what the model folder says (its prompts, for the query prefix)


def model_origin(name: str, path: str) -> str:
    """Where the model's files come from, in words."""
    if os.path.isdir(path):
        if path == name:
            return "local folder"
        return "installed package" if name in EMBEDDED_MODELS else "Hugging Face cache"
    try:
        cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
    except Exception:  # an odd name is for the loader to explain
        cached = False
    return "Hugging Face cache" if cached else "the Hugging Face Hub (not cached: needs the network)"


def model_check(cfg: Config) -> tuple[Check, LoadedModel | None]:
    """Load the model the way a run does, and say where it came from."""
    name = cfg.model.base_model
    path = resolve_model_path(name)
    origin = model_origin(name, path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
    started = time.perf_counter()
    try:
        model, tokenizer = EmbeddingModel.from_pretrained(name, cfg.model.pooling, cfg.model.normalize,
                                                          trust_remote_code=cfg.model.trust_remote_code)
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
    return Check("environment", "model load", OK, detail, data), LoadedModel(tokenizer, parameters, trainable, positions,
                                                                            model.folder)
