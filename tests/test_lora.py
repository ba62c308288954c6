"""LoRA (model.lora): only the adapters train and are checkpointed, a killed run resumes exactly,
2 processes train as 1, and the export loads in sentence-transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import args_for, assert_same_run, finish, kill_when, logged_steps, start

from embedtune.config import ConfigError, LoraSection
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.lora import add_adapters

LORA = ("model.lora.r=4", "model.lora.alpha=8", "tracking.report_to=none")


@pytest.fixture(scope="module")
def reference(models, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted LoRA run (dropout on), the one the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("lora_reference") / "out"
    finish(start(args_for(models["dropout"], data, out, *LORA)))
    return out


def test_only_the_adapters_train_and_checkpoints_hold_only_them(models, data, reference: Path) -> None:
    base = load_file(models["dropout"] / "model.safetensors")
    final = load_file(reference / "final_model" / "model.safetensors")  # merged: the adapters folded in
    assert final.keys() == base.keys()
    changed = {name for name in base if not torch.equal(base[name], final[name])}
    # BERT's usual LoRA targets: the query and value projections of every layer, weights only.
    assert changed == {f"encoder.layer.{i}.attention.self.{kind}.weight" for i in range(2) for kind in ("query", "value")}
    checkpoints = sorted((reference / "checkpoints").iterdir())
    assert checkpoints
    for folder in checkpoints:
        saved = load_file(folder / "model.safetensors")
        assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved), sorted(saved)[:4]
        assert sum(t.numel() for t in saved.values()) == 2 * 2 * 4 * (32 + 32)  # layers x targets x r x (in + out)
        assert (folder / "model.safetensors").stat().st_size < (models["dropout"] / "model.safetensors").stat().st_size / 20


def test_a_killed_lora_run_resumes_into_the_same_run(models, data, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = args_for(models["dropout"], data, out, *LORA)
    run = start(args)
    kill_when(run, lambda: logged_steps(out) >= 9)  # after the checkpoint of step 8
    run.wait()
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference)


def test_two_processes_train_the_adapters_as_one(models, data, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    # No dropout anywhere (each process would draw its own masks), the adapters' included.
    exact = (*LORA, "model.lora.dropout=0", "train.max_steps=6")
    finish(start(args_for(models["plain"], data, one, *exact)))
    finish(start(args_for(models["plain"], data, two, *exact), processes=2))
    # Another process count sums in another order: equal up to float rounding (see test_distributed).
    assert_same_run(two, one, atol=5e-5)


def test_a_target_that_is_not_there_is_refused_naming_the_key(tiny_model: Path) -> None:
    model, _ = EmbeddingModel.from_pretrained(str(tiny_model))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: .*named e.g. .*query"):
        add_adapters(model.encoder, LoraSection(target_modules=["q_proj"]))


def test_a_resume_with_other_lora_settings_is_refused(models, data, reference: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from embedtune.commands.train import main

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    args = args_for(models["dropout"], data, out, "model.lora.r=8", "tracking.report_to=none")
    assert main(args + ["--resume_from_checkpoint", "latest", "data.num_workers=0"]) == 1
    assert "model.lora: {'r': 4" in capsys.readouterr().err


def test_gradcache_gives_the_adapters_the_uncached_gradients(tokenizer_dir: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator
    from test_gradcache import batch_of, grads_of, tiny

    from embedtune.losses.ranking import MultipleNegativesRankingLoss
    from embedtune.training.step import GradCacheStep, plain_step

    accelerator = Accelerator(cpu=True)
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.2)))
    model.encoder = add_adapters(model.encoder, LoraSection(r=4, dropout=0.1))
    model.train()
    batch, loss_fn = batch_of(tokenizer, n=12), MultipleNegativesRankingLoss()
    torch.manual_seed(3)
    cached_loss = GradCacheStep(5)(model, batch, loss_fn, 1.0, accelerator)
    cached = grads_of(model)
    assert cached and all("lora_" in name for name in cached)  # nothing else gets a gradient
    model.eval()  # no dropout: the uncached step draws its masks in another order
    plain_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
    plain = grads_of(model)
    cached_loss = GradCacheStep(5)(model, batch, loss_fn, 1.0, accelerator)
    cached = grads_of(model)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_memory_benchmark_prints_its_figures(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "memory", "--layers", "1", "--batch", "2",
                           "--length", "16", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lora + checkpointing" in done.stdout and "peak MiB" in done.stdout
    rows = {row["case"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["full", "checkpointing", "lora", "lora + checkpointing"]
    assert rows["lora"]["trained"] < rows["full"]["trained"] / 100  # the embedding matrix alone dwarfs the adapters
    assert rows["lora"]["peak_mib"] < rows["full"]["peak_mib"]  # no gradients or AdamW state for frozen weights


def lift_gate(monkeypatch: pytest.MonkeyPatch, needs: str) -> None:
    """What transformers asks of peft before it reads an adapter folder."""
    from transformers.integrations import peft as transformers_peft

    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", needs)


def test_an_adapter_export_loads_in_sentence_transformers_as_the_merged_one(
        tokenizer_dir: Path, train_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import version

    from test_model_families import TEXTS, bert_folder, stack, theirs

    from embedtune.commands.train import main

    # transformers 5.24 asks for a peft newer than the newest published (0.21.2) before it reads an
    # adapter folder, though its loader works with this one: the gate is set to the installed peft.
    lift_gate(monkeypatch, version("peft"))
    base = bert_folder(tmp_path / "base", tokenizer_dir)  # CLS pooling, a Dense layer, Normalize, prompts
    finals = {}
    for export in ("merged", "adapter"):
        args = list(train_args)
        args[args.index("--base_model") + 1] = str(base)
        out = tmp_path / export
        args[args.index("--output_dir") + 1] = str(out)
        assert main(args + [*LORA, f"model.lora.export={export}", "train.max_steps=3"]) == 0
        finals[export] = out / "final_model"

    adapter, merged = finals["adapter"], finals["merged"]
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((base).resolve())
    assert (adapter / "adapter_model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size / 5
    assert stack(adapter) == stack(merged) == stack(base)
    embeddings = theirs(adapter, TEXTS)
    torch.testing.assert_close(embeddings, theirs(merged, TEXTS), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(embeddings, theirs(base, TEXTS), atol=1e-3)  # trained
    assert "adapters kept apart" in (adapter / "README.md").read_text()
    assert "adapters folded into the weights" in (merged / "README.md").read_text()


def test_an_adapter_export_that_would_not_load_stops_before_training(
        tiny_model: Path, train_args: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from embedtune.commands.train import main

    lift_gate(monkeypatch, "99.0")
    assert main(train_args + [*LORA, "model.lora.export=adapter"]) == 1
    err = capsys.readouterr().err
    assert "loads adapter folders only with peft>=99.0" in err and "set model.lora.export=merged" in err
    out = Path(train_args[train_args.index("--output_dir") + 1])
    assert not (out / "checkpoints").exists() and not (out / "final_model").exists()
