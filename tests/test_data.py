"""Streaming reads: bad input is named, order is fixed by (data, seed, epoch), held-out stays out."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import make_pairs, untokenized, write_jsonl

from embedtune.config import DataConfig
from embedtune.data.records import DataError, token_estimate
from embedtune.data.split import eval_pairs, is_held_out, preflight
from embedtune.data.stream import PairBatches, make_loader, ordered_pairs

no_tokenize = untokenized


def batch_ids(cfg: DataConfig, workers: int, epoch: int = 0, batch_size: int = 8, accumulation: int = 1) -> list[list[str]]:
    dataset = PairBatches(cfg, batch_size, accumulation, seed=3, collate=no_tokenize)
    dataset.set_epoch(epoch)
    return [batch.ids for batch in make_loader(dataset, workers, pin_memory=False)]


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


@pytest.mark.parametrize("group", [None, 2])
def test_skip_policy_keeps_going_and_reports_every_bad_record(tmp_path: Path, group: int | None) -> None:
    records = make_pairs(20)
    lines = [json.dumps(r) for r in records]
    lines[3] = "{broken"
    lines[11] = json.dumps({"question": "only a question"})
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    cfg = DataConfig(train_files=[str(path)], on_bad_record="skip", eval_fraction=0, group_by_length=group)
    assert [r.line for r in preflight(cfg)] == [4, 12]
    dataset = PairBatches(cfg, 6, 1, seed=0, collate=no_tokenize)
    batches = list(make_loader(dataset, 0, pin_memory=False))
    assert sorted(r.line for b in batches for r in b.rejects) == [4, 12]
    assert sum(len(b.ids) for b in batches) == 18


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


@pytest.mark.parametrize("group", [None, 2])
def test_last_partial_batch_is_kept_or_dropped(tmp_path: Path, group: int | None) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", make_pairs(21))
    kept = batch_ids(DataConfig(train_files=[str(path)], eval_fraction=0, group_by_length=group), 0, batch_size=8)
    assert [len(b) for b in kept] == [8, 8, 5]
    dropped = batch_ids(DataConfig(train_files=[str(path)], eval_fraction=0, drop_last=True, group_by_length=group),
                        0, batch_size=8)
    assert [len(b) for b in dropped] == [8, 8]
    assert set(sum(dropped, [])) < set(sum(kept, []))


def varied_pairs(n: int) -> list[dict]:
    """Answers from a few words to a few hundred characters long."""
    rng = random.Random(7)
    return [{**r, "answer": r["answer"] + " and then, more of it" * rng.randint(0, 20)} for r in make_pairs(n)]


def test_length_grouping_recuts_each_window_by_length_in_a_fixed_order(tmp_path: Path) -> None:
    records = varied_pairs(150)
    path = write_jsonl(tmp_path / "p.jsonl", records)
    answers = {f"{path}:{i + 1}": r["answer"] for i, r in enumerate(records)}
    plain_cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0)
    cfg = plain_cfg.model_copy(update={"group_by_length": 4})
    plain, grouped = batch_ids(plain_cfg, 0), batch_ids(cfg, 0)
    assert grouped != plain
    # The same batch sizes (the partial one last), and each window of 4 batches holds the pairs
    # of the stream's 4: grouping never moves a pair far from where the shuffle put it.
    assert [len(b) for b in grouped] == [len(b) for b in plain] == [8] * 18 + [6]
    for start in range(0, len(plain), 4):
        assert sorted(sum(grouped[start:start + 4], [])) == sorted(sum(plain[start:start + 4], []))
    # Within a window the batches' answer lengths do not overlap: each batch is one stretch of
    # the sorted lengths.
    for start in range(0, 16, 4):
        spans = sorted((min(lengths), max(lengths)) for lengths in
                       ([token_estimate(answers[i]) for i in batch] for batch in grouped[start:start + 4]))
        assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:]))
    # Fixed by (data, seed, epoch): workers do not change it, another epoch does.
    assert batch_ids(cfg, workers=2) == grouped
    other = batch_ids(cfg, 0, epoch=1)
    assert other != grouped and sorted(sum(other, [])) == sorted(sum(grouped, []))


def test_length_grouping_resumes_from_any_batch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", varied_pairs(100))
    cfg = DataConfig(train_files=[str(path)], shuffle_buffer=16, eval_fraction=0, group_by_length=3)
    full = batch_ids(cfg, 0)
    for done in (3, 4, 11):  # at a window's start and inside windows
        dataset = PairBatches(cfg, 8, 1, seed=3, collate=no_tokenize)
        dataset.set_position(0, done)
        assert [b.ids for b in make_loader(dataset, 2, pin_memory=False)] == full[done:]


def test_length_grouping_cuts_padding_on_real_data(tokenizer_dir: Path) -> None:
    """On the packaged Q&A set, documents padded per batch: a third of the tokens computed are
    real in shuffled batches, four fifths when batches are grouped by length."""
    from transformers import AutoTokenizer

    from embedtune.data.collate import PairCollator

    collate = PairCollator(AutoTokenizer.from_pretrained(tokenizer_dir), 64, 256)

    def efficiency(group: int | None) -> float:
        cfg = DataConfig(train_files=["embedtune:resources/python_docs_qa.jsonl.gz"], group_by_length=group)
        lengths = [b.document.lengths for b in make_loader(PairBatches(cfg, 64, 1, 0, collate), 0, False)]
        return sum(int(n.sum()) for n in lengths) / sum(len(n) * int(n.max()) for n in lengths)

    plain, grouped = efficiency(None), efficiency(16)
    assert plain < 0.4 and grouped > 0.75


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
