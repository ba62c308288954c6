"""`embedtune validate` on a tiny model and small files whose counts are known by construction."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import make_pairs, write_jsonl

from embedtune.commands.validate import main, run_checks
from embedtune.commands.validate.checks import FAIL, OK, WARN
from embedtune.commands.validate.environment import precision_check
from embedtune.commands.validate.plan import checkpoint_bytes, disk_check, planned_saves
from embedtune.config import parse_args
from embedtune.data.records import DataError, Pair, is_held_out
from embedtune.data.split import count_train_pairs
from embedtune.training.trainer import Trainer

# Single WordPiece tokens of the MiniLM vocabulary: n of them make n + 2 tokens with [CLS] and [SEP].
WORDS = ["apple", "river", "engine", "violin", "pepper", "compass", "harbor", "copper", "falcon", "thunder"]


def args_for(model: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--input_jsonl", str(data), "--base_model", str(model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "16", "data.query_max_length=24", "data.document_max_length=32",
            "tracking.report_to=none", *extra]


def validate(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, dict]:
    """Exit code, printed table, and the JSON report's rows by check name."""
    report = tmp_path / "report.json"
    code = main(args + ["--json", str(report)])
    out = capsys.readouterr().out
    rows = {c["check"]: c for c in json.loads(report.read_text())["checks"]} if report.exists() else {}
    return code, out, rows


def row_line(out: str, check: str) -> str:
    """The first printed line of a check's row."""
    return next(line for line in out.splitlines() if f"  {check}  " in line)


def words(count: int, offset: int) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(count))


def test_a_good_setup_passes_and_reports_the_counts_of_the_file(
        tiny_model: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:

    args = args_for(tiny_model, qa_file, tmp_path, "data.eval_fraction=0.2")
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 0, out
    held = sum(is_held_out(Pair("", p["question"], p["answer"]), 0.2) for p in make_pairs(120))
    assert 0 < held < 120
    assert f"120 records, 120 good pairs: {120 - held} training, {held} held out" in out
    assert rows["records"]["data"] == {"records": 120, "pairs": 120, "train": 120 - held, "held_out": held,
                                       "eval_queries": held}
    assert rows["bad records"]["status"] == OK and rows["empty texts"]["data"]["total"] == 0
    assert rows["duplicates"]["data"] == {"questions": 0, "pairs": 0}
    # Steps as the trainer plans them, from its own count of the data.
    steps = rows["optimizer steps"]["data"]
    cfg = parse_args(args)
    planned = cfg.train.planned_steps(count_train_pairs(cfg.data), cfg.data.drop_last)
    assert steps["total"] == steps["per_epoch"] == planned == math.ceil((120 - held) / 16)
    assert f"{steps['per_epoch']} per epoch ({120 - held} pairs / batch 16" in out
    assert rows["model load"]["status"] == OK and rows["model load"]["data"]["parameters"] > 0
    assert "FAIL" not in out and out.rstrip().splitlines()[-1].startswith("ready to train (0 blocking")


@pytest.mark.parametrize(("override", "named"), [
    ("train.batch_sise=8", "unknown key 'train.batch_sise'"),
    ("train.epochs=two", "train.epochs"),
    ("loss.name=ContrastiveLoss", "data.label_field"),  # the trainer's loss/data check
])
def test_a_config_error_is_a_failed_row_that_names_the_key(
        override: str, named: str, tiny_model: Path, qa_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    code, out, rows = validate(args_for(tiny_model, qa_file, tmp_path, override), tmp_path, capsys)
    assert code == 1
    failed = [r for r in rows.values() if r["status"] == FAIL]
    assert len(failed) == 1 and named in failed[0]["detail"], failed
    assert named in out and "blocked" in out.splitlines()[-1]


def test_a_missing_config_file_fails_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, rows = validate(["--config", str(tmp_path / "nope.yaml")], tmp_path, capsys)
    assert code == 1 and rows["config"]["status"] == FAIL and "config file not found" in out


def test_eval_files_are_the_held_out_set_and_questions_shared_with_training_are_counted(
        tiny_model: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shared = make_pairs(120)[:3]  # questions of the training file
    held = write_jsonl(tmp_path / "eval.jsonl", shared + make_pairs(7, seed=5))
    code, out, rows = validate(args_for(tiny_model, qa_file, tmp_path, f"data.eval_files={held}"), tmp_path, capsys)
    assert code == 0, out
    assert rows["records"]["data"] == {"records": 120, "pairs": 120, "train": 120, "held_out": 10,
                                       "eval_queries": 10}
    assert rows["eval overlap"]["status"] == WARN and rows["eval overlap"]["data"]["eval_in_train"] == 3


def test_a_model_that_does_not_load_offline_blocks(qa_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    args = args_for(tmp_path / "no-such-model", qa_file, tmp_path)
    args[args.index("--base_model") + 1] = "no-such-org/no-such-model"
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 1 and rows["model load"]["status"] == FAIL and "HF_HUB_OFFLINE" in rows["model load"]["detail"]
    # The data is still checked; what needs the tokenizer or the size of the model says why it is not.
    assert rows["records"]["data"]["records"] == 120
    assert rows["token lengths"]["status"] == WARN and rows["disk space"]["status"] == WARN


def bad_file(tmp_path: Path) -> Path:
    lines: list = make_pairs(9)
    lines[2] = '{"question": "broken", "answer": '  # line 3: cut short
    lines[4] = {"question": "where is the answer?"}  # line 5: no answer
    lines[6] = ""  # line 7: blank, not a record
    return write_jsonl(tmp_path / "bad.jsonl", lines)


def test_bad_records_are_named_by_file_and_line_and_block_under_error(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = bad_file(tmp_path)
    code, out, rows = validate(args_for(tiny_model, data, tmp_path, "data.eval_fraction=0"), tmp_path, capsys)
    assert code == 1
    bad = rows["bad records"]
    assert bad["status"] == FAIL and bad["data"]["count"] == 2
    assert [(r["line"], r["file"]) for r in bad["data"]["first"]] == [(3, str(data)), (5, str(data))]
    assert f"{data}, line 3: not valid JSON" in out
    assert f"{data}, line 5: no 'answer' field for the positive" in out
    assert rows["records"]["data"]["records"] == 8 and rows["records"]["data"]["pairs"] == 6
    assert rows["empty texts"]["data"]["total"] == 0  # broken and missing are not empty


def test_bad_records_only_warn_under_skip(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = bad_file(tmp_path)
    args = args_for(tiny_model, data, tmp_path, "data.eval_fraction=0", "data.on_bad_record=skip")
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 0, out
    assert rows["bad records"]["status"] == WARN and rows["bad records"]["data"]["count"] == 2
    assert row_line(out, "bad records").split()[2] == WARN and "line 5" in out
    assert rows["optimizer steps"]["data"]["train_pairs"] == 6


def test_a_triplet_loss_makes_records_without_a_negative_bad_records_as_training_does(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = make_pairs(12)
    for i, record in enumerate(records):
        if i % 4:  # records 0, 4 and 8 (lines 1, 5 and 9) have no negative
            record["negatives"] = [f"an unrelated answer number {i}"]
    data = write_jsonl(tmp_path / "triplets.jsonl", records)
    args = args_for(tiny_model, data, tmp_path, "data.eval_fraction=0", "loss.name=TripletLoss",
                    "data.negatives_field=negatives")
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 1
    assert rows["loss"]["status"] == OK and rows["loss"]["data"]["needs"] == "triplets"
    bad = rows["bad records"]
    assert bad["status"] == FAIL and bad["data"]["count"] == 3
    assert [r["line"] for r in bad["data"]["first"]] == [1, 5, 9]
    assert f"{data}, line 1: the loss trains on triplets and this record has no hard negative" in out
    assert rows["records"]["data"]["pairs"] == 9 and rows["optimizer steps"]["data"]["train_pairs"] == 9

    # The trainer's own setup, on the same arguments, stops at the same records and counts the same pairs.
    trainer = Trainer(parse_args(args))
    trainer._setup_loss()
    assert trainer.require_negatives
    with pytest.raises(DataError) as stopped:
        trainer._check_data()
    assert all(f"{data}, line {line}: the loss trains on triplets" in str(stopped.value) for line in (1, 5, 9))
    assert count_train_pairs(trainer.cfg.data, trainer.require_negatives) == 9


def test_duplicates_and_empty_texts_are_counted_exactly(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = [
        {"question": "How do I sort a list?", "answer": "Call sorted()."},
        {"question": "How do I sort a list?", "answer": "Call sorted()."},  # repeated pair
        {"question": "how do I  sort a LIST?", "answer": "call sorted().", "negatives": ["x"]},  # same, normalized
        {"question": "How do I sort a list?", "answer": "Use list.sort()."},  # repeated question only
        {"question": "How do I join paths?", "answer": "os.path.join()."},
        {"question": "   ", "answer": "a blank question"},
        {"question": "an empty answer", "answer": ""},
        {"question": "", "answer": "\n", "negatives": ["fine"]},  # two empty texts, one record
        {"question": "an empty negative", "answer": "fine", "negatives": ["ok", " "]},
        {"question": "a null answer", "answer": None},
    ]
    data = write_jsonl(tmp_path / "dups.jsonl", records)
    args = args_for(tiny_model, data, tmp_path, "data.eval_fraction=0", "data.on_bad_record=skip",
                    "data.negatives_field=negatives")
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 0, out
    assert rows["empty texts"]["data"] == {"total": 6, "query": 2, "positive": 3, "negative": 1}
    assert "6 (2 query, 3 positive, 1 negative" in out
    assert rows["bad records"]["data"]["count"] == 5
    assert rows["duplicates"]["data"] == {"questions": 3, "pairs": 2}
    assert "3 records repeat an earlier question, 2 repeat an earlier question and answer" in out
    assert rows["duplicates"]["status"] == WARN


def length_file(tmp_path: Path) -> Path:
    """20 records; queries: 12 of 8 tokens and 8 of 9; documents: 19 of 16 tokens and 1 of 22."""
    records = []
    for i in range(20):
        question = words(6 if i < 12 else 7, i)
        answer = words(14 if i < 19 else 20, i + 3)
        records.append({"question": question, "answer": answer})
    random.Random(0).shuffle(records)
    return write_jsonl(tmp_path / "lengths.jsonl", records)


def test_token_lengths_and_truncation_rate_against_the_max_lengths(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer(words(6, 0))["input_ids"]) == 8  # the construction holds for this tokenizer

    args = args_for(tiny_model, length_file(tmp_path), tmp_path, "data.eval_fraction=0",
                    "data.query_max_length=8", "data.document_max_length=16")
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 0, out
    query = rows["query lengths"]
    assert query["status"] == WARN
    assert query["data"] == {"texts": 20, "p50": 8, "p90": 9, "p99": 9, "max": 9, "max_length": 8, "truncated": 8,
                             "truncation_rate": 0.4, "suggested_max_length": 9}
    assert "8 of 20 (40.0%) cut (all 20 records)" in out and "data.query_max_length=9 covers 99%" in out
    document = rows["document lengths"]
    assert document["status"] == OK  # 1 in 20 is 5%: not more than 5%
    assert (document["data"]["truncated"], document["data"]["max"], document["data"]["p90"]) == (1, 22, 16)

    # A prefix counts towards the length: "apple" is one more token, so every query is cut.
    code, out, rows = validate(args + ["data.query_prefix=apple "], tmp_path, capsys)
    assert rows["query lengths"]["data"]["truncated"] == 20


def test_token_lengths_of_a_sample_say_so(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = args_for(tiny_model, length_file(tmp_path), tmp_path, "data.eval_fraction=0", "--sample", "5")
    code, out, rows = validate(args, tmp_path, capsys)
    assert rows["query lengths"]["data"]["texts"] == 5 and "a random sample of 5 of 20 records" in out
    assert rows["records"]["data"]["records"] == 20  # the sample bounds the tokenizing, not the count


@pytest.mark.parametrize("chunks, in_chunks", [(2, 1.0), (1, 0.5625)])
def test_padding_of_the_user_s_batches_in_one_block_in_chunks_and_grouped(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, chunks: int, in_chunks: float) -> None:
    # Documents of 4 and 32 tokens in turn: a batch of 32 holds 16 of each, so one padded block is
    # 576 real tokens of 1,024; two length-sorted chunks pad nothing; nor do batches grouped by length.
    records = [{"question": words(3, i), "answer": words(2 if i % 2 else 30, i)} for i in range(64)]
    data = write_jsonl(tmp_path / "alternating.jsonl", records)
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "32", "data.eval_fraction=0", "data.shuffle=false", "data.document_max_length=64",
            "tracking.report_to=none", f"model.padded_chunks={chunks}"]
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 0, out
    assert rows["padding"]["data"] == {"batch": 32, "one_block": 0.5625, "chunks": chunks, "in_chunks": in_chunks,
                                       "group_by_length": 16, "grouped_in_chunks": 1.0}
    assert "0.56 in one block" in row_line(out, "padding")


def test_checkpoint_estimate_and_disk_check() -> None:
    estimate = checkpoint_bytes(parameters=1000, trainable=900, keep_last=2, keep_best=True, saves=10)
    # 4 bytes a weight, 8 of AdamW state a trained weight; keep_last + the one being written + best.
    assert estimate == {"per_checkpoint": 11_200, "checkpoints": 4, "final_model": 4000, "total": 48_800}
    assert checkpoint_bytes(1000, 900, keep_last=2, keep_best=False, saves=1)["total"] == 15_200
    assert planned_saves(46, None) == 1 and planned_saves(1000, 300) == 4
    assert disk_check(estimate, free=48_799, where="/x").status == FAIL
    assert disk_check(estimate, free=48_800 * 3 // 2, where="/x").status == WARN
    assert disk_check(estimate, free=48_800 * 3, where="/x").status == OK


def test_a_run_that_does_not_fit_on_the_disk_is_blocked(tiny_model: Path, qa_file: Path, tmp_path: Path) -> None:
    cfg = parse_args(args_for(tiny_model, qa_file, tmp_path, "train.max_steps=20", "checkpoint.every_n_steps=2",
                              "checkpoint.keep_last=3"))
    checks = run_checks(cfg, sample_size=10, free_bytes=10**12)
    disk = next(c for c in checks if c.check == "disk space")
    params, trained = (next(c for c in checks if c.check == "model load").data[k] for k in ("parameters", "trainable"))
    assert disk.status == OK  # 10 saves, 4 at once: keep_last 3 + the one being written
    assert disk.data["total"] == 4 * (4 * params + 8 * trained) + 4 * params

    checks = run_checks(cfg, sample_size=10, free_bytes=disk.data["total"] - 1)
    assert [c.check for c in checks if c.status == FAIL] == ["disk space"]


def test_an_output_dir_with_an_earlier_run_is_blocked(
        tiny_model: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    step = tmp_path / "out" / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    code, out, rows = validate(args_for(tiny_model, qa_file, tmp_path), tmp_path, capsys)
    assert code == 1 and rows["checkpoints"]["status"] == FAIL and "--resume_from_checkpoint latest" in out


def test_precision_as_accelerate_runs_it_on_the_cpu() -> None:
    assert precision_check("bf16", "train.mixed_precision", cuda=False).status == OK
    fp16 = precision_check("fp16", "train.mixed_precision", cuda=False)
    assert fp16.status == WARN and "fp32" in fp16.detail
    assert precision_check("no", "default", cuda=False).status == OK


def test_a_lora_adapter_export_that_would_not_load_fails_its_row(
        tiny_model: Path, qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations import peft as transformers_peft

    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0")  # what transformers asks of peft
    code, out, rows = validate(args_for(tiny_model, qa_file, tmp_path, "model.lora.r=4",
                                        "model.lora.export=adapter"), tmp_path, capsys)
    assert code == 1 and rows["lora"]["status"] == FAIL
    assert "peft>=99.0" in row_line(out, "lora") and "model.lora.export=merged" in out
    code, out, rows = validate(args_for(tiny_model, qa_file, tmp_path, "model.lora.r=4"), tmp_path, capsys)
    assert code == 0 and rows["lora"]["status"] == OK
    assert "r 4, alpha 32, dropout 0.05 on the usual layers; export merged" in row_line(out, "lora")


def test_validate_reports_the_sources_and_fails_a_weight_for_a_source_the_data_lacks(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = [{**r, "source": "manuals" if i % 4 else "faq"} for i, r in enumerate(make_pairs(80))]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    args = args_for(tiny_model, data, tmp_path, "data.eval_fraction=0")
    code, out, rows = validate([*args, "data.source_weights={faq: 3}"], tmp_path, capsys)
    sources = rows["sources"]
    assert sources["status"] == OK and sources["data"]["sources"] == {"manuals": 60, "faq": 20}
    # The step count is the weighted epoch's: 60 + 3 x 20 pairs in batches of 16.
    assert sources["data"]["epoch_pairs"] == 120 and rows["optimizer steps"]["data"]["per_epoch"] == 8
    code, out, rows = validate([*args, "data.source_weights={forum: 3}"], tmp_path, capsys)
    assert code == 1 and rows["sources"]["status"] == FAIL
    assert "names the source 'forum', which no training record has" in rows["sources"]["detail"]
    code, out, rows = validate([*args, "data.batch_by_source=true", "--batch_size", "32"], tmp_path, capsys)
    assert rows["sources"]["status"] == WARN and "source 'faq' has 20 training pair(s)" in rows["sources"]["detail"]


def test_validate_lists_the_steps_hard_negatives_are_mined_at(tiny_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(80))
    args = args_for(tiny_model, data, tmp_path, "data.eval_fraction=0", "--epochs", "2",
                    "train.hard_negatives={every_n_steps: 2, every_epoch: true}")
    code, out, rows = validate(args, tmp_path, capsys)
    # 80 pairs in batches of 16: 5 steps an epoch, 10 in all; rounds before step 1, every 2 steps
    # and at the second epoch's start, none after the last step.
    assert code == 0 and rows["hard negatives"]["data"]["rounds"] == [0, 2, 4, 5, 6, 8]


def test_validate_indexes_the_files_where_the_run_then_reads_them(tiny_model: Path, qa_file: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """With data.order=indexed, validate's pass over the data builds the index, so the training
    job (on GPUs, say) starts from it rather than reading every record first."""
    args = args_for(tiny_model, qa_file, tmp_path, "data.order=indexed", "train.max_steps=2")
    code, out, rows = validate(args, tmp_path, capsys)
    assert code == 0, out
    index = rows["index"]["data"]
    assert index["built"] == index["files"] == 1 and index["pairs"] == rows["records"]["data"]["train"]
    assert index["folder"] == str(tmp_path / "out" / "data_index")
    trainer = Trainer(parse_args(args))
    trainer.setup()
    try:
        assert trainer.index.built == 0 and trainer.index.total == index["pairs"]  # read, not built again
    finally:
        trainer.lock.release()
    assert validate(args, tmp_path, capsys)[2]["index"]["data"]["built"] == 0
