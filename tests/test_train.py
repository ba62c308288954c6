"""The real training program, end to end, on a tiny model: outputs, W&B, bad input, the doors in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, make_pairs, write_jsonl
from wandb_reader import read_run, run_files

from embedtune.commands.train import main


def out_dir(args: list[str]) -> Path:
    return Path(args[args.index("--output_dir") + 1])


def test_a_run_writes_model_metrics_progress_log_and_wandb(train_args: list[str]) -> None:
    assert main(train_args + ["tracking.tags=[smoke]", "tracking.run_name=tiny"]) == 0
    out = out_dir(train_args)

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 4 and resolved["data"]["query_max_length"] == 24

    rows = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert {"epoch", "loss", "lr", "grad_norm", "pairs_per_s", "tokens_per_s", "padding_efficiency"} <= row.keys()
        assert row["loss"] > 0 and row["pairs_per_s"] > 0 and row["tokens_per_s"] > row["pairs_per_s"]
        assert 0.2 < row["padding_efficiency"] <= 1

    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] is True and progress["step"] == 4 and progress["examples_seen"] == 64
    assert set(progress["eval_before"]) == set(progress["eval_after"]) == {
        "ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100"}
    assert "held-out metrics" in (out / "logs" / "train.log").read_text()
    card = (out / "final_model" / "README.md").read_text()
    assert f"{progress['eval_after']['ndcg@10']:.4f}" in card and "sha256" in card
    # nDCG's change query by query, with its bootstrap interval, wherever the metrics go.
    change = progress["eval_change"]
    assert change["better"] + change["worse"] + change["same"] == change["queries"] > 0
    assert change["change"] == pytest.approx(progress["eval_after"]["ndcg@10"] - progress["eval_before"]["ndcg@10"])
    assert change["low"] <= change["change"] <= change["high"]
    assert f"nDCG@10 change over {change['queries']} queries: {change['change']:+.4f}" in card

    # W&B: read back from the offline run's own file.
    [run_file] = run_files(str(out))
    run = read_run(run_file)
    assert run["meta"]["exit_code"] == 0 and run["meta"]["tags"] == ["smoke"] and run["meta"]["name"] == "tiny"
    assert run["config"]["train"]["max_steps"] == 4
    losses = {row["_step"]: row["train/loss"] for row in run["history"] if "train/loss" in row}
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[1] == pytest.approx(train_rows[0]["loss"])
    evals = {row["_step"]: row["eval/ndcg@10"] for row in run["history"] if "eval/ndcg@10" in row}
    assert sorted(evals) == [0, 4]
    assert evals[4] == pytest.approx(progress["eval_after"]["ndcg@10"])
    changes = {row["_step"]: row["eval/ndcg@10_change"] for row in run["history"] if "eval/ndcg@10_change" in row}
    assert changes == {4: pytest.approx(change["change"])}
    assert progress["wandb"]["id"] == run["meta"]["id"]
    assert run["summary"]["final/ndcg@10"] == pytest.approx(progress["eval_after"]["ndcg@10"])
    assert run["summary"]["before/mrr@10"] == pytest.approx(progress["eval_before"]["mrr@10"])

    # The table of example retrievals, at each eval: samples, then the worst queries.
    tables = {row["_step"]: row["eval/examples"] for row in run["history"] if "eval/examples" in row}
    assert sorted(tables) == [0, 4]
    table = json.loads((Path(run_file).parent / "files" / tables[4]["path"]).read_text())
    held_out = len(progress["eval_after"]) and tables[4]["nrows"] // 2
    assert table["columns"][:5] == ["kind", "query", "source", "relevant", "rank"]
    kinds = [row[0] for row in table["data"]]
    assert kinds == ["sample"] * held_out + ["worst"] * held_out
    worst = [row[-1] for row in table["data"] if row[0] == "worst"]
    assert worst == sorted(worst) and worst[0] <= min(row[-1] for row in table["data"])
    examples = [json.loads(line) for line in (out / "eval_examples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in examples] == [0, 4] and examples[1]["rows"] == table["data"]


def test_training_improves_held_out_retrieval_and_export_matches_the_trainer(
        tiny_model: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedtune.data.collate import PairCollator
    from embedtune.model.encoder import EmbeddingModel

    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(400))
    out = tmp_path / "out"
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(out),
            "--batch_size", "32", "--learning_rate", "2e-3", "--epochs", "2", "data.num_workers=1",
            "data.query_max_length=24", "data.document_max_length=32", "tracking.report_to=none",
            "data.query_prefix=query: ", "data.eval_fraction=0.15"]
    assert main(args) == 0
    progress = json.loads((out / "training_progress.json").read_text())
    before, after = progress["eval_before"], progress["eval_after"]
    assert after["ndcg@10"] > before["ndcg@10"] + 0.1, (before, after)
    assert progress["epochs_completed"] == 2 and progress["examples_seen"] == 2 * (400 - len_held_out(data))

    path = out / "final_model"
    model, tokenizer = EmbeddingModel.from_pretrained(str(path))
    model.eval()
    collate = PairCollator(tokenizer, 24, 32, query_prefix="query: ")
    queries = [p["question"] for p in make_pairs(5, seed=9)]
    with torch.no_grad():
        ours = model(collate.queries(queries))
    theirs = SentenceTransformer(str(path), device="cpu").encode_query(queries, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, theirs).min().item() >= 0.9999


def len_held_out(path: Path) -> int:
    from embedtune.config import DataConfig
    from embedtune.data.split import eval_pairs

    return len(eval_pairs(DataConfig(train_files=[str(path)], eval_fraction=0.15, max_eval_queries=10**6)))


def test_bad_record_stops_the_run_naming_file_and_line(train_args: list[str], qa_file: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    lines = qa_file.read_text().splitlines()
    lines[6] = '{"question": "where is the answer?"}'
    qa_file.write_text("\n".join(lines) + "\n")
    assert main(train_args + ["tracking.report_to=none"]) == 1
    err = capsys.readouterr().err
    assert f"{qa_file}, line 7: no 'answer' field" in err and "on_bad_record=skip" in err
    assert not (out_dir(train_args) / "final_model").exists()


def test_skip_policy_trains_on_and_keeps_the_rejects(train_args: list[str], qa_file: Path) -> None:
    lines = qa_file.read_text().splitlines()
    lines[2] = "this is not json"
    lines[50] = '{"question": "", "answer": "x"}'
    qa_file.write_text("\n".join(lines) + "\n")
    assert main(train_args + ["tracking.report_to=none", "data.on_bad_record=skip", "train.max_steps=null",
                              "--epochs", "1"]) == 0
    rejected = [json.loads(line) for line in (out_dir(train_args) / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["record"]) for r in rejected] == [(3, "this is not json"), (51, lines[50])]
    assert all(r["file"] == str(qa_file) for r in rejected)
    assert (out_dir(train_args) / "final_model" / "model.safetensors").exists()


def test_a_config_error_never_starts_a_run(train_args: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(train_args + ["train.optimizer=sgd"]) == 2
    assert "unknown key 'train.optimizer'" in capsys.readouterr().err
    assert not out_dir(train_args).exists()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("door", ["accelerate", "python", "embedtune"])
def test_the_three_doors_run_the_same_program(train_args: list[str], door: str) -> None:
    commands = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       str(ROOT / "train.py")],
        "python": [sys.executable, str(ROOT / "train.py")],
        # The console script when installed (it is in CI), else the module it points at.
        "embedtune": ([str(Path(sys.executable).parent / "embedtune"), "train"]
                      if (Path(sys.executable).parent / "embedtune").exists()
                      else [sys.executable, "-m", "embedtune", "train"]),
    }
    args = train_args + ["train.max_steps=2", "tracking.report_to=none", "eval.before=false"]
    done = subprocess.run(commands[door] + args, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    progress = json.loads((out_dir(train_args) / "training_progress.json").read_text())
    assert progress["completed"] and progress["step"] == 2


def test_an_unloadable_model_is_explained(train_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = train_args + ["--base_model", "someone/not-on-this-machine", "tracking.report_to=wandb"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "cannot load model.base_model='someone/not-on-this-machine'" in err and "HF_HUB_OFFLINE" in err
    assert not (out_dir(train_args) / "wandb").exists()


def test_accumulation_and_periodic_eval_keep_the_step_accounting(train_args: list[str]) -> None:
    args = train_args + ["train.gradient_accumulation_steps=2", "eval.every_n_steps=2", "tracking.report_to=none"]
    assert main(args) == 0
    out = out_dir(train_args)
    rows = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/ndcg@10" in r] == [0, 2, 4]
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["examples_seen"] == 4 * 16


def test_a_non_finite_loss_never_reaches_the_weights(train_args: list[str], monkeypatch: pytest.MonkeyPatch,
                                                     tiny_model: Path) -> None:
    from safetensors.torch import load_file

    import embedtune.training.trainer as program

    class Poisoned(torch.nn.Module):
        needs = "pairs"

        def forward(self, batch) -> torch.Tensor:
            return (batch.queries * batch.positives).sum() * float("nan")

    monkeypatch.setattr(program, "build_loss", lambda *a, **k: Poisoned())
    assert main(train_args + ["tracking.report_to=none"]) == 0
    progress = json.loads((out_dir(train_args) / "training_progress.json").read_text())
    assert progress["skipped_steps"] == 4
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(out_dir(train_args) / "final_model" / "model.safetensors"))
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)


def test_every_epoch_uses_every_training_pair_once(tiny_model: Path, tmp_path: Path) -> None:
    """The step count comes from an exact count of the split, so no epoch is cut short."""
    from embedtune.config import DataConfig
    from embedtune.data.split import count_train_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(120))
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "16", "--epochs", "2", "data.eval_fraction=0.2", "data.num_workers=0",
            "tracking.report_to=none", "eval.before=false"]
    assert main(args) == 0
    pairs = count_train_pairs(DataConfig(train_files=[str(data)], eval_fraction=0.2))
    progress = json.loads((tmp_path / "out" / "training_progress.json").read_text())
    assert progress["examples_seen"] == 2 * pairs and progress["epochs_completed"] == 2


def test_reusing_an_output_dir_with_checkpoints_needs_resume(train_args: list[str], capsys) -> None:
    args = train_args + ["tracking.report_to=none", "checkpoint.every_n_steps=2"]
    assert main(args) == 0
    assert main(args) == 1
    assert "already holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main(args + ["--resume_from_checkpoint", "latest", "train.max_steps=5"]) == 0


def test_a_malformed_csv_is_named(tmp_path: Path, train_args: list[str], capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(5)) + "q,a,extra,fields\n")
    assert main(train_args + ["--input_jsonl", str(bad), "tracking.report_to=none"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: cannot be read as csv" in err and "Traceback" not in err


@pytest.mark.parametrize("loss, fields", [
    ("ContrastiveLoss", {"label": lambda i: float(i % 2)}),
    ("CoSENTLoss", {"label": lambda i: (i % 5) / 4}),
    ("TripletLoss", {"negatives": lambda i: [f"a note on item {i + 1} with nothing shared"]}),
    ("CachedMultipleNegativesRankingLoss", {}),
])
def test_each_loss_family_trains_end_to_end(tiny_model: Path, tmp_path: Path, loss: str, fields: dict) -> None:
    records = make_pairs(48)
    for i, record in enumerate(records):
        for name, make in fields.items():
            record[name] = make(i)
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    extra = {"label": "data.label_field=label", "negatives": "data.negatives_field=negatives"}
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "8", "--loss_function", loss, "train.max_steps=3", "data.num_workers=0",
            "tracking.report_to=none", "tracking.log_every_n_steps=1", "loss.mini_batch_size=3",
            *[extra[name] for name in fields]]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "training_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_a_loss_without_its_data_never_starts_a_run(train_args: list[str], capsys) -> None:
    assert main(train_args + ["--loss_function", "ContrastiveLoss"]) == 1
    assert "set data.label_field" in capsys.readouterr().err
    assert not out_dir(train_args).exists()
