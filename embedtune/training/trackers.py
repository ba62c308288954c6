"""The trackers a run reports to, as Accelerate names them: whether each is installed (and the line
that installs it), where TensorBoard and MLflow write by default, the names and values MLflow
takes, and whether W&B runs online or offline."""

from __future__ import annotations

import json
import netrc
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate.tracking import get_available_trackers

from embedtune.config import Config, ConfigError

# What each of Accelerate's trackers needs installed: the distributions that provide it, and the
# line that installs one. Accelerate itself leaves out, with only a debug message, a tracker it
# cannot import; a run refuses to start instead.
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow", "mlflow-skinny"), "mlflow-skinny"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet-ml",), "comet-ml"),
    "aim": (("aim",), "'aim<4'"),  # Accelerate reports to aim 3 only
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
}
RUN_FOLDERS = ("checkpoints", "final_model", "logs", "wandb", "mlruns")  # no place for TensorBoard's folder
MLFLOW_NAME = re.compile(r"[^\w./\- ]")  # what MLflow refuses in a metric or param name (':' too, on Windows)
MLFLOW_VALUE_LENGTH, MLFLOW_KEY_LENGTH, MLFLOW_BATCH = 6000, 250, 100  # MLflow's limits on params


def mlflow_name(name: str, param: bool = False) -> str:
    """A name MLflow takes: ``eval/ndcg@10`` is ``eval/ndcg_at_10``. A param's may not hold '/' either:
    its key may come from the user (a source of data.source_weights), and MLflow refuses one that a
    path would read otherwise (``a//b``)."""
    name = MLFLOW_NAME.sub("_", name.replace("@", "_at_"))
    return (name.replace("/", "_") if param else name)[:MLFLOW_KEY_LENGTH]


def mlflow_value(value: Any) -> str:
    """A param's text as config.yaml spells it (null, true), cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MLFLOW_VALUE_LENGTH else text[:MLFLOW_VALUE_LENGTH - 1] + "\u2026"


def tracker_version(name: str) -> str | None:
    """The installed version of a tracker's package; None when Accelerate cannot report to it."""
    if name not in {str(t) for t in get_available_trackers()}:
        return None
    for dist in TRACKER_PACKAGES[name][0]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "installed"  # importable, without package metadata


def install_line(name: str) -> str:
    return f"pip install {TRACKER_PACKAGES[name][1]}"


def missing_trackers_problem(report_to: list[str]) -> str | None:
    """One line naming the configured trackers that are not installed, and how to install them."""
    missing = [name for name in report_to if tracker_version(name) is None]
    if not missing:
        return None
    return (f"tracking.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install {' '.join(TRACKER_PACKAGES[name][1] for name in missing)}, or take "
            f"{'it' if len(missing) == 1 else 'them'} out of tracking.report_to")


def accelerate_trackers(cfg: Config) -> list[str] | None:
    """The trackers the Accelerator is made with (``log_with``); ConfigError, before anything is
    loaded or written, for one whose package is not installed."""
    if problem := missing_trackers_problem(cfg.tracking.report_to) or tensorboard_dir_problem(cfg):
        raise ConfigError(problem)
    return list(cfg.tracking.report_to) or None


def tensorboard_dir(cfg: Config) -> str:
    """Where TensorBoard's event files go: Accelerate's logging dir (output_dir) / the project."""
    return os.path.join(cfg.output_dir, cfg.tracking.project)


def tensorboard_dir_problem(cfg: Config) -> str | None:
    """TensorBoard's folder may not be one of the run's own: final_model is replaced whole at the
    export and checkpoints are pruned, which would take the event files with them."""
    top = cfg.tracking.project.replace("\\", "/").split("/")[0]
    if "tensorboard" not in cfg.tracking.report_to or top not in RUN_FOLDERS:
        return None
    return (f"tracking.project={cfg.tracking.project}: TensorBoard writes to output_dir/<project>, which would be "
            f"a folder of the run's own ({', '.join(RUN_FOLDERS)}); choose another project name")


def mlflow_default_uri(output_dir: str) -> str:
    """The local store of a run when no MLflow tracking URI is set."""
    return Path(output_dir, "mlruns").resolve().as_uri()


def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online with a configured API key, offline without one.

    A key is WANDB_API_KEY, or a ~/.netrc entry for the W&B host (what `wandb login` writes).
    Decided without wandb itself, which may try the network while checking.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    hosts = {"api.wandb.ai", urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname}
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"
    return "online" if any(host and entries.authenticators(host) for host in hosts) else "offline"
