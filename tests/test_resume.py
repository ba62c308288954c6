"""Checkpoints and exact resume: real subprocesses, SIGKILL, shuffling and 2 workers, on the CPU.

A resumed run must train on exactly the global batches (by example id) of the run that was never
stopped, end with the same weights, and continue the same W&B run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port
from safetensors.torch import load_file
from wandb_reader import read_run, run_files


def args_for(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--input_jsonl", str(data), "--base_model", str(model), "--output_dir", str(out), "--batch_size", "8",
            "--learning_rate", "2e-3", "--epochs", "2", "data.negatives_field=negatives", "data.num_workers=2",
            "data.shuffle_buffer=16", "data.eval_fraction=0.1", "data.query_max_length=24",
            "data.document_max_length=32", "checkpoint.every_n_steps=4", "checkpoint.keep_last=2",
            "tracking.log_every_n_steps=1", "tracking.log_batch_ids=true", "eval.before=false",
            "train.mixed_precision=no", *extra]


def start(args: list[str], processes: int = 1, save_delay: float | None = None) -> subprocess.Popen:
    """The training program; with ``save_delay``, through embedtune.tools.slow_saves, whose save
    hook makes every checkpoint save pause that long."""
    program = [str(ROOT / "train.py")] if save_delay is None else ["-m", "embedtune.tools.slow_saves", str(save_delay)]
    command = [sys.executable, *program]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "launch" / "cpu_2proc.yaml"), "--num_processes", str(processes),
                   "--main_process_port", str(free_port()), *program]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # As when launched from a notebook that used W&B and has since stopped: the environment names a
    # W&B service that is gone. The run starts a service of its own (otherwise it could not log, and
    # a service that lives on would still hold a killed run's id when the run is resumed).
    full_env["WANDB_SERVICE"] = "3-1-unix-/nonexistent/wandb-service/socket"
    # Its own session, so a kill reaches the launcher and every training process, as when a
    # machine is preempted.
    return subprocess.Popen(command + args, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]


def logged_steps(out: Path) -> int:
    path = out / "training_metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: torchrun starts each rank in a session of its own, so a
    signal to the launcher's group would leave the ranks running."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True)
        kids = [int(x) for x in children.stdout.split()]
        found += kids
        todo += kids
    return found


def kill_when(proc: subprocess.Popen, ready, sig: int = signal.SIGKILL, timeout: float = 300) -> None:
    """Signal the launcher and every process under it, as when a machine is preempted."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
        assert time.time() < deadline, "timed out waiting to interrupt the run"
        time.sleep(0.005)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def batches(out: Path) -> list[tuple[int, list[str]]]:
    return [(row["step"], row["ids"]) for row in map(json.loads, (out / "batches.jsonl").read_text().splitlines())]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final_model" / "model.safetensors"))


def assert_same_run(resumed: Path, reference: Path, atol: float = 0.0) -> None:
    assert batches(resumed) == batches(reference)
    ref = weights(reference)
    for name, tensor in weights(resumed).items():
        torch.testing.assert_close(tensor, ref[name], rtol=0 if atol == 0 else 1e-4, atol=atol, msg=name)
    progress = json.loads((resumed / "training_progress.json").read_text())
    assert progress["completed"] and progress["examples_seen"] == json.loads(
        (reference / "training_progress.json").read_text())["examples_seen"]


@pytest.fixture(scope="module")
def reference(models: dict[str, Path], data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs, one per model."""
    runs = {}
    for name, model in models.items():
        out = tmp_path_factory.mktemp(f"reference_{name}") / "out"
        finish(start(args_for(model, data, out, "tracking.report_to=none")))
        runs[name] = out
    return runs


def test_killed_at_a_random_step_resumes_into_the_same_run(models, data, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = args_for(models["dropout"], data, out)
    total = len(batches(reference["dropout"]))
    kill_at = random.Random().randint(5, total - 6)
    run = start(args)
    kill_when(run, lambda: logged_steps(out) >= kill_at)
    run.wait()
    assert not (out / "final_model").exists()
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference["dropout"])

    # The resumed run continued the same W&B run: same id, and its steps carry on from the
    # checkpoint. (What the killed segment had not flushed is lost with it; the folder names
    # carry the run id either way.)
    files = run_files(str(out))
    assert len(files) == 2 and len({Path(f).parent.name.rsplit("-", 1)[1] for f in files}) == 1
    resumed = read_run(files[1])
    assert resumed["meta"]["id"] == Path(files[0]).parent.name.rsplit("-", 1)[1]
    steps = [row["_step"] for row in resumed["history"] if "train/loss" in row]
    assert steps == list(range(steps[0], total + 1)) and (steps[0] - 1) % 4 == 0 and steps[0] > 1
    # Retention: the last two checkpoints survive.
    assert len(list((out / "checkpoints").iterdir())) == 2


def test_killed_twice_still_gives_the_same_run(models, data, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = args_for(models["dropout"], data, out, "tracking.report_to=none")
    run = start(args)
    kill_when(run, lambda: logged_steps(out) >= 6)
    run.wait()
    run = start(args + ["--resume_from_checkpoint", "latest"])
    kill_when(run, lambda: logged_steps(out) >= 15)
    run.wait()
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference["dropout"])


def test_length_grouped_batches_resume_into_the_same_run(models, data, reference, tmp_path: Path) -> None:
    """Killed inside a window of length-grouped batches, the run rebuilds that window as it was."""
    extra = ("tracking.report_to=none", "data.group_by_length=5")
    grouped = tmp_path / "grouped"
    finish(start(args_for(models["dropout"], data, grouped, *extra)))
    plain = batches(reference["dropout"])
    assert batches(grouped) != plain
    assert sorted(i for _, ids in batches(grouped) for i in ids) == sorted(i for _, ids in plain for i in ids)
    out = tmp_path / "out"
    args = args_for(models["dropout"], data, out, *extra)
    run = start(args)
    kill_when(run, lambda: logged_steps(out) >= 10)  # checkpoints (every 4 steps) fall inside windows of 5
    run.wait()
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, grouped)


def test_killed_during_a_checkpoint_save_resumes_from_the_previous_one(models, data, reference,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = args_for(models["dropout"], data, out, "tracking.report_to=none")
    run = start(args, save_delay=1.5)
    half_written = out / "checkpoints" / "step-00000008.tmp"
    kill_when(run, lambda: (half_written / "model.safetensors").exists())
    run.wait()
    assert half_written.exists() and not (out / "checkpoints" / "step-00000008").exists()
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference["dropout"])
    assert not half_written.exists()


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resuming_on_another_number_of_processes(models, data, reference, tmp_path: Path,
                                                 before: int, after: int) -> None:
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none")
    run = start(args, processes=before)
    kill_when(run, lambda: logged_steps(out) >= 9)
    run.wait()
    resumed = start(args + ["--resume_from_checkpoint", "latest"], processes=after)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"changed since the checkpoint: processes: {before} -> {after}" in (out / "logs" / "train.log").read_text()
    assert json.loads((out / "training_progress.json").read_text())["processes"] == after
    # Another process count sums in another order: equal up to float rounding (see test_distributed).
    assert_same_run(out, reference["plain"], atol=5e-5)


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(models, data, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = args_for(models["dropout"], data, out, "tracking.report_to=none", "checkpoint.every_n_steps=1000")
    run = start(args)
    kill_when(run, lambda: logged_steps(out) >= 7, sig=signal.SIGTERM)
    signalled = time.time()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-3000:]
    assert time.time() - signalled < 60
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] is False
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{progress['step']:08d}"]
    assert "--resume_from_checkpoint latest" in err
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference["dropout"])


def test_a_change_that_breaks_resume_is_refused_and_a_safe_one_is_not(models, data, tmp_path: Path) -> None:
    from embedtune.commands.train import main

    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0", "train.max_steps=5")
    assert main(args) == 0
    refused = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--batch_size", "16", "train.seed=7",
                              "--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert refused.returncode == 1
    assert "train.batch_size: 8 -> 16" in refused.stderr and "train.seed: 42 -> 7" in refused.stderr
    assert main(args + ["tracking.log_every_n_steps=2", "train.max_steps=6", "--resume_from_checkpoint",
                        "latest"]) == 0
    assert json.loads((out / "training_progress.json").read_text())["step"] == 6


def test_a_checkpoint_that_predates_a_key_resumes_only_with_its_default(tmp_path: Path) -> None:
    from embedtune.config import Config
    from embedtune.training.resume_check import check_resume
    from embedtune.training.state import CheckpointError

    def config(**data: object) -> Config:
        return Config.model_validate({"data": {"train_files": [str(tmp_path / "a.jsonl")], **data}})

    saved = config().to_dict()
    del saved["data"]["group_by_length"]  # written before the key existed: that run never grouped
    assert check_resume(saved, config()) == []
    with pytest.raises(CheckpointError, match=r"data.group_by_length: None \(the checkpoint predates this key\) -> 4"):
        check_resume(saved, config(group_by_length=4))


def test_settings_that_decide_which_records_train_cannot_change_on_resume(tmp_path: Path) -> None:
    """With bad records skipped, a record that turns bad (or good) moves every position after it:
    a resume that changes what makes a record a training pair would continue another order."""
    from embedtune.config import Config
    from embedtune.data.index import PAIR_SETTINGS
    from embedtune.training.resume_check import RESUME_KEYS, check_resume
    from embedtune.training.state import CheckpointError

    def config(**data: object) -> Config:
        return Config.model_validate({"data": {"train_files": [str(tmp_path / "a.jsonl")], "on_bad_record": "skip",
                                               **data}})

    assert {f"data.{name}" for name in PAIR_SETTINGS} <= set(RESUME_KEYS)
    saved = config(negatives_field="negatives").to_dict()
    with pytest.raises(CheckpointError, match=r"data.scores_field: None -> 'scores'"):
        check_resume(saved, config(negatives_field="negatives", scores_field="scores"))
    with pytest.raises(CheckpointError, match=r"data.prompt_field: None -> 'instruction'"):
        check_resume(saved, config(negatives_field="negatives", prompt_field="instruction"))
    del saved["data"]["scores_field"]  # a checkpoint from before teacher scores ran without them
    assert check_resume(saved, config(negatives_field="negatives")) == []


def test_latest_without_checkpoints_is_explained(models, data, tmp_path: Path, capsys) -> None:
    from embedtune.commands.train import main

    args = args_for(models["plain"], data, tmp_path / "out", "tracking.report_to=none")
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 1
    assert "no complete checkpoint in" in capsys.readouterr().err


def test_a_failed_save_never_harms_the_previous_checkpoint(models, data, tmp_path: Path, monkeypatch, capsys) -> None:
    from accelerate import Accelerator

    from embedtune.commands.train import main
    from embedtune.training.checkpoint import complete_checkpoints

    real_save = Accelerator.save_state
    calls = {"n": 0}

    def disk_full_on_second_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_on_second_save)
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert [Path(p).name for p in complete_checkpoints(str(out))] == ["step-00000004"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert TrainerStateStep(out / "checkpoints" / "step-00000004") == 4

    calls["n"] = 0
    shutil_out = tmp_path / "carry_on"
    carry_on = args_for(models["plain"], data, shutil_out, "tracking.report_to=none", "data.num_workers=0",
                        "checkpoint.on_save_error=continue")
    assert main(carry_on) == 0
    assert (shutil_out / "final_model" / "model.safetensors").exists()
    assert "Training goes on" in capsys.readouterr().err


def TrainerStateStep(path: Path) -> int:
    from embedtune.training.state import TrainerState

    return TrainerState.load(str(path)).step


def test_best_checkpoint_is_kept_beside_the_last_ones(models, data, tmp_path: Path) -> None:
    from embedtune.commands.train import main
    from embedtune.training.checkpoint import complete_checkpoints
    from embedtune.training.state import TrainerState

    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0",
                    "checkpoint.every_n_steps=2", "checkpoint.keep_last=1", "checkpoint.best_metric=ndcg@10",
                    "--learning_rate", "5e-2")  # a rate this high makes later checkpoints worse
    assert main(args) == 0
    kept = complete_checkpoints(str(out))
    scores = TrainerState.load(kept[-1]).scores
    best = max(scores, key=scores.get)
    assert {Path(p).name for p in kept} == {best, Path(kept[-1]).name}


def test_repeated_non_finite_steps_stop_the_run_with_a_checkpoint(models, data, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    import embedtune.training.trainer as program
    from embedtune.commands.train import main as train_main

    class Poisoned(torch.nn.Module):
        needs = "pairs"

        def forward(self, batch):
            return (batch.queries * batch.positives).sum() * float("inf")

    monkeypatch.setattr(program, "build_loss", lambda *a, **k: Poisoned())
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0",
                    "train.max_nonfinite_steps=3")
    assert train_main(args) == 1
    assert "3 steps in a row had a non-finite gradient" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-00000003" / "trainer_state.json").exists()
    # The fix (here: a loss that is finite again) and a lower rate, then resume: the count of
    # non-finite steps starts again and the run finishes.
    monkeypatch.undo()
    assert train_main(args + ["--learning_rate", "1e-4", "train.max_steps=5", "--resume_from_checkpoint",
                              "latest"]) == 0
    assert "the count of non-finite steps in a row (3) starts again from 0" in (out / "logs" / "train.log").read_text()
    assert json.loads((out / "training_progress.json").read_text())["completed"]


def test_the_resume_benchmark_prints_its_figures() -> None:
    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "resume", "--examples", "3000",
                           "--batch_size", "64", "--workers", "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed 2,944 in:" in done.stdout and "re-tokenizing the skipped pairs would add" in done.stdout
