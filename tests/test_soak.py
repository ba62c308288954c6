"""The kill soak, short: a 2-process CPU run killed 3 times, resumed each time, equals the reference.

Slow (about a minute and a half on 2 cores), so outside the default run: ``python -m pytest -m slow
tests/test_soak.py``. The full soak is ``embedtune soak --cycles 20``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_a_run_killed_three_times_ends_as_the_uninterrupted_one(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "embedtune.tools.soak", "--cycles", "3", "--seed", "5", "--out",
                           str(tmp_path / "soak"), "--keep"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^kills: +3 \(", done.stdout, re.M)
    assert re.search(r"^largest weight diff: 0 over \d+ tensors", done.stdout, re.M)
    assert "passed: the same batches, every example once per epoch, the same weights" in done.stdout
    assert len(list((tmp_path / "soak" / "logs").glob("cycle-*.log"))) == 3


def test_the_soak_refuses_a_folder_in_use(tmp_path: Path, capsys) -> None:
    from embedtune.tools.soak import main

    (tmp_path / "something").write_text("x")
    assert main(["--cycles", "1", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
