"""Every launch config is one Accelerate itself accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_config_parses_with_accelerate(path: Path) -> None:
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "fp16", "bf16")


def test_slurm_script_is_valid_bash() -> None:
    import subprocess

    done = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm_multinode.sbatch")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
