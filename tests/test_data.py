"""Streaming reads: bad input is named, order is fixed by (data, seed, epoch), held-out stays out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_pairs, write_jsonl

from embedtune.config import DataConfig
from embedtune.data import DataError, PairBatches, eval_pairs, is_held_out, make_loader, ordered_pairs, preflight


def no_tokenize(pairs: list) -> dict:
    return {}


def batch_ids(cfg: DataConfig, workers: int, epoch: int = 0, batch_size: int = 8, accumulation: int = 1) -> list[list[str]]:
    dataset = PairBatches(cfg, batch_size, accumulation, seed=3, collate=no_tokenize)
    dataset.set_epoch(epoch)
    return [batch["ids"] for batch in make_loader(dataset, workers, pin_memory=False)]


def ids_of(path: Path, cfg: DataConfig) -> set[str]:
    return {f"{path}:{i + 1}" for i in range(len(path.read_text().splitlines()))}


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", "", "the file is empty"),
    ("notjson.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q2", answer: a}\n', "line 2: not valid JSON"),
    ("nofield.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q2", "reply": "a"}\n',
     "line 2: no 'answer' field"),
    ("emptytext.jsonl", '{"question": "  ", "answer": "a"}\n', "line 1: 'question' must be a non-empty string"),
    ("array.jsonl", '["q", "a"]\n', "line 1: expected a JSON object"),
    ("latin1.jsonl", b'{"question": "caf\xe9", "answer": "a"}\n', "line 1: not valid UTF-8"),
])
def test_bad_input_stops_before_training_naming_file_line_and_fix(tmp_path: Path, name: str, content, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        preflight(DataConfig(train_files=[str(path)]))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        preflight(DataConfig(train_files=[str(tmp_path / "nowhere.jsonl")]))


def test_skip_policy_keeps_going_and_reports_every_bad_record(tmp_path: Path) -> None:
    records = make_pairs(20)
    lines = [json.dumps(r) for r in records]
    lines[3] = "{broken"
    lines[11] = json.dumps({"question": "only a question"})
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    cfg = DataConfig(train_files=[str(path)], on_bad_record="skip", eval_fraction=0)
    assert [r.line for r in preflight(cfg)] == [4, 12]
    dataset = PairBatches(cfg, 6, 1, seed=0, collate=no_tokenize)
    batches = list(make_loader(dataset, 0, pin_memory=False))
    assert sorted(r.line for b in batches for r in b["rejects"]) == [4, 12]
    assert sum(len(b["ids"]) for b in batches) == 18


@pytest.mark.parametrize("accumulation", [1, 2])
def test_order_is_the_same_with_any_number_of_workers_and_covers_the_epoch_once(qa_file: Path, accumulation: int) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], shuffle_buffer=16, eval_fraction=0.2)
    reference = batch_ids(cfg, workers=0, accumulation=accumulation)
    assert batch_ids(cfg, workers=2, accumulation=accumulation) == reference
    flat = [i for b in reference for i in b]
    assert len(flat) == len(set(flat))
    expected = {f"{qa_file}:{n + 1}" for n, r in enumerate(make_pairs(120))}
    held = {p.id for p in eval_pairs(cfg)}
    assert set(flat) == expected - held


def test_epochs_reshuffle_and_seed_fixes_the_order(qa_file: Path) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], shuffle_buffer=32, eval_fraction=0)
    first, second = batch_ids(cfg, 0, epoch=0), batch_ids(cfg, 0, epoch=1)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    assert batch_ids(cfg, 0, epoch=0) == first
    unshuffled = DataConfig(train_files=[str(qa_file)], shuffle=False, eval_fraction=0)
    assert sum(batch_ids(unshuffled, 0), []) == [f"{qa_file}:{n}" for n in range(1, 121)]


def test_held_out_pairs_never_reach_training(qa_file: Path) -> None:
    cfg = DataConfig(train_files=[str(qa_file)], eval_fraction=0.25)
    held = eval_pairs(cfg)
    assert 15 <= len(held) <= 45 and all(is_held_out(p, 0.25) for p in held)
    trained = {p.query for p in ordered_pairs(cfg, seed=0, epoch=0)}
    assert trained.isdisjoint({p.query for p in held})


def test_last_partial_batch_is_kept_or_dropped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", make_pairs(21))
    kept = batch_ids(DataConfig(train_files=[str(path)], eval_fraction=0), 0, batch_size=8)
    assert [len(b) for b in kept] == [8, 8, 5]
    dropped = batch_ids(DataConfig(train_files=[str(path)], eval_fraction=0, drop_last=True), 0, batch_size=8)
    assert [len(b) for b in dropped] == [8, 8]


def test_parquet_csv_and_file_urls_give_the_same_pairs(tmp_path: Path) -> None:
    import datasets

    records = [{"question": r["question"], "answer": r["answer"]} for r in make_pairs(12)]
    jsonl = write_jsonl(tmp_path / "p.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "p.csv"), index=False)

    def pairs(path: str) -> list[tuple[str, str]]:
        cfg = DataConfig(train_files=[path], shuffle=False, eval_fraction=0)
        return [(p.query, p.positive) for p in ordered_pairs(cfg, 0, 0)]

    expected = [(r["question"], r["answer"]) for r in records]
    assert pairs(str(tmp_path / "p.parquet")) == expected
    assert pairs(str(tmp_path / "p.csv")) == expected
    assert pairs(jsonl.resolve().as_uri()) == expected


def test_hard_negatives_list_or_single_string_capped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [
        {"question": "q1", "answer": "a1", "neg": ["n1", "n2", "n3"]},
        {"question": "q2", "answer": "a2", "neg": "n4"},
        {"question": "q3", "answer": "a3"}])
    cfg = DataConfig(train_files=[str(path)], negatives_field="neg", max_negatives=2, shuffle=False, eval_fraction=0)
    assert [p.negatives for p in ordered_pairs(cfg, 0, 0)] == [("n1", "n2"), ("n4",), ()]


def test_an_eval_file_is_used_as_is_and_nothing_is_carved_from_training(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", make_pairs(30))
    held = write_jsonl(tmp_path / "eval.jsonl", make_pairs(7, seed=5))
    cfg = DataConfig(train_files=[str(train)], eval_files=[str(held)], eval_fraction=0.5)
    assert [p.query for p in eval_pairs(cfg)] == [r["question"] for r in make_pairs(7, seed=5)]
    assert len(list(ordered_pairs(cfg, 0, 0))) == 30
