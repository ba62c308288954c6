"""``embedtune bench quality --compare``: both trainers on the same pairs, one evaluator, a paired
bootstrap on the difference; and the bootstrap itself on constructed scores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, make_pairs, write_jsonl

from embedtune.tools.quality import METRICS, paired_bootstrap

SEEDS = (42, 1)


def test_the_paired_bootstrap_sees_an_obvious_win_and_no_difference_in_identical_scores() -> None:
    better = [0.9, 1.0, 0.8, 1.0, 0.95, 0.85, 1.0, 0.9] * 5
    worse = [s - 0.3 for s in better]
    win = paired_bootstrap(better, worse)
    assert win["low"] > 0 and abs(win["mean"] - 0.3) < 1e-9 and win["low"] <= win["mean"] <= win["high"]
    assert paired_bootstrap(better, better) == {"mean": 0.0, "low": 0.0, "high": 0.0}
    # Pairing matters: shifted scores whose spread across queries is large still give a tight interval.
    spread = [i / 40 for i in range(40)]
    tight = paired_bootstrap([s + 0.01 for s in spread], spread)
    assert 0 < tight["low"] <= tight["high"] < 0.02
    mixed = paired_bootstrap([1.0, 0.0] * 20, [0.0, 1.0] * 20)
    assert mixed["low"] < 0 < mixed["high"]


def test_the_quality_bench_trains_both_trainers_on_the_same_pairs_and_scores_them_on_the_same_queries(
        tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(100))
    out, report = tmp_path / "out", tmp_path / "quality.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "embedtune", "bench", "quality", "--compare", "--model", str(tiny_model),
                           "--data", str(data), "--eval-fraction", "0.2", "--seeds", *map(str, SEEDS), "--epochs", "1",
                           "--batch-size", "8", "--max-length", "32", "--learning-rate", "1e-3", "--out", str(out),
                           "--json", str(report)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    table = printed[printed.index("base model  "):]
    for row in ("base model", "embedtune", "SentenceTransformerTrainer"):
        assert re.search(rf"^{row} +\d\.\d{{4}}", table, re.MULTILINE), printed
    assert re.search(r"^embedtune +(\d\.\d{4} ± \d\.\d{4} +){3}\d+$", table, re.MULTILINE), printed
    for label in METRICS.values():  # the difference, with its interval
        assert re.search(rf"^  {label} +[+-]\d\.\d{{4}}  \[[+-]\d\.\d{{4}}, [+-]\d\.\d{{4}}\]$", printed, re.MULTILINE)
    assert re.search(r"training time: SentenceTransformerTrainer / embedtune = \d+\.\d\dx", printed)
    assert "same training pairs in every run: yes" in printed and "for every model: yes" in printed

    result = json.loads(report.read_text(encoding="utf-8"))
    train, held = result["train"], result["held_out"]
    assert held["questions_also_trained_on"] == 0 and train["pairs"] + held["queries"] == 100
    for name in ("embedtune", "sentence_transformers"):
        runs = result["trainers"][name]["runs"]
        assert [r["seed"] for r in runs] == list(SEEDS)
        assert result["trainers"][name]["seconds_mean"] > 0
        for run in runs:
            # what the trainer actually read (embedtune's batch log, ST's data collator), as ids of --data
            assert run["pairs_trained"] == train["pairs"] and run["trained_ids_hash"] == train["ids_hash"]
            assert run["evaluated_queries"] == held["queries"] and run["evaluated_set_hash"] == held["set_hash"]
            assert set(run["metrics"]) == set(METRICS) and len(run["per_query"]["ndcg@10"]) == held["queries"]
            assert os.path.isfile(os.path.join(run["model"], "modules.json"))
    assert result["base"]["evaluated_set_hash"] == held["set_hash"]
    assert result["same_training_pairs"] and result["same_evaluation"]
    assert result["trainers"]["embedtune"]["settings"]["mask_false_negatives"] is True
    assert result["trainers"]["sentence_transformers"]["settings"]["scale"] == 20.0
    pooled, per_seed = result["difference"]["pooled"]["ndcg@10"], result["difference"]["per_seed"]
    assert pooled["low"] <= pooled["mean"] <= pooled["high"] and [d["seed"] for d in per_seed] == list(SEEDS)
    assert os.path.isfile(train["file"])


def test_negatives_and_scores_reach_the_training_file_embedtune_reads(tmp_path: Path) -> None:
    """--negatives-field and --scores-field: the held-out split is the same, and the training side
    keeps each record's negatives and the teacher's scores beside them."""
    import argparse

    from embedtune.tools.quality import load_split, write_train_file

    records = make_pairs(60)
    for i, record in enumerate(records):
        record["negatives"] = [f"note {i}", f"other note {i}"][: 1 + i % 2]
        record["scores"] = [0.9, *[0.1 * (k + 1) for k in range(len(record["negatives"]))]]
    data = write_jsonl(tmp_path / "scored.jsonl", records)
    args = argparse.Namespace(data=[str(data)], eval_queries=None, eval_corpus=None, eval_qrels=None,
                              eval_fraction=0.2, max_eval_queries=1000, max_train_pairs=None, eval_distractors=[])
    plain = load_split(args)
    split = load_split(argparse.Namespace(**vars(args), negatives_field="negatives", scores_field="scores"))
    assert [p.query for p in split.train] == [p.query for p in plain.train] and split.held_out == plain.held_out
    write_train_file(split.train, str(tmp_path / "train.jsonl"))
    by_question = {r["question"]: r for r in records}
    written = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(written) == len(split.train) > 0
    for row in written:
        assert (row["negatives"], row["scores"]) == (by_question[row["question"]]["negatives"],
                                                     by_question[row["question"]]["scores"])
