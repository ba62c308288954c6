"""The unpadded (packed) path gives the embeddings, losses and gradients of the padded path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from test_gradcache import batch_of, grads_of, tiny

from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.packing import Chunked, Padded
from embedtune.training.step import plain_step


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_packed_and_padded_give_the_same_loss_and_gradients(tokenizer_dir: Path, tmp_path: Path, accelerator,
                                                             pooling: str) -> None:
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)), pooling)
    model.layout_by_cost = False  # packed whenever packing is on
    batch, loss_fn = batch_of(tokenizer, n=16), MultipleNegativesRankingLoss(symmetric=True)
    assert batch.real_tokens < 0.9 * batch.computed_tokens  # there is padding to remove
    padded_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
    padded = grads_of(model)
    assert model.enable_packing(tokenizer)
    packed_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
    packed = grads_of(model)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed.keys() == padded.keys()
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunks", [2, 4])
def test_padded_chunks_give_the_loss_and_gradients_of_one_padded_block(tokenizer_dir: Path, tmp_path: Path,
                                                                       accelerator, chunks: int) -> None:
    from embedtune.model.packing import padded_tokens

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    model.train()
    model.layout_by_cost = False  # the chunks asked for, whatever the lengths
    batch, loss_fn = batch_of(tokenizer, n=64), MultipleNegativesRankingLoss(symmetric=True)
    whole_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
    whole = grads_of(model)
    model.padded_chunks = chunks
    inputs = model.prepare(batch.document, torch.device("cpu"))
    assert len(inputs.chunks) == chunks
    computed = sum(c.input_ids.numel() for c in inputs.chunks)
    lengths = batch.document.lengths
    assert computed == padded_tokens(lengths, chunks) < padded_tokens(lengths)  # less padding, counted right
    chunked_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
    chunked = grads_of(model)
    assert chunked_loss.item() == pytest.approx(whole_loss.item(), rel=1e-5)
    for name, grad in whole.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()  # evaluation sorts its own batches: no chunks
    assert not isinstance(model.prepare(batch.document, torch.device("cpu")), Chunked)


def test_a_model_that_fails_the_check_stays_padded_and_correct(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    inputs = tokenizer(["short", "a much longer text with many more words than the first"], padding=True,
                       return_tensors="pt")
    inputs = Padded(inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        before = model(inputs)
    assert not model.enable_packing(tokenizer, tolerance=-1.0)  # no architecture can pass this
    assert isinstance(model.prepare(inputs, torch.device("cpu")), Padded)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before)  # padding is still masked


def test_training_unpadded_or_padded_in_chunks_matches_training_padded(tokenizer_dir: Path, tmp_path: Path) -> None:
    import random

    from safetensors.torch import load_file

    from embedtune.commands.train import main

    base = tiny(tokenizer_dir, tmp_path / "base", dropout=0.0)
    rng = random.Random(3)
    records = [{**r, "answer": r["answer"] + " with more to say" * rng.randint(0, 6)} for r in make_pairs(120, seed=3)]
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    results = {}
    fixed = "model.layout_by_cost=false"
    for name, extra in (("packed", ["model.unpad=true", fixed]),
                        ("padded", ["model.unpad=false", "model.padded_chunks=1", fixed]),
                        ("chunked", ["model.unpad=false", "model.padded_chunks=2", fixed]),
                        ("by cost", ["model.unpad=true", "model.padded_chunks=2"])):
        out = tmp_path / f"out-{name}"
        assert main(["--input_jsonl", str(data), "--base_model", str(base), "--output_dir", str(out),
                     "--batch_size", "32", "--learning_rate", "1e-3", "data.num_workers=0", "train.max_steps=3",
                     "tracking.log_every_n_steps=1", "tracking.report_to=none", "eval.before=false",
                     "train.warmup_ratio=0", "train.hard_negatives=null", *extra]) == 0  # mining would
        # embed in each layout too, and a near tie could pick another negative
        rows = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
        results[name] = ([r["loss"] for r in rows if "loss" in r], [r["padding_efficiency"] for r in rows
                                                                    if "loss" in r],
                         load_file(out / "final_model" / "model.safetensors"))
        assert "embedtune" not in (out / "final_model" / "config.json").read_text()  # loads anywhere
    losses, efficiency, weights = results["padded"]
    assert all(e < 0.9 for e in efficiency)
    assert results["packed"][1] == [1.0] * 3
    assert all(c > e + 0.05 for c, e in zip(results["chunked"][1], efficiency))  # less padding computed
    for name in ("packed", "chunked", "by cost"):
        assert results[name][0] == pytest.approx(losses, rel=1e-5), name
        for key, tensor in weights.items():
            torch.testing.assert_close(results[name][2][key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_the_collator_gives_the_tokenizer_s_own_ids(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from embedtune.data.collate import PairCollator
    from embedtune.model.packing import pad_ragged

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    collate = PairCollator(tokenizer, 12, 40, query_prefix="query: ")
    assert collate.fast is not None  # the direct route is taken for this tokenizer
    texts = ["Ünïcödé and punctuation: fine?", "a longer question that will be cut at twelve tokens for sure ok", "x"]
    ragged = collate.queries(texts)
    expected = tokenizer(["query: " + t for t in texts], truncation=True, max_length=12, padding=True,
                         return_tensors="pt")
    padded = pad_ragged(ragged, tokenizer.pad_token_id)
    assert torch.equal(padded.input_ids, expected["input_ids"])
    assert torch.equal(padded.attention_mask, expected["attention_mask"])


def bench(tiny_model: Path, tmp_path: Path, name: str, *extra: str, max_length: int = 64) -> tuple[dict, str]:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "throughput", "--model", str(tiny_model),
                           "--batch_size", "16", "--max_length", str(max_length), "--steps", "2", "--workers", "1",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_the_throughput_benchmark_prints_its_figures_beside_the_sentence_transformers_trainer(
        tiny_model: Path, tmp_path: Path) -> None:
    result, printed = bench(tiny_model, tmp_path, "packed", "--compare", "--no-layout_by_cost")
    ours, theirs = result["embedtune"], result["sentence_transformers"]
    assert ours["packed"] and ours["padding_efficiency"] == 1.0
    assert ours["pairs_per_s"] > 0 and theirs["pairs_per_s"] > 0 and 0 < ours["mfu"] < 1
    assert result["speedup"] == pytest.approx(ours["pairs_per_s"] / theirs["pairs_per_s"])
    assert theirs["setup"] == "sdpa, 1 worker" and "(SentenceTransformerTrainer: sdpa, 1 worker)" in printed
    assert result["loader_ratio"] == pytest.approx(result["loader_pairs_per_s"] / ours["pairs_per_s"])
    assert 60 < result["workload"]["tokens_per_pair"] < 128  # real Q&A pairs, documents cut at 64 tokens
    for figure in ("pairs/s", "speedup:", "data loader alone:", "MFU against"):
        assert figure in printed


def test_the_sentence_transformers_side_is_tried_in_its_fast_setups_on_a_gpu() -> None:
    import argparse

    from embedtune.tools.throughput import add_arguments, st_setups

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    setups = st_setups(parser.parse_args(["--st_best"]))
    assert [s.name for s in setups][:2] == ["sdpa, 4 workers", "sdpa + torch_compile, 4 workers"]
    assert setups[1].compile and all(s.workers >= 4 for s in setups)
    assert [s.name for s in st_setups(parser.parse_args(["--no-st_best", "--st_workers", "2"]))] == ["sdpa, 2 workers"]


def test_the_workload_suite_compares_every_workload_and_names_the_worst(tiny_model: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "suite.json"
    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "throughput", "--model", str(tiny_model),
                           "--suite", "short", "negative", "--compare", "--steps", "1", "--workers", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    rows = {row["workload"]["name"]: row["result"] for row in summary["workloads"]}
    assert list(rows) == ["short", "negative"]
    short, negative = rows["short"], rows["negative"]
    assert short["workload"]["batch_size"] == negative["workload"]["batch_size"] == 32
    # The same pairs with one more document each: more tokens per pair, and both trainers took it.
    assert negative["workload"]["negatives"] == 1 and short["workload"]["negatives"] == 0
    assert negative["workload"]["tokens_per_pair"] > short["workload"]["tokens_per_pair"] + 20
    for result in rows.values():
        assert result["embedtune"]["pairs_per_s"] > 0 and result["sentence_transformers"]["pairs_per_s"] > 0
    worst = min(rows, key=lambda name: rows[name]["speedup"])
    assert summary["worst"] == {"name": worst, "speedup": rows[worst]["speedup"]}
    assert f"worst: {worst} at {rows[worst]['speedup']:.2f}x" in done.stdout
    assert "MNRL + 1 hard negative" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "embedtune", "bench", "throughput", "--suite", "nope"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode != 0 and "no such workload; the suite has short, medium" in bad.stderr


def test_length_grouping_raises_the_padding_efficiency_of_padded_training(tiny_model: Path, tmp_path: Path) -> None:
    padded, _ = bench(tiny_model, tmp_path, "padded", "--no-unpad", max_length=256)
    grouped, _ = bench(tiny_model, tmp_path, "grouped", "--no-unpad", "--group_by_length", "8", max_length=256)
    assert not padded["embedtune"]["packed"] and not grouped["embedtune"]["packed"]
    assert grouped["embedtune"]["padding_efficiency"] > padded["embedtune"]["padding_efficiency"] + 0.15


def test_the_gpu_benchmark_script_writes_every_figure_it_promises(tiny_model: Path, tmp_path: Path) -> None:
    """launch/gpu_bench.sh is the one prepared run for a GPU; here it runs end to end on the CPU
    with a tiny model, one workload and one timed step."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "launch" / "gpu_bench.sh"), str(out), str(tiny_model)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "STEPS": "1", "SUITE": "short",
                               "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    assert [row["workload"]["name"] for row in suite["workloads"]] == ["short"] and suite["worst"]["speedup"] > 0
    layouts = {name: json.loads((out / f"{name}.json").read_text())["embedtune"] for name in ("block", "chunks",
                                                                                             "grouped")}
    assert all(not figures["packed"] for figures in layouts.values())  # the padded layouts, as named
    assert layouts["block"]["padding_efficiency"] < layouts["grouped"]["padding_efficiency"]
    assert "aten::" in (out / "profile.txt").read_text()
