"""W&B goes online only when a key is configured, and never prompts or fails without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = "from embedtune.training.tracking import wandb_mode; print(wandb_mode())"


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
