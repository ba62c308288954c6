"""Trackers besides W&B: real short runs report to TensorBoard and MLflow, and what they wrote is
read back with each one's own reader (TensorBoard's EventAccumulator, MLflow's client on its file
store) and compared with ``training_metrics.jsonl``, ``training_progress.json`` and the config.
A tracker whose package is missing stops the run before anything is written."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_pairs, write_jsonl
from wandb_reader import read_run, run_files

from embedtune.commands.train import main as train_main
from embedtune.commands.validate import main as validate_main
from embedtune.config import ConfigError, build_config
from embedtune.secrets import REDACTED
from embedtune.training.trackers import accelerate_trackers, mlflow_default_uri, mlflow_name, tracker_version
from embedtune.training.tracking import RunLog, flat_config

SECRET = "hf_plantedTrackerToken5e7a9c1b3d"


@pytest.fixture(autouse=True)
def mlflow_state(monkeypatch: pytest.MonkeyPatch):
    """No tracking URI from outside, and none left behind by a test that failed mid-run."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def run_args(model: Path, tmp_path: Path, report_to: str, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(120))
    return ["--input_jsonl", str(data), "--base_model", str(model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "16", "data.num_workers=0", "data.query_max_length=24", "data.document_max_length=32",
            "train.max_steps=4", "tracking.log_every_n_steps=1", "eval.every_n_steps=2", "data.eval_fraction=0.2",
            "train.warmup_ratio=0", f"tracking.report_to={report_to}", *extra]


def jsonl_series(out: Path) -> dict[str, dict[int, float]]:
    """training_metrics.jsonl as series by the name the trackers get (``loss`` was ``train/loss``)."""
    series: dict[str, dict[int, float]] = {}
    for line in (out / "training_metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "nonfinite"):
                series.setdefault(key if "/" in key else f"train/{key}", {})[row["step"]] = value
    return series


def tensorboard_scalars(folder: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_hparams(folder: str) -> dict[str, Any]:
    """The hparams of the session Accelerate wrote in a sub-folder of the run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for sub in sorted(p for p in glob.glob(os.path.join(folder, "*")) if os.path.isdir(p)):
        events = EventAccumulator(sub)
        events.Reload()
        try:
            content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:  # Accelerate's hparams.yml has a folder of its own
            continue
        if content:
            info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
            found.update({k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()})
    return found


def mlflow_client(out: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
    return MlflowClient(tracking_uri=mlflow_default_uri(str(out)))


def mlflow_runs(client: Any, experiment: str = "embedtune") -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    return client.search_runs([found.experiment_id])


def mlflow_history(client: Any, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def test_tensorboard_and_mlflow_hold_the_metrics_config_and_summary_of_the_run(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    args = run_args(tiny_model, tmp_path, "[tensorboard,mlflow]", f"tracking.run_name={SECRET}",
                    f"tracking.tags=[{SECRET},plain]")
    assert train_main(args) == 0
    out = tmp_path / "out"
    series = jsonl_series(out)
    progress = json.loads((out / "training_progress.json").read_text())
    assert sorted(series["train/loss"]) == [1, 2, 3, 4] and sorted(series["eval/ndcg@10"]) == [0, 2, 4]
    assert "wandb" not in progress and not (out / "wandb").exists()

    # TensorBoard: every metric of every logged step, as in the jsonl; the summary at the last step.
    folder = progress["tensorboard"]["dir"]
    assert Path(folder) == out / "embedtune"
    scalars = tensorboard_scalars(folder)
    for name, points in series.items():
        assert scalars[name] == pytest.approx(points, rel=1e-6), name
    assert scalars["final/ndcg@10"] == pytest.approx({4: progress["eval_after"]["ndcg@10"]}, rel=1e-6)
    assert scalars["before/mrr@10"] == pytest.approx({4: progress["eval_before"]["mrr@10"]}, rel=1e-6)
    # Its hparams: the config flattened to dotted keys, secrets scrubbed.
    hparams = tensorboard_hparams(folder)
    assert hparams["train.max_steps"] == 4 and hparams["loss.name"] == "MultipleNegativesRankingLoss"
    assert hparams["tracking.run_name"] == REDACTED and json.loads(hparams["tracking.tags"]) == [REDACTED, "plain"]

    # The run put back the MLflow settings it made for its local store.
    import mlflow

    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert not mlflow.is_tracking_uri_set() and mlflow.active_run() is None

    # MLflow: one finished run in output_dir/mlruns, the same history, the config as params, the summary.
    client = mlflow_client(out, monkeypatch)
    [run] = mlflow_runs(client)
    assert run.info.status == "FINISHED" and run.info.run_id == progress["mlflow"]["run_id"]
    assert progress["mlflow"]["tracking_uri"] == mlflow_default_uri(str(out))
    assert progress["mlflow"]["experiment"] == "embedtune"
    for name, points in series.items():
        assert mlflow_history(client, run.info.run_id, mlflow_name(name)) == pytest.approx(points), name
    assert "eval/ndcg_at_10" in run.data.metrics  # MLflow's names cannot hold '@'
    assert run.data.metrics["final/ndcg_at_10"] == pytest.approx(progress["eval_after"]["ndcg@10"])
    assert mlflow_history(client, run.info.run_id, "before/mrr_at_10") == pytest.approx(
        {4: progress["eval_before"]["mrr@10"]})
    params = run.data.params
    assert params["train.max_steps"] == "4" and params["checkpoint.resume_from"] == "null"
    assert json.loads(params["data.train_files"]) == [str(tmp_path / "pairs.jsonl")]
    assert params["tracking.run_name"] == REDACTED and run.info.run_name == REDACTED
    assert "plain" in run.data.tags
    flat = flat_config(yaml.safe_load((out / "config.yaml").read_text()))  # every key of the config
    assert set(params) == {mlflow_name(k, param=True) for k in flat}
    assert set(hparams) == {k for k, v in flat.items() if v is not None}  # TensorBoard leaves out nulls

    leaks = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
    log = (out / "logs" / "train.log").read_text()
    assert f"tensorboard --logdir {out}" in log and f"mlflow ui --backend-store-uri {mlflow_default_uri(str(out))}" in log


def test_with_wandb_every_tracker_gets_the_same_values(tiny_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert train_main(run_args(tiny_model, tmp_path, "[wandb,tensorboard,mlflow]")) == 0
    out = tmp_path / "out"
    progress = json.loads((out / "training_progress.json").read_text())
    [run_file] = run_files(str(out))
    wandb = read_run(run_file)
    assert wandb["meta"]["exit_code"] == 0 and wandb["config"]["train"]["max_steps"] == 4  # nested, as before
    assert progress["wandb"]["id"] == wandb["meta"]["id"]
    losses = {row["_step"]: row["train/loss"] for row in wandb["history"] if "train/loss" in row}
    evals = {row["_step"]: row["eval/ndcg@10"] for row in wandb["history"] if "eval/ndcg@10" in row}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(evals) == [0, 2, 4]
    assert wandb["summary"]["final/ndcg@10"] == pytest.approx(progress["eval_after"]["ndcg@10"])

    scalars = tensorboard_scalars(progress["tensorboard"]["dir"])
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert scalars["eval/ndcg@10"] == pytest.approx(evals, rel=1e-6)
    client = mlflow_client(out, monkeypatch)
    [run] = mlflow_runs(client)
    assert mlflow_history(client, run.info.run_id, "train/loss") == pytest.approx(losses)
    assert mlflow_history(client, run.info.run_id, "eval/ndcg_at_10") == pytest.approx(evals)
    assert run.data.metrics["final/ndcg_at_10"] == pytest.approx(wandb["summary"]["final/ndcg@10"])
    # The checkpoint names both runs, so a resumed run continues them.
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert (state["wandb_run_id"], state["mlflow_run_id"]) == (wandb["meta"]["id"], run.info.run_id)


def test_a_resumed_run_continues_the_tensorboard_folder_and_the_mlflow_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps the interrupted run logged after its checkpoint (3 and 4, checkpoint at 2) are logged
    again: TensorBoard shows the new values only; MLflow keeps both, in the same run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    out = tmp_path / "out"

    def run(steps: range, scale: float, resume_step: int | None = None, mlflow_id: str | None = None,
            **checkpoint: Any) -> RunLog:
        cfg = build_config({"output_dir": str(out), "data": {"train_files": ["pairs.jsonl"]}, "checkpoint": checkpoint,
                            "tracking": {"report_to": ["tensorboard", "mlflow"]}})
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, log_with=["tensorboard", "mlflow"], project_dir=str(out))
        log = RunLog(cfg, accelerator, resume_step=resume_step, mlflow_id=mlflow_id)
        for step in steps:
            log.log({"train/loss": step * scale}, step=step)
        log.summary({"final/ndcg@10": scale})
        log.finish()
        return log

    first = run(range(1, 5), 1.0)
    with caplog.at_level("INFO", logger="embedtune"):
        resumed = run(range(3, 6), 10.0, resume_step=2, mlflow_id=first.mlflow_id, resume_from="latest")
    assert resumed.mlflow_id == first.mlflow_id
    assert "changed since: checkpoint.resume_from" in caplog.text

    scalars = tensorboard_scalars(str(out / "embedtune"))
    assert scalars["train/loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}
    assert scalars["final/ndcg@10"] == {5: 10.0}  # the interrupted run's, at step 4, purged
    client = mlflow_client(out, monkeypatch)
    [mlrun] = mlflow_runs(client)
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "train/loss"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0), (4, 4.0), (4, 40.0), (5, 50.0)]
    assert mlrun.data.params["checkpoint.resume_from"] == "null"  # a param keeps its first value
    assert mlrun.info.status == "FINISHED"


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_is_written(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = [name for name in ("aim", "clearml", "dvclive", "comet_ml") if tracker_version(name) is None][:2]
    if len(missing) < 2:
        pytest.skip("two of aim, clearml, dvclive and comet_ml are installed here")
    assert tracker_version("tensorboard") and tracker_version("mlflow")
    args = run_args(tiny_model, tmp_path, f"[tensorboard,{missing[0]},mlflow,{missing[1]}]")
    assert train_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: tracking.report_to: {missing[0]}, {missing[1]} are not "
                                               "installed: pip install "), err
    assert not (tmp_path / "out").exists()

    # validate: a row per tracker, with its version or the line that installs it.
    report = tmp_path / "report.json"
    assert validate_main(args + ["--sample", "0", "--json", str(report)]) == 1
    rows = {c["check"]: c for c in json.loads(report.read_text())["checks"]}
    from importlib import metadata

    assert rows["tensorboard"]["status"] == "OK"
    assert rows["tensorboard"]["detail"].startswith(metadata.version("tensorboard") + "; writes to ")
    assert rows["mlflow"]["status"] == "OK" and mlflow_default_uri(str(tmp_path / "out")) in rows["mlflow"]["detail"]
    for name in missing:
        assert rows[name]["status"] == "FAIL" and "pip install" in rows[name]["detail"]
    assert rows["W&B"]["detail"] == "off (not in tracking.report_to)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("project", ["final_model", "checkpoints/tb"])
def test_tensorboard_may_not_write_into_a_folder_of_the_run(project: str) -> None:
    """final_model is replaced at the export and checkpoints pruned: event files there would go."""
    def config(*report_to: str) -> Any:
        return build_config({"data": {"train_files": ["pairs.jsonl"]},
                             "tracking": {"report_to": list(report_to), "project": project}})

    with pytest.raises(ConfigError, match=f"tracking.project={project}: TensorBoard writes to output_dir/<project>"):
        accelerate_trackers(config("wandb", "tensorboard"))
    assert accelerate_trackers(config("wandb", "mlflow")) == ["wandb", "mlflow"]  # only TensorBoard's folder
