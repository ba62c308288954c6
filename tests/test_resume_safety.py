"""What a resume may and may not change, and what a run may share: changed data is refused (or
allowed and logged), a new learning rate or weight decay really applies, one run per output
folder, and the run's own settings are checked before its first step."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from test_resume import args_for, logged_steps, start

from embedtune.commands.train import main
from embedtune.config import parse_args
from embedtune.training.lock import LOCK_FILE
from embedtune.training.trainer import Trainer

QUICK = ("tracking.report_to=none", "data.num_workers=0", "train.max_steps=4", "checkpoint.every_n_steps=2")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]


def train_log(out: Path) -> str:
    return (out / "logs" / "train.log").read_text()


# --- the data a run reads -----------------------------------------------------------------------


@pytest.mark.parametrize("change, order", [("append", "stream"), ("reorder", "stream"), ("reorder", "indexed")])
def test_a_resume_on_changed_data_is_refused_naming_the_file(models, tmp_path: Path, change: str, order: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(150, seed=3))
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, *QUICK, f"data.order={order}")
    assert main(args) == 0
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines + lines[:5] if change == "append" else lines[::-1]))
    resume = [*args, "train.max_steps=6", "--resume_from_checkpoint", "latest"]
    assert main(resume) == 1
    err = capsys.readouterr().err
    assert "cannot resume: the data changed since the checkpoint" in err and str(data) in err
    assert ("bytes at the checkpoint" if change == "append" else "same size, other contents") in err
    assert "checkpoint.allow_data_change=true" in err
    assert main([*resume, "checkpoint.allow_data_change=true"]) == 0
    assert "data changed since the checkpoint (checkpoint.allow_data_change=true)" in train_log(out)
    assert json.loads((out / "training_progress.json").read_text())["step"] == 6


def test_indexed_data_is_described_by_samples_and_an_older_checkpoint_the_way_it_was(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """With data.order=indexed a file is hashed by 16 blocks of 64 KiB whatever its size (no pass
    over all the data before step 1); a checkpoint that hashed it whole is compared the same way."""
    from embedtune.data import identity

    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(20_000, seed=3))
    assert data.stat().st_size > 2 << 20
    cfg = parse_args(["--input_jsonl", str(data), "data.order=indexed"]).data
    read = []
    real_open = open
    monkeypatch.setattr(identity, "open", lambda *a, **k: read.append(a[0]) or real_open(*a, **k), raising=False)
    sampled = identity.data_identity(cfg)[str(data)]
    assert sampled["sample"] == [16, 64 << 10] and read == [str(data)]
    whole = identity.describe_file(str(data))  # as a stream run, or an older indexed one, saved it
    assert "sample" not in whole and whole["hash"] != sampled["hash"]
    assert identity.data_identity(cfg, like={str(data): whole}) == {str(data): whole}
    # A change inside a sampled block is seen, by both descriptions.
    text = data.read_bytes()
    data.write_bytes(text[:100] + text[100:200][::-1] + text[200:])
    assert identity.data_identity(cfg)[str(data)]["hash"] != sampled["hash"]
    assert identity.data_identity(cfg, like={str(data): whole})[str(data)]["hash"] != whole["hash"]


def test_a_file_touched_but_not_changed_resumes(models, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(150, seed=3))
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, *QUICK)
    assert main(args) == 0
    os.utime(data, ns=(0, 10**18))
    assert main([*args, "train.max_steps=6", "--resume_from_checkpoint", "latest"]) == 0
    assert "modified time changed, contents sampled the same" in train_log(out)


# --- settings that a resume changes apply -------------------------------------------------------


def test_a_lower_learning_rate_on_resume_is_the_one_the_steps_use(models, data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, *QUICK, "train.scheduler=constant", "train.warmup_ratio=0",
                    "tracking.log_every_n_steps=1")
    assert main(args) == 0
    assert main([*args, "--learning_rate", "1e-4", "train.weight_decay=0.3", "train.max_steps=6",
                 "--resume_from_checkpoint", "latest"]) == 0
    rates = {m["step"]: m["lr"] for m in metrics(out) if "lr" in m}
    assert rates[4] == pytest.approx(2e-3) and rates[5] == pytest.approx(1e-4) and rates[6] == pytest.approx(1e-4)

    cfg = parse_args([*args, "--learning_rate", "5e-5", "train.weight_decay=0.2", "train.max_steps=8",
                        "--resume_from_checkpoint", "latest"])
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        decayed, plain = trainer.optimizer.param_groups
        assert decayed["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
        assert decayed["lr"] == plain["lr"] == pytest.approx(5e-5)
        assert trainer.scheduler.get_last_lr() == pytest.approx([5e-5, 5e-5])
    finally:
        trainer.lock.release()


# --- one run per output folder ------------------------------------------------------------------


def test_a_second_run_on_a_busy_output_dir_is_refused(models, data, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    first = start(args_for(models["plain"], data, out, "tracking.report_to=none"))
    try:
        while logged_steps(out) < 1:
            assert first.poll() is None, first.stderr.read()[-3000:]
        log_before = train_log(out)
        assert main(args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0")) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (PID {first.pid} on {socket.gethostname()}" in err
        assert "give this run another output_dir" in err and err.count("\n") == 1
        assert train_log(out).startswith(log_before)  # nothing of the second run in the first one's log
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert (out / "final_model" / "model.safetensors").exists()
    assert (out / LOCK_FILE).read_text() == ""  # released at the end


def test_a_lock_left_by_a_dead_run_is_taken_over(tiny_model: Path, train_args: list[str], tmp_path: Path) -> None:
    out = Path(train_args[train_args.index("--output_dir") + 1])
    out.mkdir(parents=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "since": 0}))
    assert main([*train_args, "tracking.report_to=none", "train.max_steps=1"]) == 0
    assert "took over the output folder's lock from a run that ended without releasing it (PID 4242 on node-7" \
        in train_log(out)


# --- settings checked before step 1 -------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_one_line(train_args: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    taken = tmp_path / "taken"
    taken.write_text("notes")
    args = list(train_args)
    args[args.index("--output_dir") + 1] = str(taken)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"output_dir {taken} is a file, not a folder" in err and err.count("\n") == 1
    assert taken.read_text() == "notes"


def test_lengths_past_the_models_positions_are_cut_to_them(train_args: list[str], tmp_path: Path) -> None:
    records = make_pairs(60)
    for record in records[::3]:
        record["answer"] = "a long answer about rivers " * 80  # about 400 tokens
    data = write_jsonl(tmp_path / "long.jsonl", records)
    args = list(train_args)
    args[args.index("--input_jsonl") + 1] = str(data)
    out = Path(args[args.index("--output_dir") + 1])
    # The tiny model has 256 positions.
    assert main([*args, "data.document_max_length=400", "tracking.report_to=none", "train.max_steps=2"]) == 0
    assert "data.document_max_length=400 is more than the 256 positions" in train_log(out)
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out / "final_model"), device="cpu").max_seq_length == 256


def test_a_bad_record_mid_run_stops_with_a_checkpoint_to_resume_from(models, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    import embedtune.data.split

    monkeypatch.setattr(embedtune.data.split, "PREFLIGHT_RECORDS", 50)  # as a record past the 1,000th
    records: list = make_pairs(150, seed=3)
    records[120] = "{not json"
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0",
                    "data.shuffle=false", "checkpoint.every_n_steps=100", "--epochs", "1",
                    # Mined in-batch negatives regroup 64 batches at a time: the record would be met before step 1.
                    "train.hard_negatives=null")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{data}, line 121: not valid JSON" in err
    [saved] = list((out / "checkpoints").iterdir())
    step = int(saved.name.removeprefix("step-"))
    assert step >= 12 and f"The run stopped with a checkpoint of step {step}" in err
    assert "data.on_bad_record=skip" in err
    assert main([*args, "data.on_bad_record=skip", "--resume_from_checkpoint", "latest"]) == 0
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] and progress["step"] > step


# --- the best checkpoint as the final model -----------------------------------------------------


def test_the_best_checkpoint_becomes_the_final_model_and_patience_stops_the_run(
        models, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    # The held-out scores a run would see, scripted by step: best at step 4, then two evaluations
    # without improvement.
    scores = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.6, 10: 0.95}
    monkeypatch.setattr(Trainer, "evaluate", lambda self, step: {"ndcg@10": scores.get(step, 0.1)})
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "data.num_workers=0",
                    "train.max_steps=12", "checkpoint.every_n_steps=2", "checkpoint.best_metric=ndcg@10",
                    "train.early_stopping_patience=2")
    assert main(args) == 0
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["step"] == 8 and progress["stopped_early"] and progress["final_step"] == 4
    assert "stopping early at step 8: ndcg@10 has not improved over the last 2 evaluations" in train_log(out)
    best = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    last = load_file(out / "checkpoints" / "step-00000008" / "model.safetensors")
    final = load_file(out / "final_model" / "model.safetensors")
    assert final.keys() == {k.removeprefix("encoder.") for k in best if k.startswith("encoder.")}
    for name, tensor in best.items():
        if name.startswith("encoder."):
            assert torch.equal(final[name.removeprefix("encoder.")], tensor), name
    assert any(not torch.equal(best[n], last[n]) for n in best)
    assert "the best by held-out ndcg@10, step 4 of 8" in (out / "final_model" / "README.md").read_text()


def test_early_stopping_needs_the_metric_it_watches(train_args: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main([*train_args, "train.early_stopping_patience=3"]) == 2
    assert "train.early_stopping_patience watches checkpoint.best_metric" in capsys.readouterr().err
