"""What a run leaves behind: W&B goes online only when a key is configured, and never prompts or
fails without one; ``training_metrics.jsonl`` is strict JSON to its last step, however the run ends."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_pairs, write_jsonl

import embedtune.training.trainer as program
from embedtune.commands.report import collect_series, read_metrics
from embedtune.commands.train import main as train_main

PROBE = "from embedtune.training.trackers import wandb_mode; print(wandb_mode())"


KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("env, netrc, expected", [
    ({}, None, "offline"),
    ({"WANDB_API_KEY": KEY}, None, "online"),
    ({}, f"machine api.wandb.ai\n  login user\n  password {KEY}\n", "online"),
    ({}, f"machine example.org\n  login user\n  password {KEY}\n", "offline"),
    ({"WANDB_API_KEY": KEY, "WANDB_MODE": "disabled"}, None, "disabled"),
])
def test_wandb_mode_follows_the_configured_key(tmp_path: Path, env: dict[str, str], netrc: str | None,
                                               expected: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    clean.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"), **env)
    if netrc:
        (tmp_path / ".netrc").write_text(netrc)
        (tmp_path / ".netrc").chmod(0o600)
    done = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == expected


def strict_rows(out: Path) -> list[dict[str, Any]]:
    """Every line of training_metrics.jsonl, read as strict JSON (NaN or Infinity is an error)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    lines = (out / "training_metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


class Poisoned(torch.nn.Module):
    """A loss that is infinite from the first step: every gradient is non-finite."""

    needs = "pairs"

    def forward(self, batch: Any) -> torch.Tensor:
        return (batch.queries * batch.positives).sum() * float("inf")


class StopsAt(torch.nn.Module):
    """A plain in-batch loss that sends this process SIGTERM during its ``step``-th call, as a
    scheduler stopping the job would."""

    needs = "pairs"

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        scores = batch.queries @ batch.positives.T * 20
        return torch.nn.functional.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


def run_args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(160))
    return ["--input_jsonl", str(data), "--base_model", str(model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "8", "data.num_workers=0", "data.query_max_length=24", "data.document_max_length=32",
            "tracking.report_to=none", "data.eval_fraction=0", *extra]


def test_non_finite_metrics_are_null_and_named_in_strict_json(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(program, "build_loss", lambda *a, **k: Poisoned())
    # Non-finite steps are skipped but never stop this run: it ends at step 5, a logging step or not.
    args = run_args(tiny_model, tmp_path, "train.max_steps=5", "tracking.log_every_n_steps=2",
                    "train.max_nonfinite_steps=100")
    assert train_main(args) == 0
    rows = [row for row in strict_rows(tmp_path / "out") if "loss" in row]  # not the mining round's line
    assert [row["step"] for row in rows] == [2, 4, 5]
    for row in rows:
        assert row["loss"] is None and row["grad_norm"] is None
        assert set(row["nonfinite"]) == {"loss", "grad_norm"}
        assert math.isfinite(row["lr"]) and row["skipped_steps"] == row["step"]
    # embedtune report reads the named nulls back as NaN: gaps in the loss line, not missing points.
    series = collect_series(read_metrics(str(tmp_path / "out"))[0])
    assert series["loss"][0] == [2, 4, 5] and all(math.isnan(v) for v in series["loss"][1])


@pytest.mark.parametrize("stop", ["non-finite", "signal"])
def test_the_step_a_run_stops_on_is_the_last_line_of_its_metrics(stop: str, tiny_model: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Stopped early, by non-finite steps or by a signal, a run still writes the metrics of the
    step it stopped on, although that step is not a logging step."""
    loss = Poisoned() if stop == "non-finite" else StopsAt(step=3)
    monkeypatch.setattr(program, "build_loss", lambda *a, **k: loss)
    args = run_args(tiny_model, tmp_path, "train.max_steps=12", "tracking.log_every_n_steps=5",
                    "train.max_nonfinite_steps=3")
    code = train_main(args)
    err = capsys.readouterr().err
    if stop == "non-finite":
        assert code == 1 and "3 steps in a row had a non-finite gradient" in err
    else:
        assert code == 0 and "SIGTERM received" in err
    out = tmp_path / "out"
    assert (out / "checkpoints" / "step-00000003" / "trainer_state.json").exists()
    rows = strict_rows(out)
    assert rows[0]["step"] == 0 and "negatives/per_pair" in rows[0]  # the mining round before step 1
    rows = rows[1:]
    assert [row["step"] for row in rows] == [3]
    assert (rows[-1]["loss"] is None) == (stop == "non-finite")
