"""What a run leaves behind: its trackers (Accelerate's: W&B, TensorBoard, MLflow and the rest) and
files in the output folder.

Every side effect happens on the main process only. Besides the trackers, the output folder gets
``config.yaml``, ``training_metrics.jsonl``, ``training_progress.json``, ``rejected.jsonl`` (when
records are skipped), ``batches.jsonl`` (when asked) and ``eval_examples.jsonl``; ``logs/train.log``
is ``embedtune.logs``'s and ``final_model/`` is ``export``'s. Every line of ``training_metrics.jsonl``
is strict JSON: a non-finite value is null, its name listed under ``nonfinite``.

Every tracker gets the same metrics, the config and the final summary, each in the shape it takes:
W&B the nested config, its summary and tables; TensorBoard (``output_dir/<project>``) and MLflow
(``output_dir/mlruns`` unless a tracking URI is set) the config flattened to dotted keys, and the
summary as metrics of the last step. MLflow's names cannot hold ``@``: ``eval/ndcg@10`` is
``eval/ndcg_at_10`` there.

Secrets never reach any of them: the config is written and sent to the trackers with the values of
secret-looking environment variables (``WANDB_API_KEY``, ``HF_TOKEN``, any ``*_TOKEN``,
``*KEY*``, ``*SECRET*``, ``*PASSWORD*``) and credentials in URLs blanked out (``embedtune.secrets``),
and when the command line itself holds a secret W&B is told not to record it (its system
metadata, which includes the command line, is turned off for the run). MLflow records the
script's name, not its command line; its tags are scrubbed once the run has started.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import yaml
from accelerate import Accelerator

from embedtune.config import Config
from embedtune.files import write_atomic
from embedtune.secrets import command_line_holds_secret, scrub_config, scrub_text, scrub_value
from embedtune.training.trackers import MLFLOW_BATCH, mlflow_default_uri, mlflow_name, mlflow_value, wandb_mode

logger = logging.getLogger("embedtune")

def public_config(cfg: Config) -> dict[str, Any]:
    """The config as written to config.yaml, checkpoints and the trackers: secrets scrubbed."""
    return scrub_config(cfg.to_dict())


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``train.learning_rate``), for the trackers that take only
    flat scalars (TensorBoard's hparams, MLflow's params); a list is its JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            flat[name] = json.dumps(value, ensure_ascii=False, default=str)
        else:
            flat[name] = value
    return flat


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
    """The run's outputs. Methods are no-ops off the main process (Accelerate's trackers are too)."""

    def __init__(self, cfg: Config, accelerator: Accelerator, resume_step: int | None = None,
                 wandb_id: str | None = None, mlflow_id: str | None = None) -> None:
        """``resume_step``: continuing from a checkpoint at that step; rows logged after it by
        the interrupted run are dropped, since the resumed run logs those steps again.
        ``wandb_id``, ``mlflow_id``: the W&B and MLflow runs to continue."""
        self.cfg = cfg
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.out = cfg.output_dir
        self.wandb_run: Any = None
        self.mlflow_run_id: str | None = None
        self.where: dict[str, Any] = {}  # where TensorBoard and MLflow write, for training_progress.json
        self.file_store_env: dict[str, str | None] | None = None  # set while MLflow writes to output_dir
        self.step = 0  # the step being trained, for the rows of rejected.jsonl
        self.last_step = resume_step or 0  # the trackers besides W&B get the summary at this step
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
        if cfg.tracking.report_to:
            self._start_trackers(resume_step, wandb_id, mlflow_id)

    def _start_trackers(self, resume_step: int | None, wandb_id: str | None, mlflow_id: str | None) -> None:
        """Start every tracker through Accelerate, then give each the config in the shape it takes."""
        names = self.cfg.tracking.report_to
        init: dict[str, dict[str, Any]] = {}
        if "wandb" in names:
            init["wandb"] = self._wandb_init(wandb_id)
        if "tensorboard" in names:
            # TensorBoard hides the events of its folder from this step on that were written before:
            # a resumed run replaces what the interrupted one logged after its checkpoint, a new run
            # in the same output_dir all of an earlier one's.
            init["tensorboard"] = {"purge_step": 0 if resume_step is None else resume_step + 1}
        if "mlflow" in names and self.main:
            init["mlflow"] = self._mlflow_init(mlflow_id)
        self.accelerator.init_trackers(self.cfg.tracking.project, init_kwargs=init)
        if not self.main:
            return
        config = public_config(self.cfg)
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.store_init_configuration(config)
                self.wandb_run = tracker.tracker
                logger.info("W&B run %s (%s)", self.wandb_run.id, init["wandb"]["mode"])
            elif tracker.name == "tensorboard":
                tracker.store_init_configuration(flat_config(config))  # its hparams take scalars only
                self.where["tensorboard"] = {"dir": tracker.logging_dir}
                logger.info("TensorBoard writes to %s (open with: tensorboard --logdir %s)", tracker.logging_dir,
                            self.out)
            elif tracker.name == "mlflow":
                self._mlflow_started(tracker.tracker, flat_config(config))
            else:
                tracker.store_init_configuration(config)
                logger.info("reporting to %s", tracker.name)

    def _wandb_init(self, wandb_id: str | None) -> dict[str, Any]:
        tracking = self.cfg.tracking
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
        return {k: v for k, v in init.items() if v is not None}

    def _mlflow_init(self, run_id: str | None) -> dict[str, Any]:
        """MLflow's store (output_dir/mlruns unless a tracking URI is set) and the run to start or continue."""
        import mlflow
        from mlflow.exceptions import MlflowException

        if not mlflow.is_tracking_uri_set():
            # MLflow 3 keeps its file store for local use behind MLFLOW_ALLOW_FILE_STORE; the
            # variables are put back when the run ends.
            self.file_store_env = {"MLFLOW_ALLOW_FILE_STORE": os.environ.get("MLFLOW_ALLOW_FILE_STORE")}
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(mlflow_default_uri(self.out))
        if run_id:
            try:
                mlflow.MlflowClient().get_run(run_id)
            except MlflowException:
                logger.warning("MLflow run %s is not in %s: a new run starts", run_id, mlflow.get_tracking_uri())
                run_id = None
        tracking = self.cfg.tracking
        init = {"run_id": run_id, "run_name": tracking.run_name and scrub_text(tracking.run_name),
                "tags": {mlflow_name(scrub_text(t), param=True): "" for t in tracking.tags} or None,
                # Started inside a run of the caller's (from a notebook), this one is nested under it.
                "nested_run": mlflow.active_run() is not None}
        return {k: v for k, v in init.items() if v is not None}

    def _mlflow_started(self, run: Any, params: dict[str, Any]) -> None:
        """Scrub the run's tags (a git remote's URL may hold a token), and log the config as params.

        A param cannot change once logged: a resumed run adds the new ones and keeps the first
        value of those that changed (``checkpoint.resume_from`` always does)."""
        import mlflow
        from mlflow.entities import Param

        client, run_id = mlflow.MlflowClient(), run.info.run_id
        data = client.get_run(run_id).data
        for key, value in data.tags.items():
            if (clean := scrub_text(value)) != value:
                client.set_tag(run_id, key, clean)
        values = {mlflow_name(k, param=True): mlflow_value(v) for k, v in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in data.params]
        for i in range(0, len(new), MLFLOW_BATCH):
            client.log_batch(run_id, params=new[i:i + MLFLOW_BATCH])
        if changed := sorted(k for k, v in values.items() if k in data.params and data.params[k] != v):
            logger.info("MLflow keeps the first value of a param; changed since: %s", ", ".join(changed))
        uri, experiment = mlflow.get_tracking_uri(), client.get_experiment(run.info.experiment_id).name
        self.mlflow_run_id = run_id
        self.where["mlflow"] = {"run_id": run_id, "experiment": experiment, "tracking_uri": uri}
        opener = "MLFLOW_ALLOW_FILE_STORE=true " if uri.startswith("file:") else ""
        logger.info("MLflow run %s, experiment %s, in %s (open with: %smlflow ui --backend-store-uri %s)", run_id,
                    experiment, uri, opener, uri)

    def _named(self, tracker: str, values: dict[str, Any]) -> dict[str, Any]:
        return {mlflow_name(k): v for k, v in values.items()} if tracker == "mlflow" else values

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.main:
            return
        for tracker in self.accelerator.trackers:
            tracker.log(self._named(tracker.name, metrics), step=step)
        self.last_step = max(self.last_step, step)
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
        """The final metrics, before and after: W&B shows them at the top of the run's page; the
        other trackers get them as metrics of the last step logged."""
        if not self.main:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                self.wandb_run.summary.update(values)
            else:
                tracker.log(self._named(tracker.name, values), step=self.last_step)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @property
    def mlflow_id(self) -> str | None:
        return self.mlflow_run_id

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
            fields.update(self.where)
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
        if self.file_store_env is not None:  # what _mlflow_init changed, put back
            import mlflow

            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: not set, as before the run
            for key, value in self.file_store_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.metrics_file.close()
        if self.batches_file is not None:
            self.batches_file.close()
        if run is not None and run.offline:
            print(f"W&B ran offline; to upload this run: wandb sync {run.settings.sync_dir}", file=sys.stderr)
