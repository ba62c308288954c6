"""A plain `pip install .` carries what the quickstart needs: its config and its data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_the_wheel_ships_the_quickstart_config_data_and_entry_point(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = tmp_path.glob("embedtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"embedtune/configs/quickstart.yaml", "embedtune/resources/python_docs_qa.jsonl.gz",
            "embedtune/resources/README.md"} <= names
    # Every module of the source tree, in every subpackage (setup.cfg lists them by hand).
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "embedtune").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "embedtune = embedtune.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
