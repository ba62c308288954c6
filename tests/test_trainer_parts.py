"""The trainer's small parts on their own: the metrics window, the non-finite guard, the config's
derived values (which training and `embedtune validate` both use), and the typed batch."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl

from embedtune.config import TrainConfig, build_config, parse_args
from embedtune.data.collate import PairCollator, TrainBatch
from embedtune.data.records import Pair
from embedtune.data.split import count_train_pairs, plan_data
from embedtune.model.packing import Ragged
from embedtune.training.meters import MetricsWindow, NonFiniteGuard


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def batch(pairs: int, real: int, computed: int, empty: bool = False) -> TrainBatch:
    none = Ragged(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    rows = torch.zeros(pairs, dtype=torch.long)
    return TrainBatch(none, none, pairs, rows[:0], rows, rows, None, real, computed, global_size=pairs, empty=empty)


def test_the_metrics_window_averages_the_loss_and_counts_what_padding_cost(accelerator) -> None:
    window = MetricsWindow(accelerator.device)
    window.add(torch.tensor(2.0), batch(8, real=60, computed=100))
    window.add(torch.tensor(4.0), batch(8, real=30, computed=50))
    window.add(torch.tensor(0.0), batch(8, real=999, computed=999, empty=True))  # a stand-in: no tokens counted
    figures = window.read(accelerator)
    assert figures.loss == pytest.approx(2.0)  # mean over the 3 micro-batches
    assert figures.padding_efficiency == pytest.approx(90 / 150)
    assert figures.pairs_per_s > 0 and figures.tokens_per_s > 0
    window.reset()
    window.add(torch.tensor(1.0), batch(4, real=10, computed=40))
    assert window.read(accelerator).loss == pytest.approx(1.0)  # nothing of the last window is left


def test_the_non_finite_guard_counts_skips_in_a_row_and_in_all(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard(torch.device("cpu"), in_a_row=1, skipped_before=5, on_device=True)
    assert not guard.reads_every_step
    for bad in (1.0, 0.0, 1.0, 1.0):
        guard.record(torch.tensor(bad))
    with caplog.at_level(logging.WARNING, logger="embedtune"):
        guard.read(step=12)
    assert (guard.in_a_row, guard.skipped) == (2, 8)  # a resumed run's skips count too
    assert "3 update(s) skipped" in caplog.text and not guard.tripped(3)
    caplog.clear()
    guard.record(torch.tensor(1.0))
    with caplog.at_level(logging.WARNING, logger="embedtune"):
        guard.read(step=13)
    assert guard.tripped(3) and "1 update(s) skipped for a non-finite gradient norm (4 in all)" in caplog.text
    caplog.clear()
    guard.record(torch.tensor(0.0))
    guard.read(step=14)
    assert guard.in_a_row == 0 and guard.skipped == 9 and not caplog.text  # nothing new: no warning
    assert NonFiniteGuard(torch.device("cpu"), 0, 0, on_device=False).reads_every_step


def test_the_config_derives_micro_batches_steps_and_warmup() -> None:
    cfg = TrainConfig(batch_size=32, gradient_accumulation_steps=4, epochs=3, warmup_ratio=0.1)
    assert cfg.micro_batch_size() == 8 and cfg.pairs_per_process(3) == "2-3" and cfg.pairs_per_process(4) == "2"
    assert TrainConfig(batch_size=10).pairs_per_process(4) == "2-3"  # slices of 3, 3, 2, 2
    assert cfg.processes_problem(8) is None
    assert "= 8 pairs per micro-batch, fewer than the 9 processes" in cfg.processes_problem(9)
    assert cfg.steps_per_epoch(100, drop_last=False) == 4 and cfg.steps_per_epoch(100, drop_last=True) == 3
    assert cfg.steps_per_epoch(96, drop_last=False) == 3
    assert cfg.planned_steps(100, drop_last=False) == 12
    assert cfg.planned_steps(0, drop_last=False) == 1  # a schedule needs a step
    assert cfg.warmup_steps(12) == math.ceil(1.2)
    assert TrainConfig(max_steps=7).planned_steps(None, drop_last=False) == 7  # no count needed
    with pytest.raises(ValueError):
        TrainConfig().planned_steps(None, drop_last=False)


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_run_trains_the_steps_the_config_derives_from_the_data(train_args: list[str], drop_last: bool) -> None:
    from embedtune.commands.train import main

    args = [a for a in train_args if a != "train.max_steps=4"] + [
        "tracking.report_to=none", f"data.drop_last={str(drop_last).lower()}", "eval.before=false",
        "checkpoint.every_n_steps=null"]
    cfg = parse_args(args)
    pairs = count_train_pairs(cfg.data)
    assert pairs % 16  # a partial last batch, which drop_last decides
    assert main(args) == 0
    out = Path(args[args.index("--output_dir") + 1])
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["step"] == cfg.train.planned_steps(pairs, drop_last) == pairs // 16 + (not drop_last)
    assert progress["examples_seen"] == (pairs // 16 * 16 if drop_last else pairs)


def test_one_pass_finds_the_held_out_pairs_and_counts_the_training_ones(tmp_path: Path) -> None:
    records = make_pairs(200) + [{"question": "q", "answer": "a", "label": 0.1}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records + make_pairs(5))  # repeated questions
    cfg = build_config({"data": {"train_files": [str(path)], "eval_fraction": 0.3}}).data
    plan = plan_data(cfg, count=True)
    assert plan.train_pairs == count_train_pairs(cfg)
    questions = [p.query for p in plan.eval_pairs]
    assert len(questions) == len(set(questions)) > 0  # each held-out question once
    assert plan.train_pairs + len(plan.eval_pairs) < len(records) + 5  # the repeats were held out, not trained
    assert plan_data(cfg, count=False).eval_pairs == plan.eval_pairs and plan_data(cfg, count=False).train_pairs is None
    assert plan_data(cfg, count=True, held_out=False).eval_pairs == []
    few = cfg.model_copy(update={"max_eval_queries": 3})
    assert [p.query for p in plan_data(few, count=False).eval_pairs] == questions[:3]


def test_the_collator_types_the_batch_and_a_slice_without_pairs_is_empty(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    collate = PairCollator(AutoTokenizer.from_pretrained(tokenizer_dir), 16, 32)
    pairs = [Pair("a:1", "what is an apple?", "a fruit", ("a car", "a boat")), Pair("a:2", "and a river?", "water")]
    typed = collate(pairs)
    assert (typed.num_positives, typed.query.rows, typed.document.rows) == (2, 2, 4)
    assert typed.negative_owner.tolist() == [0, 0] and typed.labels is None
    assert typed.real_tokens == int(typed.query.lengths.sum() + typed.document.lengths.sum())
    nothing = collate([])
    assert nothing.num_positives == 0 and nothing.query.rows == 0 and nothing.real_tokens == 0
