"""N processes train exactly like one process with the same global batch (gloo, CPU, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, make_pairs, untokenized, write_jsonl
from safetensors.torch import load_file
from wandb_reader import read_run, run_files

from embedtune.config import DataConfig
from embedtune.data.stream import PairBatches, make_loader


@pytest.fixture(scope="module")
def tiny_model_no_dropout(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Without dropout the forward pass is deterministic, so any split of the batch must agree."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_training(processes: int, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(ROOT / "train.py")]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "launch" / "cpu_2proc.yaml"), "--num_processes", str(processes),
                   "--main_process_port", str(free_port()), str(ROOT / "train.py")]
    done = subprocess.run(command + args + ["--output_dir", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in rows if "loss" in r], "grad_norms": [r["grad_norm"] for r in rows if "loss" in r],
            "masked": [r["masked_false_negatives"] for r in rows if "masked_false_negatives" in r],
            "padding_efficiency": [r["padding_efficiency"] for r in rows if "loss" in r],
            "progress": json.loads((out / "training_progress.json").read_text()),
            "weights": load_file(str(out / "final_model" / "model.safetensors"))}


@pytest.mark.parametrize("loss, accumulation", [("MultipleNegativesRankingLoss", 1),
                                                 ("MultipleNegativesRankingLoss", 2),
                                                 ("CachedMultipleNegativesRankingLoss", 1)])
def test_two_processes_give_the_losses_and_weights_of_one(tiny_model_no_dropout: Path, tmp_path: Path,
                                                          loss: str, accumulation: int) -> None:
    # 27 pairs with hard negatives at batch 8: three full steps, then a partial step of 3 pairs
    # that the two processes split 2 + 1 (the share weighting must keep the gradient exact).
    # The one-process reference is always the plain loss: GradCache must not change anything.
    records = make_pairs(27)
    for i, record in enumerate(records):  # answers shared in threes: false negatives to mask
        record["answer"] = records[i - i % 3]["answer"]
    for i, record in enumerate(records):
        record["negatives"] = [f"an unrelated note about item {i}", f"story {i + 1} without a link"][: 1 + i % 2]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    held = write_jsonl(tmp_path / "eval.jsonl", make_pairs(12, seed=7))
    args = ["--input_jsonl", str(train), "--base_model", str(tiny_model_no_dropout), "--batch_size", "8",
            "--learning_rate", "5e-3", "data.eval_files=" + str(held), "data.negatives_field=negatives",
            "data.num_workers=2", "data.query_max_length=24", "data.document_max_length=32",
            "train.warmup_ratio=0", "tracking.log_every_n_steps=1", "train.mixed_precision=no",
            f"train.gradient_accumulation_steps={accumulation}"]
    one = run_training(1, args + ["tracking.report_to=none"], tmp_path / "one")
    two = run_training(2, args + ["--loss_function", loss, "loss.mini_batch_size=3"] if "Cached" in loss else args,
                       tmp_path / "two")

    assert (one["progress"]["processes"], two["progress"]["processes"]) == (1, 2)
    assert len(one["losses"]) == 4 and one["progress"]["examples_seen"] == two["progress"]["examples_seen"] == 27
    assert two["masked"] and max(two["masked"]) > 0
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=1e-4, atol=1e-6)
    assert one["losses"][-1] < one["losses"][0]
    # fp32 sums in another order differ in the last bits, and Adam's g/sqrt(v) magnifies that for
    # weights with tiny gradients: allow 5e-5 on weights that 4 steps at lr 5e-3 moved by up to 2e-2.
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], tensor, rtol=1e-4, atol=5e-5, msg=name)
    # Evaluation is split across the processes and gives the one-process numbers.
    for when in ("eval_before", "eval_after"):
        for metric, value in one["progress"][when].items():
            assert two["progress"][when][metric] == pytest.approx(value, abs=1e-6)

    # One output folder, one W&B run, written by the main process.
    [run_file] = run_files(str(tmp_path / "two"))
    run = read_run(run_file)
    assert [row["_step"] for row in run["history"] if "train/loss" in row] == [1, 2, 3, 4]
    assert len(list((tmp_path / "two").glob("final_model"))) == 1


def test_padded_chunks_under_ddp_give_the_losses_and_weights_of_one_padded_process(tiny_model_no_dropout: Path,
                                                                                     tmp_path: Path) -> None:
    """Each process encodes its slice in length-sorted chunks inside one DDP forward; the result
    is that of one process padding the whole batch in one block."""
    import random

    rng = random.Random(5)
    records = [{**r, "answer": r["answer"] + " told at length" * rng.randint(0, 5)} for r in make_pairs(140, seed=2)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    args = ["--input_jsonl", str(train), "--base_model", str(tiny_model_no_dropout), "--batch_size", "64",
            "--learning_rate", "5e-3", "data.eval_fraction=0", "data.num_workers=1", "data.query_max_length=24",
            "data.document_max_length=48", "train.warmup_ratio=0", "tracking.log_every_n_steps=1",
            "train.mixed_precision=no", "eval.before=false", "tracking.report_to=none", "model.unpad=false",
            # The runs differ in model.padded_chunks, which pads mining's forward passes otherwise too.
            "train.hard_negatives=null",
            "model.layout_by_cost=false"]  # the chunks named, whatever the lengths
    one = run_training(1, args + ["model.padded_chunks=1"], tmp_path / "one")
    two = run_training(2, args + ["model.padded_chunks=2"], tmp_path / "two")
    assert len(one["losses"]) == 3  # 64 + 64 + 12 pairs
    # The full batches were cut (32 texts a process: 2 chunks): less padding than the same two
    # processes padding their slices in one block.
    block = run_training(2, args + ["model.padded_chunks=1"], tmp_path / "two-block")
    assert all(c > b for c, b in zip(two["padding_efficiency"][:2], block["padding_efficiency"][:2]))
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], tensor, rtol=1e-4, atol=5e-5, msg=name)


def test_a_micro_batch_smaller_than_the_process_count_is_refused(tiny_model_no_dropout: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    train = write_jsonl(tmp_path / "train.jsonl", make_pairs(16))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), str(ROOT / "train.py"),
               "--input_jsonl", str(train), "--base_model", str(tiny_model_no_dropout), "--output_dir",
               str(tmp_path / "out"), "--batch_size", "2", "train.gradient_accumulation_steps=2",
               "tracking.report_to=none"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "fewer than the 2 processes" in done.stderr


def test_local_negatives_switch_changes_the_objective(tiny_model_no_dropout: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", make_pairs(16))
    args = ["--input_jsonl", str(train), "--base_model", str(tiny_model_no_dropout), "--batch_size", "8",
            "data.eval_fraction=0", "data.num_workers=0", "train.max_steps=1", "tracking.report_to=none",
            "tracking.log_every_n_steps=1", "eval.before=false", "train.mixed_precision=no"]
    gathered = run_training(2, args, tmp_path / "gathered")
    assert gathered["progress"]["processes"] == 2
    local = run_training(2, args + ["loss.gather_across_processes=false"], tmp_path / "local")
    # Against 8 candidates the first loss is larger than against the 4 of each process alone.
    assert gathered["losses"][0] > local["losses"][0] + 0.1


@pytest.mark.parametrize("processes, group", [(2, None), (3, None), (3, 4)])
def test_processes_and_workers_see_disjoint_slices_that_cover_the_epoch(qa_file: Path, processes: int,
                                                                        group: int | None) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], shuffle_buffer=16, eval_fraction=0, group_by_length=group)
    reference = PairBatches(cfg, 10, 1, seed=4, collate=untokenized)
    global_batches = [b.ids for b in make_loader(reference, 0, pin_memory=False)]
    per_process = []
    for rank in range(processes):
        dataset = PairBatches(cfg, 10, 1, seed=4, collate=untokenized, num_processes=processes, rank=rank)
        per_process.append([b.ids for b in make_loader(dataset, 2, pin_memory=False)])
    seen = [i for batches in per_process for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 120
    # Step by step, the slices of the processes put back together are the one-process batch.
    for step, batch in enumerate(global_batches):
        assert sum((per_process[r][step] for r in range(processes)), []) == batch


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(train_args: list[str], precision: str) -> None:
    from embedtune.commands.train import main

    assert main(train_args + [f"train.mixed_precision={precision}", "tracking.report_to=none"]) == 0
    out = Path(train_args[train_args.index("--output_dir") + 1])
    rows = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


def test_eval_command_on_two_processes_gives_the_metrics_of_one(tiny_model: Path, tmp_path: Path) -> None:
    """`accelerate launch -m embedtune eval` splits the encoding; the numbers stay the same."""
    data = write_jsonl(tmp_path / "qa.jsonl", make_pairs(45, seed=9))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    metrics = {}
    for processes in (1, 2):
        out = tmp_path / f"m{processes}.json"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "launch" / "cpu_2proc.yaml"), "--num_processes", str(processes), "--main_process_port",
                  str(free_port()), "-m"] if processes > 1 else [sys.executable, "-m"]
        done = subprocess.run(launch + ["embedtune", "eval", str(tiny_model), "--qa", str(data), "--batch-size", "4",
                                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("45 queries") == 1  # printed once, by the main process
        metrics[processes] = json.loads(out.read_text())["metrics"]
    assert metrics[2] == pytest.approx(metrics[1], abs=1e-6)
