"""W&B goes online only when a key is configured, and never prompts or fails without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = "from embedtune.tracking import wandb_mode; print(wandb_mode())"


@pytest.mark.parametrize("env, expected", [
    ({}, "offline"),
    ({"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567"}, "online"),
    ({"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_MODE": "disabled"}, "disabled"),
])
def test_wandb_mode_follows_the_configured_key(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    clean.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"), **env)
    done = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == expected
