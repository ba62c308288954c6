"""Secrets: keys and tokens in the environment never reach a file the run writes.

A real training run (``python train.py``, W&B offline) is started with fake keys planted in its
environment and, by mistake, on its command line; then it is resumed. Every byte of every file
under output_dir is searched for them: logs, config dumps, metrics, checkpoints (binary files
too), the exported model and its card, and W&B's own run files.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_pairs, write_jsonl
from wandb_reader import read_run, run_files

from embedtune.config import build_config
from embedtune.logs import setup_logging
from embedtune.secrets import command_line_holds_secret
from embedtune.training.tracking import public_config

SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef0badcafe",
    "HF_TOKEN": "hf_plantedTokenValue4d7c1e9a0b2f3c5dAbCdE",
    "HUGGING_FACE_HUB_TOKEN": "hf_plantedHubToken8e2b4c6d1f3a5b7cDeF",
    "OPENAI_API_KEY": "sk-plantedOpenAiKey3b5d7f9a1c2e4",
    "DB_PASSWORD": "planted-db-password-6a8c0e2",
    "STORAGE_SECRET_ACCESS": "planted-storage-secret-9b1d3f5",
}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def secret_run(tiny_model: Path, tmp_path: Path) -> Path:
    records = make_pairs(80)
    records[5] = {"question": "a record without its answer"}  # so that rejected.jsonl is written
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out"
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(out), "--batch_size", "8",
            "data.num_workers=0", "data.query_max_length=24", "data.document_max_length=32",
            "data.on_bad_record=skip", "checkpoint.every_n_steps=2", "tracking.log_every_n_steps=1",
            "tracking.log_batch_ids=true", "eval.before=true", "data.eval_fraction=0.2"]
    env = {**os.environ, **SECRETS, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    # Secrets on the command line by mistake: a token as the run name, a password as a tag.
    first = [f"tracking.run_name={SECRETS['HF_TOKEN']}", f"tracking.tags=[{SECRETS['DB_PASSWORD']}, plain]",
             "train.max_steps=4"]
    # The resumed run changes the run name, so the resume logs the change (scrubbed).
    second = [f"tracking.run_name={SECRETS['OPENAI_API_KEY']}", "train.max_steps=6", "--resume_from_checkpoint",
              "latest"]
    for extra in (first, second):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *extra], env=env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        for value in SECRETS.values():
            assert value not in done.stdout + done.stderr  # the console (W&B records it as output.log)
    return out


def test_no_secret_reaches_any_file_of_a_run(secret_run: Path) -> None:
    out = secret_run
    written = {str(p.relative_to(out)) for p in files_under(out)}
    # Everything a run writes is there, so the search below covers it.
    for expected in ("logs/train.log", "config.yaml", "training_metrics.jsonl", "training_progress.json",
                     "rejected.jsonl", "batches.jsonl", "final_model/README.md", "final_model/model.safetensors",
                     "checkpoints/step-00000006/trainer_state.json", "checkpoints/step-00000006/optimizer.bin",
                     "checkpoints/step-00000006/random_states_0.pkl", "checkpoints/step-00000006/model.safetensors"):
        assert expected in written, f"{expected} not written; the search would miss it"
    runs = run_files(str(out))
    assert len(runs) == 2 and any(name.endswith("files/output.log") for name in written)
    assert any(name.endswith("logs/debug.log") for name in written)

    leaks = []
    for path in files_under(out):
        data = path.read_bytes()
        leaks += [f"{path.relative_to(out)}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    assert not leaks, f"secrets written to: {leaks}"

    # The planted values did reach the config, and left it redacted, in the files and in W&B.
    assert "run_name: <redacted>" in (out / "config.yaml").read_text()
    first, resumed = (read_run(file) for file in runs)
    assert first["meta"]["tags"] == ["<redacted>", "plain"]  # the resumed run was given no tags
    for run in (first, resumed):
        assert run["meta"]["name"] == "<redacted>" and run["config"]["tracking"]["run_name"] == "<redacted>"


def test_credentials_in_urls_and_environment_values_leave_the_config(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    cfg = build_config({"input_jsonl": ["https://user:pa55w0rd-in-url@example.org/train.jsonl",
                                        "https://example.org/more.jsonl?token=url-token-value&split=train"],
                        "tracking": {"tags": [f"made with {SECRETS['HF_TOKEN']}"]}})
    text = repr(public_config(cfg))
    assert "pa55w0rd-in-url" not in text and "url-token-value" not in text and SECRETS["HF_TOKEN"] not in text
    assert "example.org/train.jsonl" in text and "split=train" in text  # the rest stays readable
    assert cfg.data.train_files[0].endswith("pa55w0rd-in-url@example.org/train.jsonl")  # training still reads it


def test_every_log_line_is_scrubbed(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DB_PASSWORD", SECRETS["DB_PASSWORD"])
    setup_logging(str(tmp_path), is_main=True)
    try:
        logging.getLogger("embedtune.data").warning("could not open %s", f"postgres://u:{SECRETS['DB_PASSWORD']}@db")
        try:
            raise RuntimeError(f"connection refused with {SECRETS['DB_PASSWORD']}")
        except RuntimeError:
            logging.getLogger("embedtune").exception("failed")
    finally:
        for handler in list(logging.getLogger("embedtune").handlers):
            handler.close()
            logging.getLogger("embedtune").removeHandler(handler)
    written = (tmp_path / "logs" / "train.log").read_text() + capsys.readouterr().err
    assert SECRETS["DB_PASSWORD"] not in written and written.count("<redacted>") >= 4


def test_a_secret_on_the_command_line_is_noticed(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", "out", "tracking.run_name=plain"])
    assert not command_line_holds_secret()
    monkeypatch.setattr(sys, "argv", ["train.py", f"tracking.run_name={SECRETS['HF_TOKEN']}"])
    assert command_line_holds_secret()
    monkeypatch.setattr(sys, "argv", ["train.py", "--input_jsonl", "s3://key:secret-in-url@bucket/x.jsonl"])
    assert command_line_holds_secret()
