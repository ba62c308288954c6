"""The fault soak, short: a 2-process CPU run interrupted a few times, resumed each time, equals the reference.

The runs are slow (one to two minutes each on 2 cores), so outside the default run: ``python -m
pytest -m slow tests/test_soak.py``. The full soak is ``embedtune soak --cycles 20``.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from embedtune.tools.soak import KINDS, main, overwrite_middle, parse_faults, schedule

PASSED = "passed: the same batches, every example once per epoch, the same weights; every fault ended as it must"


def run_soak(out: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "embedtune.tools.soak", "--out", str(out), "--keep", *args],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^largest weight diff: 0 over \d+ tensors", done.stdout, re.M)
    assert PASSED in done.stdout
    return done.stdout


@pytest.mark.slow
def test_a_run_killed_three_times_ends_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """Seed 1 draws the three SIGKILL moments (at a step, in a save, at a random time); the next
    test forces the other faults, so that the two together cover every kind."""
    out = run_soak(tmp_path / "soak", "--cycles", "3", "--seed", "1")
    assert re.search(r"^kills: +3 \(1 save, 1 step, 1 time\)", out, re.M)
    assert len(list((tmp_path / "soak" / "logs").glob("cycle-*.log"))) == 3


@pytest.mark.slow
def test_every_fault_once_ends_as_it_must_and_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """A SIGTERM storm, a damaged checkpoint (the next start skips it), a full disk during a save
    (that start resumes past the damaged one), and a second run on the busy folder."""
    out = run_soak(tmp_path / "soak", "--cycles", "4", "--seed", "1", "--faults", "storm,damage,disk,second")
    assert re.search(r"^kills: +2 \(1 damage, 1 second\)", out, re.M)
    assert re.search(r"^SIGTERM storms: +1 ", out, re.M)
    assert re.search(r"^full disks: +1 ", out, re.M)
    assert re.search(r"^damaged checkpoints: 1, 1 skipped by name", out, re.M)
    assert re.search(r"^second runs refused: 1 ", out, re.M)
    logs = tmp_path / "soak" / "logs"
    assert "Traceback" not in (logs / "cycle-01.log").read_text()  # the storm's launcher exits 0 without one
    assert "skipping checkpoint step-" in (logs / "cycle-03.log").read_text()
    assert " is in use by another run (PID " in (logs / "second-04.log").read_text()


def test_the_faults_option_orders_the_first_cycles_and_refuses_unknown_kinds(capsys) -> None:
    assert parse_faults("storm, disk", 3) == ["storm", "disk"]
    kinds = schedule(5, ["second"], random.Random(0))
    assert kinds[0] == "second" and len(kinds) == 5 and set(kinds) <= set(KINDS)
    with pytest.raises(SystemExit):
        main(["--cycles", "2", "--faults", "storm,flood"])
    assert "unknown kind(s) flood" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cycles", "1", "--faults", "storm,disk"])
    assert "names 2 kinds for 1 cycle(s)" in capsys.readouterr().err


def test_damage_changes_bytes_in_the_middle_and_keeps_the_size(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    original = bytes(range(256)) * 256
    file.write_bytes(original)
    offset, length = overwrite_middle(file, random.Random(0))
    damaged = file.read_bytes()
    assert len(damaged) == len(original) and 2048 <= length <= 8192
    changed = [i for i, (a, b) in enumerate(zip(original, damaged)) if a != b]
    assert changed == list(range(offset, offset + length))
    assert len(original) // 4 < offset < len(original) * 3 // 4


def test_the_soak_refuses_a_folder_in_use(tmp_path: Path, capsys) -> None:
    (tmp_path / "something").write_text("x")
    assert main(["--cycles", "1", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
