"""export.merge_with_base: the final weights moved back toward the base model's, by a given share
or the one the held-out set chooses, full fine-tuning and LoRA alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from safetensors.torch import load_file

from embedtune.commands.train import main
from embedtune.training.merge import AUTO_SHARES, choose_share

LORA = ("model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final_model" / "model.safetensors")


@pytest.mark.parametrize("lora", [False, True])
def test_a_share_interpolates_every_trained_weight(train_args: list[str], tiny_model: Path, tmp_path: Path,
                                                   lora: bool) -> None:
    extra = [*(LORA if lora else ()), "tracking.report_to=none", "train.max_steps=3"]
    outs = {}
    for name, merge in (("as_trained", []), ("half", ["export.merge_with_base=0.5"])):
        args = list(train_args)
        outs[name] = tmp_path / name
        args[args.index("--output_dir") + 1] = str(outs[name])
        assert main(args + extra + merge) == 0
    base, tuned, half = load_file(tiny_model / "model.safetensors"), final_weights(outs["as_trained"]), \
        final_weights(outs["half"])
    changed = [n for n in tuned if n in base and not torch.equal(tuned[n], base[n])]
    assert changed
    for name in tuned:
        expected = base[name] + 0.5 * (tuned[name] - base[name]) if name in base else tuned[name]
        torch.testing.assert_close(half[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    progress = json.loads((outs["half"] / "training_progress.json").read_text())
    assert progress["merge"]["share"] == 0.5
    card = (outs["half"] / "final_model" / "README.md").read_text()
    assert "Merged with the base model:** 0.5 of the fine-tuned weights" in card


def test_auto_chooses_on_the_held_out_set_within_the_general_sets_floor(train_args: list[str],
                                                                         tmp_path: Path) -> None:
    general = write_jsonl(tmp_path / "general.jsonl", make_pairs(40, seed=9))
    out = Path(train_args[train_args.index("--output_dir") + 1])
    assert main(train_args + ["tracking.report_to=none", "export.merge_with_base=auto",
                              f"eval.general_files=[{general}]"]) == 0
    progress = json.loads((out / "training_progress.json").read_text())
    merge = progress["merge"]
    held_out = {float(s): v for s, v in merge["held_out"].items()}
    general_figures = {float(s): v for s, v in merge["general"].items()}
    assert sorted(held_out) == sorted(general_figures) == [0.0, *AUTO_SHARES]
    assert merge["share"] == choose_share(held_out, general_figures, 0.01)
    # The final model is the chosen merge: the held-out figure after training is that share's.
    assert progress["eval_after"]["ndcg@10"] == pytest.approx(held_out[merge["share"]], abs=1e-6)
    assert progress["general"]["after"] == pytest.approx(general_figures[merge["share"]], abs=1e-6)
    assert progress["general"]["before"] == pytest.approx(general_figures[0.0], abs=1e-6)
    assert "chosen on held-out ndcg@10" in (out / "final_model" / "README.md").read_text()


def test_choose_share_takes_the_best_held_out_share_that_keeps_the_floor() -> None:
    held_out = {0.0: 0.5, 0.25: 0.6, 0.5: 0.7, 0.75: 0.8, 1.0: 0.8}
    assert choose_share(held_out, {}, 0.01) == 1.0  # equal figures: the larger share
    general = {0.0: 0.9, 0.25: 0.9, 0.5: 0.895, 0.75: 0.85, 1.0: 0.8}
    assert choose_share(held_out, general, 0.01) == 0.5
    assert choose_share(held_out, {**general, 0.25: 0.5, 0.5: 0.5}, 0.01) == 0.0  # none keeps it: the base


def test_auto_without_a_held_out_set_is_one_line(train_args: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(train_args + ["data.eval_fraction=0", "export.merge_with_base=auto"]) == 2
    err = capsys.readouterr().err
    assert "export.merge_with_base: auto chooses the share on the held-out set, and there is none" in err
