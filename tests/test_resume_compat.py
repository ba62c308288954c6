"""Checkpoints written by earlier versions resume into the same run: one from before the package
was restructured, and one of the first indexed order (before checkpoints recorded its version)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize("fixture", ["checkpoint_before_restructure", "checkpoint_indexed_order_1"])
def test_a_checkpoint_of_an_earlier_version_resumes_into_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      fixture: str) -> None:
    from embedtune.commands.train import main

    run = tmp_path / "run"
    saved = FIXTURES / fixture
    shutil.copytree(saved, run)
    monkeypatch.chdir(run)  # the checkpoint's config names its files relative to this folder
    args = (saved / "args.txt").read_text().split()
    assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    resumed = [json.loads(line) for line in (run / "out" / "batches.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (saved / "uninterrupted_batches.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed] == [3, 4] and resumed == expected[2:]
    final = load_file(run / "out" / "final_model" / "model.safetensors")
    reference = load_file(saved / "uninterrupted_final_model.safetensors")
    assert final.keys() == reference.keys()
    moved = load_file(saved / "out" / "checkpoints" / "step-00000002" / "model.safetensors")
    for name, weight in reference.items():
        torch.testing.assert_close(final[name], weight, rtol=0, atol=1e-6, msg=name)
    # The steps after the checkpoint really trained: the weights are not those of step 2.
    assert any(not torch.equal(moved[f"encoder.{name}"], weight) for name, weight in reference.items()
               if f"encoder.{name}" in moved)


def test_a_checkpoint_of_a_newer_indexed_order_is_refused_in_one_line(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from embedtune.commands.train import main
    from embedtune.data.index import INDEXED_ORDER
    from embedtune.training.integrity import write_manifest

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "checkpoint_indexed_order_1", run)
    step = run / "out" / "checkpoints" / "step-00000002"
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps({**state, "indexed_order": INDEXED_ORDER + 1}))
    write_manifest(str(step))
    monkeypatch.chdir(run)
    args = (run / "args.txt").read_text().split()
    assert main(args + ["--resume_from_checkpoint", str(step)]) == 1
    assert (f"its data order is version {INDEXED_ORDER + 1}, newer than this embedtune's ({INDEXED_ORDER}); resume "
            "it with the embedtune that wrote it") in capsys.readouterr().err
