"""What a run leaves behind: W&B (through Accelerate's trackers) and files in the output folder.

Every side effect happens on the main process only. Besides the tracker, the output folder gets
``config.yaml``, ``training_metrics.jsonl``, ``training_progress.json``, ``rejected.jsonl`` (when
records are skipped), ``batches.jsonl`` (when asked) and ``eval_examples.jsonl``; ``logs/train.log``
is ``embedtune.logs``'s and ``final_model/`` is ``export``'s. Every line of ``training_metrics.jsonl``
is strict JSON: a non-finite value is null, its name listed under ``nonfinite``.

Secrets never reach any of them: the config is written and sent to W&B with the values of
secret-looking environment variables (``WANDB_API_KEY``, ``HF_TOKEN``, any ``*_TOKEN``,
``*KEY*``, ``*SECRET*``, ``*PASSWORD*``) and credentials in URLs blanked out (``embedtune.secrets``),
and when the command line itself holds a secret W&B is told not to record it (its system
metadata, which includes the command line, is turned off for the run).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
from typing import Any
from urllib.parse import urlparse

import yaml
from accelerate import Accelerator

from embedtune.config import Config
from embedtune.files import write_atomic
from embedtune.secrets import command_line_holds_secret, scrub_config, scrub_text, scrub_value

logger = logging.getLogger("embedtune")


def public_config(cfg: Config) -> dict[str, Any]:
    """The config as written to config.yaml, checkpoints and W&B: secrets scrubbed."""
    return scrub_config(cfg.to_dict())


def accelerate_trackers(cfg: Config) -> list[str] | None:
    """The trackers the Accelerator is made with (``log_with``)."""
    return list(cfg.tracking.report_to) or None


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


METRICS, BATCHES, REJECTED = "training_metrics.jsonl", "batches.jsonl", "rejected.jsonl"
EXAMPLES = "eval_examples.jsonl"


def metrics_row(step: int, metrics: dict[str, Any]) -> str:
    """One line of training_metrics.jsonl, strict JSON: training keys lose their ``train/``
    prefix, and a non-finite value (a NaN loss) is written as null and named under ``nonfinite``.
    """
    row: dict[str, Any] = {"step": step}
    nonfinite = []
    for key, value in metrics.items():
        name = key.split("/", 1)[-1] if key.startswith("train/") else key
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            nonfinite.append(name)
            value = None
        row[name] = value
    if nonfinite:
        row["nonfinite"] = nonfinite
    return json.dumps(row, allow_nan=False)


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the rows up to ``last_step`` (a row without a step is kept)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()]
    kept = []
    for line in rows:
        try:
            step = json.loads(line).get("step")
        except json.JSONDecodeError:
            continue  # a row cut short by the kill
        if step is None or step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


class RunLog:
    """The run's outputs. Methods are no-ops off the main process (Accelerate's log is too)."""

    def __init__(self, cfg: Config, accelerator: Accelerator, resume_step: int | None = None,
                 wandb_id: str | None = None) -> None:
        """``resume_step``: continuing from a checkpoint at that step; rows logged after it by
        the interrupted run are dropped, since the resumed run logs those steps again."""
        self.cfg = cfg
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.out = cfg.output_dir
        self.wandb_run: Any = None
        self.step = 0  # the step being trained, for the rows of rejected.jsonl
        if self.main:
            os.makedirs(self.out, exist_ok=True)
            write_atomic(os.path.join(self.out, "config.yaml"),
                         yaml.safe_dump(public_config(cfg), sort_keys=False, allow_unicode=True))
            for name in (METRICS, BATCHES, REJECTED, EXAMPLES):
                path = os.path.join(self.out, name)
                if resume_step is None:
                    if os.path.exists(path):
                        os.remove(path)
                else:
                    truncate_jsonl(path, resume_step)
            self.metrics_file = open(os.path.join(self.out, METRICS), "a", encoding="utf-8")
            self.batches_file = (open(os.path.join(self.out, BATCHES), "a", encoding="utf-8")
                                 if cfg.tracking.log_batch_ids else None)
        if "wandb" in cfg.tracking.report_to:
            tracking = cfg.tracking
            # The same id with resume="allow" continues the run (online) or writes a new segment
            # of it (offline; `wandb sync` joins them). Steps are always passed explicitly.
            init = {"name": tracking.run_name and scrub_text(tracking.run_name),
                    "tags": [scrub_text(t) for t in tracking.tags] or None, "entity": tracking.entity,
                    "dir": self.out, "mode": wandb_mode() if self.main else "disabled",
                    "id": wandb_id, "resume": "allow" if wandb_id else None}
            if command_line_holds_secret():
                # W&B records the command line with the system metadata; leave both out.
                init["settings"] = {"x_disable_meta": True}
                if self.main:
                    logger.warning("the command line holds a secret (an environment variable's value or a URL's "
                                   "credentials): W&B will not record the command line or system metadata")
            accelerator.init_trackers(tracking.project, config=public_config(cfg),
                                      init_kwargs={"wandb": {k: v for k, v in init.items() if v is not None}})
            if self.main:
                self.wandb_run = accelerator.get_tracker("wandb", unwrap=True)
                logger.info("W&B run %s (%s)", self.wandb_run.id, init["mode"])

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.main:
            self.metrics_file.write(metrics_row(step, metrics) + "\n")
            self.metrics_file.flush()

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (W&B Table, and a row of ``eval_examples.jsonl``) on the main process; its texts
        scrubbed like every other text the run writes."""
        if not self.main:
            return
        rows = scrub_value(rows)
        with open(os.path.join(self.out, EXAMPLES), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "name": name, "columns": columns, "rows": rows},
                               ensure_ascii=False) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Values the W&B run page shows at the top (the final metrics, before and after)."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def batch_ids(self, step: int, ids: list[str]) -> None:
        if self.main and self.batches_file is not None:
            self.batches_file.write(json.dumps({"step": step, "ids": ids}) + "\n")
            self.batches_file.flush()

    def progress(self, **fields: Any) -> None:
        if self.main:
            if self.wandb_run is not None:
                run = self.wandb_run
                fields["wandb"] = {"id": run.id, "offline": run.offline, "dir": str(run.settings.sync_dir),
                                   "url": None if run.offline else run.url}
            write_atomic(os.path.join(self.out, "training_progress.json"),
                         scrub_text(json.dumps(fields, indent=2)) + "\n")

    def reject(self, rejects: list[Any], first_epoch: bool) -> None:
        """Skipped records go to rejected.jsonl once (the first epoch) and to the log."""
        if not (self.main and first_epoch):
            return
        with open(os.path.join(self.out, REJECTED), "a", encoding="utf-8") as f:
            for r in rejects:
                logger.warning("skipped %s", r.message())
                f.write(json.dumps({"file": scrub_text(r.file), "line": r.line, "reason": r.reason, "record": r.raw,
                                    "step": self.step}, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        run = self.wandb_run
        self.accelerator.end_training()
        if not self.main:
            return
        self.metrics_file.close()
        if self.batches_file is not None:
            self.batches_file.close()
        if run is not None and run.offline:
            print(f"W&B ran offline; to upload this run: wandb sync {run.settings.sync_dir}", file=sys.stderr)
