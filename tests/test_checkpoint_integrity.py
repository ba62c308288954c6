"""Nothing lost, nothing silent: checkpoints are verified before they are loaded, a failed save or
export leaves nothing half-written and says why, and ``final_model/`` is complete or absent.

Damage is done to real files on disk; disk-full failures are real write failures (RLIMIT_FSIZE in
a subprocess of the training program, with SIGXFSZ ignored, so a write past the limit fails with
EFBIG as on a full disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load, load_file
from test_resume import args_for
from test_untrusted import torch_pickle

from embedtune.commands.train import main
from embedtune.training import checkpoint
from embedtune.training.checkpoint import complete_checkpoints
from embedtune.training.integrity import MANIFEST, verify, write_manifest
from embedtune.training.state import CheckpointError, TrainerState

LEGACY = ROOT / "tests" / "fixtures" / "checkpoint_before_restructure"
QUICK = ("tracking.report_to=none", "data.num_workers=0", "train.max_steps=8")


@pytest.fixture(scope="module")
def finished(models: dict[str, Path], data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 8 steps: checkpoints at steps 4 and 8, and final_model."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(args_for(models["plain"], data, out, *QUICK)) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.fixture
def run(finished: Path, models: dict[str, Path], data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the finished run, and the arguments that continue it."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out, args_for(models["plain"], data, out, *QUICK)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The embedtune logger's warnings while a test calls the package directly."""
    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    logger, handler = logging.getLogger("embedtune"), Keep(logging.WARNING)
    # An earlier run's console handler writes to a stream an earlier test captured (and closed).
    for earlier in list(logger.handlers):
        logger.removeHandler(earlier)
    logger.addHandler(handler)
    yield found
    logger.removeHandler(handler)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step-{n:08d}"


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".old")))


# --- what a save writes --------------------------------------------------------------------------


def test_a_checkpoint_lists_every_file_with_its_size_and_hash(finished: Path) -> None:
    for path in complete_checkpoints(str(finished)):
        folder = Path(path)
        manifest = json.loads((folder / MANIFEST).read_text())
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
        assert sorted(manifest["files"]) == on_disk
        assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl",
                "trainer_state.json"} <= set(on_disk)
        assert manifest["hash"] == "sha256"
        for name, entry in manifest["files"].items():
            content = (folder / name).read_bytes()
            assert entry == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}, name
    assert leftovers(finished) == []


# --- damage: one clear line, and latest goes back to the newest intact checkpoint -----------------


def overwrite_middle(file: Path) -> None:
    """4 KiB of 0xff (NaN as float32) in the middle: the size stays, the safetensors header too."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    assert file.stat().st_size == size


def truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "overwritten weights": ("model.safetensors", overwrite_middle, "damaged: its contents differ from what was written"),
    "truncated weights": ("model.safetensors", truncate, "truncated: "),
    "deleted optimizer": ("optimizer.bin", os.remove, "missing (it was written with "),
    "deleted schedule": ("custom_checkpoint_0.pkl", os.remove, "missing (it was written with "),
    "truncated optimizer": ("optimizer.bin", truncate, "truncated: "),
    "truncated RNG state": ("random_states_0.pkl", truncate, "truncated: "),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_name_and_latest_takes_the_one_before(
        run, kind: str, capsys: pytest.CaptureFixture, warnings: list[str]) -> None:
    out, args = run
    name, damage, what = DAMAGE[kind]
    damage(step(out, 8) / name)
    expected = f"{step(out, 8) / name}: {what}"

    # latest: skipped with a warning naming it and why; the checkpoint before it is taken.
    assert checkpoint.find_checkpoint(str(out), "latest") == str(step(out, 4))
    assert any(w.startswith("skipping checkpoint step-00000008: ") and expected in w for w in warnings), warnings

    # Named: refused, in one line that names the file, says what is wrong and what to do.
    assert main(args + ["train.max_steps=12", "--resume_from_checkpoint", "step-00000008"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "could run code" not in err
    [line] = error_lines(err)
    assert expected in line and "resume from an earlier checkpoint" in line


def test_latest_resumes_past_damaged_weights_into_a_finished_run(run, capsys: pytest.CaptureFixture) -> None:
    """The damage that used to resume silently and export NaN weights."""
    out, args = run
    overwrite_middle(step(out, 8) / "model.safetensors")
    assert main(args + ["train.max_steps=12", "--resume_from_checkpoint", "latest"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint step-00000008: " in err and f"resumed from {step(out, 4)}: step 4" in err
    assert all(torch.isfinite(w).all() for w in load_file(out / "final_model" / "model.safetensors").values())
    # Steps 5 to 8 were trained again and saved over the damaged checkpoint, which now verifies.
    verify(str(step(out, 8)))
    assert TrainerState.load(str(step(out, 12))).step == 12


def test_latest_with_every_checkpoint_damaged_says_so_for_each(run, capsys: pytest.CaptureFixture) -> None:
    out, args = run
    truncate(step(out, 4) / "optimizer.bin")
    os.remove(step(out, 8) / "model.safetensors")
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "none of the 2 checkpoint(s)" in line
    assert f"{step(out, 4) / 'optimizer.bin'}: truncated" in line and f"{step(out, 8) / 'model.safetensors'}: missing" in line


def test_a_checkpoint_that_lost_its_manifest_or_gained_a_file_is_refused(run) -> None:
    out, _ = run
    (step(out, 4) / "pytorch_model.bin").write_bytes(b"added later")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not part of the checkpoint as it was written"):
        checkpoint.find_checkpoint(str(out), "step-00000004")
    os.remove(step(out, 8) / MANIFEST)
    with pytest.raises(CheckpointError, match=rf"{MANIFEST}: missing, though trainer_state.json was written"):
        checkpoint.find_checkpoint(str(out), "step-00000008")


def test_a_file_intact_by_the_manifest_but_not_plain_tensors_is_refused_as_code(run, tmp_path: Path) -> None:
    """Whoever can write the folder can write its manifest too: the weights-only check still stands."""
    out, _ = run
    marker = tmp_path / "code-ran"
    torch_pickle(step(out, 8) / "custom_checkpoint_0.pkl", marker)
    write_manifest(str(step(out, 8)))
    with pytest.raises(CheckpointError) as refused:
        checkpoint.find_checkpoint(str(out), "step-00000008")
    assert "custom_checkpoint_0.pkl: refused: it does not load as plain tensors and numbers" in str(refused.value)
    assert "could run code" in str(refused.value)
    assert checkpoint.find_checkpoint(str(out), "latest") == str(step(out, 4))
    assert not marker.exists()


# --- checkpoints written before manifests existed ------------------------------------------------


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    return run


def test_an_older_checkpoint_is_taken_with_a_warning_and_reads_its_new_fields_as_unknown(
        legacy: Path, warnings: list[str]) -> None:
    path = legacy / "out" / "checkpoints" / "step-00000002"
    verify(str(path))
    assert any("written before checkpoints had a manifest: its files cannot be verified" in w for w in warnings)
    state = TrainerState.load(str(path))
    assert state.data_files == {} and state.processes == 0


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_truncated_pickle_of_an_older_checkpoint_is_damaged_not_code(legacy: Path, name: str) -> None:
    path = legacy / "out" / "checkpoints" / "step-00000002"
    truncate(path / name)
    with pytest.raises(CheckpointError) as damaged:
        verify(str(path))
    assert f"{path / name}: damaged: it cannot be read" in str(damaged.value)
    assert "could run code" not in str(damaged.value)


@pytest.mark.parametrize("name, damage", [("model.safetensors", truncate), ("optimizer.bin", os.remove),
                                          ("custom_checkpoint_0.pkl", os.remove)])
def test_damage_an_older_checkpoint_cannot_show_before_loading_is_one_line(
        legacy: Path, name: str, damage, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    damage(legacy / "out" / "checkpoints" / "step-00000002" / name)
    monkeypatch.chdir(legacy)  # the checkpoint's config names its files relative to this folder
    args = (LEGACY / "args.txt").read_text().split()
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert "step-00000002: cannot be loaded (" in line and "resume from an earlier checkpoint" in line


@pytest.mark.parametrize("edit, expected", [
    ({"processes": -1}, "'processes' must be a count"),
    ({"processes": "2"}, "'processes' must be a count"),
    ({"data_files": ["pairs.jsonl"]}, "'data_files' must be a JSON object"),
])
def test_the_new_trainer_state_fields_are_checked(legacy: Path, edit: dict, expected: str) -> None:
    path = legacy / "out" / "checkpoints" / "step-00000002"
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, "processes": 2, "data_files": {"a": {}}}))
    assert TrainerState.load(str(path)).processes == 2
    (path / "trainer_state.json").write_text(json.dumps({**state, **edit}))
    with pytest.raises(CheckpointError, match=expected):
        TrainerState.load(str(path))


# --- saves that fail -----------------------------------------------------------------------------


def test_leftovers_of_unfinished_saves_are_removed_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step-00000004", "step-00000008.tmp", "step-00000004.old", "notes.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"x" * 100)
    assert checkpoint.remove_partial(str(tmp_path)) == ["step-00000004.old", "step-00000008.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.tmp", "step-00000004"]


def limited(max_bytes: int) -> Callable[[], None]:
    """For a child process: no file may grow past ``max_bytes``; a write past it fails with EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def train_limited(args: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=600, preexec_fn=limited(max_bytes), restore_signals=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_a_full_disk_during_a_save_leaves_nothing_and_says_how_much_space(run, capsys: pytest.CaptureFixture) -> None:
    out, args = run
    weights, optimizer = (step(out, 8) / "model.safetensors").stat().st_size, (step(out, 8) / "optimizer.bin").stat().st_size
    # The weights fit, the optimizer state (torch.save: RuntimeError, not OSError) does not.
    limit = (weights + optimizer) // 2
    resume = args + ["train.max_steps=16", "--resume_from_checkpoint", "latest"]

    stopped = train_limited(resume, limit)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    [line] = error_lines(stopped.stderr)
    assert f"could not write checkpoint {step(out, 12)}: " in line
    assert " free on its disk; a checkpoint needs about " in line and "(as step-00000008 does)" in line
    assert leftovers(out) == [] and [Path(p).name for p in complete_checkpoints(str(out))] == [
        "step-00000004", "step-00000008"]

    # checkpoint.on_save_error=continue: the failed saves are logged, the run finishes and exports.
    carried = train_limited(resume + ["checkpoint.on_save_error=continue"], limit)
    assert carried.returncode == 0, carried.stderr[-3000:]
    assert carried.stderr.count("Training goes on (checkpoint.on_save_error=continue)") == 2  # steps 12 and 16
    assert json.loads((out / "training_progress.json").read_text())["step"] == 16
    assert leftovers(out) == [] and len(complete_checkpoints(str(out))) == 2

    # With space again, a resume works (from step 8) and clears what a killed save left.
    stale = out / "checkpoints" / "step-00000010.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * weights)
    assert main(resume) == 0
    assert f"resumed from {step(out, 8)}: step 8" in capsys.readouterr().err
    assert leftovers(out) == []
    verify(str(step(out, 16)))


# --- export --------------------------------------------------------------------------------------


def model_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_failed_export_leaves_the_earlier_model_whole_and_says_where_to_resume(
        run, capsys: pytest.CaptureFixture) -> None:
    out, args = run
    final = out / "final_model"
    before = model_files(final)
    # Nothing as large as the weights can be written: the last save fails (and is let go), then the export.
    limit = (step(out, 8) / "model.safetensors").stat().st_size // 2
    failed = train_limited(args + ["checkpoint.on_save_error=continue", "--resume_from_checkpoint", "latest"], limit)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    [line] = error_lines(failed.stderr)
    assert f"could not write {final}: " in line and " free on its disk; " in line
    assert "the earlier final_model is untouched" in line
    assert f"the last checkpoint, {step(out, 8)}, is still there" in line and "--resume_from_checkpoint latest" in line
    assert model_files(final) == before
    assert leftovers(out) == []

    # As the message says: resume to export again. The new folder takes the old one's place whole.
    old_inode = final.stat().st_ino
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    assert f"saved {final}" in capsys.readouterr().err
    after = model_files(final)
    assert final.stat().st_ino != old_inode and after.keys() == before.keys()
    weights, earlier = load_file(final / "model.safetensors"), load(before["model.safetensors"])
    assert weights.keys() == earlier.keys() and all(torch.equal(weights[k], earlier[k]) for k in weights)
    card = (final / "README.md").read_text()
    assert json.dumps(str(final)) in card and "final_model.tmp" not in card
    assert leftovers(out) == []
