"""Secrets: keys and tokens in the environment never reach a file the run writes, and credentials
in a data URL reach no channel of any command.

A real training run (``python train.py``, W&B offline) is started with fake keys planted in its
environment and, by mistake, on its command line; then it is resumed. Every byte of every file
under output_dir is searched for them: logs, config dumps, metrics, checkpoints (binary files
too), the exported model and its card, and W&B's own run files.

Credentials in URLs are followed through every command (train, validate, eval, mine): a URL that
cannot be read (the error path) and URLs that are read (a file in fsspec's in-memory filesystem
under a URL with a password, a local eval file whose name holds ``?token=``). Every command's
stdout and stderr, its --json report and every file it writes are searched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_pairs, write_jsonl
from wandb_reader import read_run, run_files
from yaml import safe_load

from embedtune.config import build_config
from embedtune.logs import setup_logging
from embedtune.secrets import REDACTED, command_line_holds_secret
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


# --- credentials in data URLs, through every command ------------------------------------------

PASSWORD = "url-passw0rd-6f1d9c3a"
TOKEN = "url-t0ken-2b8e4a7d"
URL_SECRETS = (PASSWORD, TOKEN)
UNREADABLE = f"https://reader:{PASSWORD}@127.0.0.1:9/pairs.jsonl?token={TOKEN}"  # port 9: nothing answers
# Run as `python RUNNER URL SOURCE embedtune-args...`: a file only this process can read, in fsspec's
# in-memory filesystem under a URL with a password, then the embedtune command.
RUNNER = """
import sys

import fsspec

from embedtune.cli import main

url, source, *argv = sys.argv[1:]
with fsspec.open(url, "wb") as f, open(source, "rb") as g:
    f.write(g.read())
sys.exit(main(argv))
"""


def embedtune(args: list[str], runner: list[str] | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """An embedtune command in its own process (``python -m embedtune``, or through ``runner``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra_env}
    command = [sys.executable, *(runner or ["-m", "embedtune"]), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def leaks(done: subprocess.CompletedProcess, root: Path) -> list[str]:
    """Where a URL's secret shows: the command's stdout or stderr, or a file under ``root`` (but
    the test's own inputs, in ``root/in``)."""
    found = [f"{name}: {secret}" for name, text in (("stdout", done.stdout), ("stderr", done.stderr))
             for secret in URL_SECRETS if secret in text]
    for path in files_under(root):
        if root / "in" in path.parents:
            continue
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {secret}" for secret in URL_SECRETS if secret.encode() in data]
    return found


@pytest.mark.parametrize("command", ["train", "train-usage", "train.py-usage", "validate", "eval", "mine"])
def test_an_unreadable_url_is_named_without_its_credentials(command: str, tiny_model: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "report.json"
    usage = ["--base_model", str(tiny_model), "--output_dir", str(out), UNREADABLE]
    args = {
        "train": ["train", "--input_jsonl", UNREADABLE, "--base_model", str(tiny_model), "--output_dir", str(out),
                  "data.num_workers=0"],
        # The URL given where a key=value goes: the config error quotes it, before any run starts.
        "train-usage": ["train", *usage],
        "train.py-usage": usage,  # the same through `python train.py` (`accelerate launch train.py`)
        "validate": ["validate", "--input_jsonl", UNREADABLE, "--base_model", str(tiny_model), "--output_dir",
                     str(out), "tracking.report_to=none", "--json", str(report)],
        "eval": ["eval", str(tiny_model), "--qa", UNREADABLE, "--json", str(report)],
        "mine": ["mine", "--model", str(tiny_model), "--input", UNREADABLE, "--output", str(out / "mined.jsonl")],
    }[command]
    done = embedtune(args, runner=[str(ROOT / "train.py")] if command == "train.py-usage" else None)
    assert done.returncode == (2 if command.endswith("usage") else 1), done.stderr[-3000:]
    assert not leaks(done, tmp_path), leaks(done, tmp_path)
    # The URL is still named, its credentials blanked out: on stderr, and in validate's table.
    shown = done.stdout if command == "validate" else done.stderr
    named = (f"https://{REDACTED}@127" if command.endswith("usage")  # read as a key=value: the key, up to a dot
             else f"https://{REDACTED}@127.0.0.1:9/pairs.jsonl?token={REDACTED}")
    assert named in shown, shown[-3000:]
    if command == "train":
        assert "error: https://" in done.stderr  # the error line itself, not only the log line
        assert f"https://{REDACTED}@127.0.0.1:9" in (out / "logs" / "train.log").read_text()
    if command == "validate":
        # In the config, the train files row and the data row that failed to read it (whose reader's
        # own message may name the URL once more).
        assert report.read_text().count(f"https://{REDACTED}@127.0.0.1:9/pairs.jsonl?token={REDACTED}") >= 3


def test_urls_with_credentials_that_are_read_reach_no_channel(tiny_model: Path, tmp_path: Path) -> None:
    """A run, validate, eval and mine on a URL with a password and an eval file named with a token."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = write_jsonl(inputs / "pairs.jsonl", make_pairs(80))
    held = write_jsonl(inputs / f"held?token={TOKEN}.jsonl", make_pairs(20, seed=1))
    url = f"memory://user:{PASSWORD}@host/train.jsonl"
    (inputs / "runner.py").write_text(RUNNER, encoding="utf-8")
    runner = [str(inputs / "runner.py"), url, str(source)]
    config = inputs / "run.yaml"
    config.write_text(f"data:\n  train_files: ['{url}']\n  eval_files: ['{held}']\n  num_workers: 0\n"
                      "  query_max_length: 24\n  document_max_length: 32\n", encoding="utf-8")
    out = tmp_path / "out"
    shown_url = f"memory://{REDACTED}@host/train.jsonl"

    train = embedtune(["train", "--config", str(config), "--base_model", str(tiny_model), "--output_dir", str(out),
                       "--batch_size", "8", "train.max_steps=4", "checkpoint.every_n_steps=2",
                       "tracking.log_every_n_steps=1", "eval.before=true", "eval.examples=3"], runner)
    assert train.returncode == 0, train.stderr[-3000:]
    validate = embedtune(["validate", "--config", str(config), "--base_model", str(tiny_model), "--output_dir",
                          str(tmp_path / "validate_out"), "--batch_size", "8", "--json",
                          str(tmp_path / "validate.json")], runner)
    assert validate.returncode == 0, validate.stdout[-3000:]
    evaluate = embedtune(["eval", str(out / "final_model"), "--qa", url, str(held), "--json",
                          str(tmp_path / "eval.json")], runner)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    mined = tmp_path / f"mined?token={TOKEN}.jsonl"
    mine = embedtune(["mine", "--model", str(out / "final_model"), "--input", url, "--output", str(mined)], runner)
    assert mine.returncode == 0, mine.stderr[-3000:]

    for done in (train, validate, evaluate, mine):
        assert not leaks(done, tmp_path), leaks(done, tmp_path)
    # Every channel was searched, and the URLs did reach it (scrubbed): the run's files...
    written = {str(p.relative_to(out)) for p in files_under(out)}
    for expected in ("logs/train.log", "config.yaml", "training_metrics.jsonl", "eval_examples.jsonl",
                     "final_model/README.md", "checkpoints/step-00000004/trainer_state.json"):
        assert expected in written, f"{expected} not written; the search would miss it"
    assert safe_load((out / "config.yaml").read_text())["data"]["train_files"] == [shown_url]
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["config"]["data"]["train_files"] == [shown_url]
    card = (out / "final_model" / "README.md").read_text()
    assert shown_url in card and f"held?token={REDACTED}" in card
    [run] = (read_run(file) for file in run_files(str(out)))
    assert run["config"]["data"]["train_files"] == [shown_url]
    assert any(name.endswith("files/output.log") for name in written)
    # ...the commands' tables, reports and summaries.
    assert f"held?token={REDACTED}" in validate.stdout and shown_url in validate.stdout
    assert shown_url in (tmp_path / "validate.json").read_text()
    assert json.loads((tmp_path / "eval.json").read_text())["queries"] == 100  # both files were read
    assert f"mined?token={REDACTED}" in mine.stdout
    assert mined.exists()  # the file itself has the name it was given


W_AND_B_CONSOLE = """
import os
import sys

from embedtune.logs import scrub_console

scrub_console()
import wandb  # noqa: E402  (after: W&B wraps the scrubbed console)

run = wandb.init(mode="offline", dir=sys.argv[1], project="embedtune-test")
print("stdout:", os.environ["PRINTED"])
print("stderr:", os.environ["PRINTED"], file=sys.stderr)
run.finish()
"""


def test_what_w_and_b_records_of_the_console_is_scrubbed(tmp_path: Path) -> None:
    """W&B records the console by wrapping the stream's write: it gets the scrubbed text."""
    script = tmp_path / "console.py"
    script.write_text(W_AND_B_CONSOLE, encoding="utf-8")
    # Printed from the environment: W&B would record a command line as it is (see tracking.py).
    done = embedtune([str(tmp_path)], runner=[str(script)], PRINTED=UNREADABLE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not leaks(done, tmp_path), leaks(done, tmp_path)
    [log] = tmp_path.glob("wandb/offline-run-*/files/output.log")
    text = log.read_text()
    assert f"stdout: https://{REDACTED}@127.0.0.1:9" in text and f"stderr: https://{REDACTED}@127.0.0.1:9" in text
