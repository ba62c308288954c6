"""Hard-negative mining: the ranking and its guards on known scores, then real runs on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from test_score import alone, cross_encoder, new_console  # noqa: F401 (fixtures)

from embedtune.commands.mine import main
from embedtune.data.records import text_key
from embedtune.mining.negatives import Selection, choose_negatives, search
from embedtune.model.folder import read_model_folder

# Hand-made scores: with one-hot documents, a query's row of "embedding" is its row of scores.
# Document 0 is the answer (0.90); 1 scores above it, 2 just below, then a falling tail.
SCORES = [0.90, 0.95, 0.88, 0.80, 0.70, 0.60, 0.50, 0.40]


def ranked(rows: list[list[float]], positives: list[int], excluded: list[set[int]] | None = None,
           corpus_chunk: int = 3, backend: str = "torch", **selection) -> list[list[int]]:
    queries = torch.tensor(rows, dtype=torch.float32)
    corpus = torch.eye(queries.shape[1])
    excluded = excluded or [{p} for p in positives]
    chosen, positive = choose_negatives(queries, corpus, positives, excluded, Selection(**selection),
                                        corpus_chunk, backend)
    assert positive == pytest.approx([row[p] for row, p in zip(rows, positives)])
    return chosen


@pytest.mark.parametrize("selection, expected", [
    ({"num_negatives": 3}, [1, 2, 3]),
    ({"num_negatives": 3, "skip_top": 2}, [3, 4, 5]),
    ({"num_negatives": 3, "margin": 0.05}, [3, 4, 5]),  # below 0.85: 0.95 and 0.88 are too close
    ({"num_negatives": 3, "margin": 0.15}, [4, 5, 6]),  # below 0.75
    ({"num_negatives": 3, "relative_margin": 0.2}, [4, 5, 6]),  # below 0.72
    ({"num_negatives": 3, "relative_margin": 0.1}, [3, 4, 5]),  # below 0.81
    # The skip counts ranks before the margin: 1, 2, 3, 4 are passed over, then 5, 6, 7 are below 0.85.
    ({"num_negatives": 3, "skip_top": 4, "margin": 0.05}, [5, 6, 7]),
    ({"num_negatives": 3, "margin": 0.45}, [7]),  # only 0.40 is below 0.45: fewer than asked
    ({"num_negatives": 20}, [1, 2, 3, 4, 5, 6, 7]),  # the corpus runs out
])
def test_selection_on_known_scores(selection: dict, expected: list[int]) -> None:
    assert ranked([SCORES], [0], **selection) == [expected]


def test_the_answer_and_its_duplicates_are_never_negatives() -> None:
    # Document 2 has the answer's normalized text; a second query's answer is document 1.
    rows = [SCORES, [0.1, 0.9, 0.3, 0.2, 0.8, 0.0, 0.0, 0.0]]
    assert ranked(rows, [0, 1], excluded=[{0, 2}, {1}], num_negatives=3) == [[1, 3, 4], [4, 2, 3]]


def test_equal_scores_rank_by_corpus_row_and_chunking_changes_nothing() -> None:
    rows = [[0.9, 0.5, 0.7, 0.7, 0.2, 0.1]]
    for chunk in (1, 2, 4, 100):
        assert ranked(rows, [0], corpus_chunk=chunk, num_negatives=3) == [[2, 3, 1]]
        assert ranked(rows, [0], corpus_chunk=chunk, num_negatives=3, skip_top=1) == [[3, 1, 4]]


def test_a_margin_search_goes_deeper_than_the_first_pool() -> None:
    # 50 documents score above the answer (0.5): the negatives below the margin rank 52nd and lower.
    row = [0.5] + [0.9 - i * 0.001 for i in range(50)] + [0.3, 0.2, 0.1]
    assert ranked([row], [0], num_negatives=2, margin=0.1) == [[51, 52]]
    assert ranked([row], [0], num_negatives=2, margin=0.1, max_candidates=10) == [[]]  # too deep: counted short
    assert ranked([row], [0], num_negatives=2) == [[1, 2]]


def test_faiss_and_torch_pick_the_same_negatives() -> None:
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(500, 16, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(corpus[:40] + 0.5 * torch.randn(40, 16, generator=gen), dim=-1)
    positives = list(range(40))
    excluded = [{i, (i * 7) % 500} for i in positives]
    for selection in (Selection(5), Selection(4, skip_top=2, margin=0.05), Selection(3, relative_margin=0.1)):
        results = {}
        for backend in ("torch", "faiss"):
            results[backend] = choose_negatives(queries, corpus, positives, excluded, selection, 64, backend)[0]
        assert results["faiss"] == results["torch"]
        assert all(len(rows) == selection.num_negatives for rows in results["torch"])
    scores, ids = search(queries, corpus, 10, 37, "faiss")
    expected = (queries @ corpus.T).topk(10, dim=1)
    assert torch.equal(ids, expected.indices) and torch.allclose(scores, expected.values, atol=1e-5)


# --- real runs -------------------------------------------------------------------------------


def run(tiny_model: Path, input_file: Path, output: Path, *extra: str) -> int:
    return main(["--model", str(tiny_model), "--input", str(input_file), "--output", str(output),
                 "--query-max-length", "24", "--document-max-length", "32", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_duplicates_and_other_answers_to_the_same_question_are_left_out(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = make_pairs(8)
    records.append({"question": "  " + records[0]["question"].upper(), "answer": "another answer to it", "id": 8})
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        {"text": records[1]["answer"].upper() + " "},  # the same text as an answer, normalized
        {"_id": "g", "title": "Glossary", "text": "apple: a fruit"},
        {"text": "something else entirely"},
    ])
    out = tmp_path / "mined.jsonl"
    # More negatives than documents: every document that may be a negative is one.
    assert run(tiny_model, qa, out, "--corpus", str(docs), "--num-negatives", "50", "--backend", "torch") == 0
    mined = read_jsonl(out)
    corpus = {r["answer"] for r in records} | {"Glossary apple: a fruit", "something else entirely"}
    for record in mined:
        negatives = record["negatives"]
        assert len(set(negatives)) == len(negatives) and set(negatives) <= corpus
        assert text_key(record["answer"]) not in {text_key(n) for n in negatives}
    assert set(mined[0]["negatives"]) == corpus - {records[0]["answer"], "another answer to it"}
    assert set(mined[8]["negatives"]) == set(mined[0]["negatives"])
    assert set(mined[1]["negatives"]) == corpus - {records[1]["answer"]}
    printed = capsys.readouterr().out
    assert "mined 9 records against 11 documents (9 answers, 2 extra)" in printed
    assert "9 records got fewer than 50: 0 because of the margin, 9 because the corpus" in printed


def test_mined_file_keeps_every_record_and_the_trainer_takes_it(
        tiny_model: Path, qa_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedtune.commands.train import main as train_main
    from embedtune.data.collate import PairCollator

    records = read_jsonl(qa_file)
    records[5]["negatives"] = ["an old negative"]  # replaced by the mined ones
    records[7]["extra"] = {"nested": [1, 2.5, None], "text": "caf\u00e9"}
    qa = write_jsonl(tmp_path / "qa_in.jsonl", records)
    out = tmp_path / "mined.jsonl"
    assert run(tiny_model, qa, out, "--num-negatives", "3", "--skip-top", "1", "--backend", "torch") == 0
    mined = read_jsonl(out)
    assert len(mined) == len(records)
    for before, after in zip(records, mined):
        negatives = after.pop("negatives")
        assert after == {k: v for k, v in before.items() if k != "negatives"}
        assert list(after) == [k for k in before if k != "negatives"]  # field order too
        assert len(negatives) == 3 and all(isinstance(n, str) and n != before["answer"] for n in negatives)

    seen = []
    original = PairCollator.__call__

    def spy(self, pairs):
        seen.extend(len(p.negatives) for p in pairs)
        return original(self, pairs)

    monkeypatch.setattr(PairCollator, "__call__", spy)
    train_out = tmp_path / "train"
    args = ["--input_jsonl", str(out), "--base_model", str(tiny_model), "--output_dir", str(train_out),
            "--batch_size", "8", "data.num_workers=0", "data.query_max_length=24", "data.document_max_length=32",
            "train.max_steps=2", "tracking.report_to=none", "eval.before=false", "data.eval_fraction=0",
            "data.negatives_field=negatives", "checkpoint.every_n_steps=null"]
    assert train_main(args) == 0
    progress = json.loads((train_out / "training_progress.json").read_text())
    assert progress["completed"] and progress["step"] == 2
    assert seen and set(seen) == {3}


def test_small_chunks_give_the_same_file_as_one_chunk(tiny_model: Path, tmp_path: Path) -> None:
    qa = write_jsonl(tmp_path / "qa.jsonl", make_pairs(40, seed=3))
    whole, chunked = tmp_path / "whole.jsonl", tmp_path / "chunked.jsonl"
    common = ["--num-negatives", "4", "--skip-top", "1", "--relative-margin", "0.0001", "--backend", "torch"]
    assert run(tiny_model, qa, whole, *common) == 0
    assert run(tiny_model, qa, chunked, *common, "--chunk-size", "7", "--corpus-chunk-size", "5",
               "--batch-size", "3") == 0
    assert chunked.read_bytes() == whole.read_bytes()


def test_faiss_and_torch_runs_write_the_same_file(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    qa = write_jsonl(tmp_path / "qa.jsonl", make_pairs(40, seed=4))
    outputs = {}
    for backend in ("torch", "faiss"):
        outputs[backend] = tmp_path / f"{backend}.jsonl"
        assert run(tiny_model, qa, outputs[backend], "--num-negatives", "4", "--backend", backend,
                   "--dtype", "float32") == 0
    assert outputs["faiss"].read_bytes() == outputs["torch"].read_bytes()


def test_a_margin_no_candidate_passes_leaves_records_short_and_counted(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    qa = write_jsonl(tmp_path / "qa.jsonl", make_pairs(12))
    out = tmp_path / "mined.jsonl"
    assert run(tiny_model, qa, out, "--num-negatives", "2", "--margin", "2", "--backend", "torch") == 0
    assert [r["negatives"] for r in read_jsonl(out)] == [[]] * 12
    assert "12 records got fewer than 2: 12 because of the margin, 0 because" in capsys.readouterr().out


@pytest.mark.parametrize("which, line, expected", [
    ("input", '{"question": "q", answer: "a"}', "line 3: not valid JSON"),
    ("input", '{"question": "q", "reply": "a"}', "line 3: no 'answer' field"),
    ("corpus", '{"title": "only a title"}', "line 3: no 'text' field"),
    ("corpus", '{"text": "one", "text": "two"}', "line 3: the key 'text' appears more than once"),
    ("input", '{"question": "q", "answer": "a", "answer": "b"}', "line 3: the key 'answer' appears more than once"),
])
def test_a_bad_record_is_named_by_file_and_line_and_nothing_is_written(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, which: str, line: str,
        expected: str) -> None:
    good = [json.dumps(r) for r in make_pairs(4)]
    qa = write_jsonl(tmp_path / "qa.jsonl", good[:2] + ([line] if which == "input" else []) + good[2:])
    docs = write_jsonl(tmp_path / "docs.jsonl", ['{"text": "a"}', "", line] if which == "corpus" else ['{"text": "a"}'])
    out = tmp_path / "out" / "mined.jsonl"
    out.parent.mkdir()
    out.write_text("an earlier result\n")
    assert run(tiny_model, qa, out, "--corpus", str(docs)) == 1
    bad = qa if which == "input" else docs
    assert f"{bad}, {expected}" in capsys.readouterr().err
    assert out.read_text() == "an earlier result\n"  # untouched, and no temp file left beside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["mined.jsonl"]


def test_the_input_is_never_overwritten_and_options_are_checked(
        tiny_model: Path, qa_file: Path, capsys: pytest.CaptureFixture) -> None:
    before = qa_file.read_bytes()
    assert run(tiny_model, qa_file, qa_file) == 1
    assert "is an input file" in capsys.readouterr().err
    assert qa_file.read_bytes() == before
    assert run(tiny_model, qa_file, qa_file.with_name("x.jsonl"), "--margin", "0.1", "--relative-margin", "0.1") == 2
    assert run(tiny_model, qa_file, qa_file.with_name("x.jsonl"), "--num-negatives", "0") == 2
    assert not qa_file.with_name("x.jsonl").exists()


def test_a_saved_model_folder_supplies_its_prompts(tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import embedtune.mining.run as mine
    from embedtune.model.encoder import EmbeddingModel

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model))
    folder = tmp_path / "final_model"
    model.save_sentence_transformer(str(folder), tokenizer, 48, prompts={"query": "query: ", "document": "passage: "})
    saved, plain = read_model_folder(str(folder)), read_model_folder(str(tiny_model))
    assert (saved.query_prompt, saved.document_prompt, saved.max_seq_length) == ("query: ", "passage: ", 48)
    assert (plain.query_prompt, plain.document_prompt, plain.max_seq_length) == ("", "", 512)  # the tokenizer's limit

    used = []

    class Recording(mine.PairCollator):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            used.append(args[1:])

    monkeypatch.setattr(mine, "PairCollator", Recording)
    qa = write_jsonl(tmp_path / "qa.jsonl", make_pairs(6))
    assert main(["--model", str(folder), "--input", str(qa), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main(["--model", str(folder), "--input", str(qa), "--output", str(tmp_path / "b.jsonl"),
                 "--query-prefix", "", "--document-max-length", "16"]) == 0
    assert used == [(48, 48, "query: ", "passage: "), (48, 16, "", "passage: ")]


def test_random_texts_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    """Unicode, quotes and newlines in the texts come back unchanged through the spool."""
    rng = random.Random(1)
    alphabet = "abc \"\\\n\té😀ü\u2028"
    records = [{"question": f"q{i} " + "".join(rng.choices(alphabet, k=12)),
                "answer": f"a{i} " + "".join(rng.choices(alphabet, k=30))} for i in range(10)]
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    out = tmp_path / "mined.jsonl"
    assert run(tiny_model, qa, out, "--num-negatives", "9", "--backend", "torch") == 0
    answers = {r["answer"] for r in records}
    for record in read_jsonl(out):
        assert set(record["negatives"]) == answers - {record["answer"]}


def test_held_out_records_get_no_negatives_and_lend_none(tiny_model: Path, tmp_path: Path) -> None:
    from embedtune.data.records import Pair, is_held_out

    records = make_pairs(60, seed=4)
    source = write_jsonl(tmp_path / "qa.jsonl", records)
    assert run(tiny_model, source, tmp_path / "out.jsonl", "--held-out", "0.3", "--num-negatives", "3") == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["question"] for r in out] == [r["question"] for r in records]  # input order kept
    held = [is_held_out(Pair("", r["question"], r["answer"]), 0.3) for r in records]
    assert 5 < sum(held) < 40
    held_answers = {r["answer"] for r, h in zip(records, held) if h}
    for row, h in zip(out, held):
        assert (row["negatives"] == []) if h else (len(row["negatives"]) == 3)
        assert not held_answers & set(row["negatives"])


# --- with a teacher --------------------------------------------------------------------------


def test_a_teacher_scores_the_mined_negatives_and_changes_none_of_them(
        tiny_model: Path, cross_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    from embedtune.data.records import Pair, is_held_out

    records = make_pairs(30, seed=6)
    held = [is_held_out(Pair("", r["question"], r["answer"]), 0.3) for r in records]
    kept_at, held_at = held.index(False), held.index(True)
    records[kept_at]["scores"] = [0.5]  # stale scores: replaced in place
    records[kept_at]["after"] = 1
    records[held_at]["scores"] = [0.5, 0.4]  # they scored negatives the held-out record no longer has
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    common = ["--num-negatives", "3", "--held-out", "0.3", "--backend", "torch", "--chunk-size", "7"]
    assert run(tiny_model, qa, tmp_path / "plain.jsonl", *common) == 0
    # Without a teacher, scores of the negatives being replaced would train as the new ones': left out.
    assert not any("scores" in r for r in read_jsonl(tmp_path / "plain.jsonl"))
    assert "2 records had teacher scores in 'scores', which scored the negatives replaced" in capsys.readouterr().out
    assert run(tiny_model, qa, tmp_path / "scored.jsonl", *common, "--teacher", str(cross_encoder)) == 0
    printed = capsys.readouterr().out

    plain, scored = read_jsonl(tmp_path / "plain.jsonl"), read_jsonl(tmp_path / "scored.jsonl")
    assert [r["negatives"] for r in scored] == [r["negatives"] for r in plain]  # no ratio: the same negatives
    for record, h in zip(scored, held):
        if h:
            assert record["negatives"] == [] and "scores" not in record
        else:
            assert len(record["negatives"]) == 3
            texts = [record["answer"], *record["negatives"]]
            assert record["scores"] == pytest.approx(alone(cross_encoder, record["question"], texts), rel=1e-5,
                                                     abs=1e-6)
    assert list(scored[kept_at]) == list(records[kept_at]) + ["negatives"]  # the scores stay where they were
    negatives = [s for r in scored if "scores" in r for s in r["scores"][1:]]
    positives = [r["scores"][0] for r in scored if "scores" in r]
    assert (f"mean teacher score: {sum(positives) / len(positives):.4f} for the positives, "
            f"{sum(negatives) / len(negatives):.4f} for the {len(negatives)} negatives") in printed
    assert "the teacher dropped" not in printed


@pytest.mark.parametrize("teacher", ["cross-encoder", "embedding"])
def test_a_teacher_max_ratio_drops_exactly_the_candidates_above_it(
        tiny_model: Path, cross_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,  # noqa: F811
        teacher: str) -> None:
    records = make_pairs(24, seed=7)
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    # Copy-like documents: the first questions themselves, which the embedding teacher scores at 1.
    copies = [r["question"] for r in records[:6]]
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in copies])
    model = cross_encoder if teacher == "cross-encoder" else tiny_model
    common = ["--corpus", str(docs), "--backend", "torch", "--dtype", "float32", "--teacher", str(model)]

    # Every candidate in the miner's order, with the teacher's score of each.
    assert run(tiny_model, qa, tmp_path / "all.jsonl", *common, "--num-negatives", "1000") == 0
    ranked = read_jsonl(tmp_path / "all.jsonl")
    if teacher == "embedding":
        ratio = 1.0  # above the positive: the copies, and whatever else the teacher puts above the answer
    else:  # the middle of the widest gap among the middle ratios: float rounding cannot move a candidate across
        ratios = sorted(s / r["scores"][0] for r in ranked for s in r["scores"][1:])
        third = len(ratios) // 3
        ratio = max((b - a, (a + b) / 2) for a, b in zip(ratios[third:2 * third], ratios[third + 1:]))[1]
    capsys.readouterr()
    assert run(tiny_model, qa, tmp_path / "vetted.jsonl", *common, "--num-negatives", "3",
               "--teacher-max-ratio", repr(ratio)) == 0
    printed = capsys.readouterr().out

    dropped, deeper = 0, 0
    vetted = read_jsonl(tmp_path / "vetted.jsonl")
    for full, mined in zip(ranked, vetted):
        positive = full["scores"][0]
        # The first pool holds twice the negatives asked: a record that loses more needs a deeper search.
        deeper += sum(s > ratio * positive for s in full["scores"][1:7]) > 3
        kept = []
        for text, score in zip(full["negatives"], full["scores"][1:]):
            if score > ratio * positive:
                dropped += 1
            else:
                kept.append((text, score))
                if len(kept) == 3:
                    break
        assert mined["negatives"] == [text for text, _ in kept]
        assert mined["scores"] == pytest.approx([positive] + [score for _, score in kept], rel=1e-5, abs=1e-6)
    assert dropped > 0 and (deeper > 0 or teacher == "embedding")
    assert f"the teacher dropped {dropped} candidates scored above {ratio:g} x the positive's score" in printed
    if teacher == "embedding":
        # A question's copy was the miner's first candidate for it; the teacher dropped it there.
        for full, mined, question in zip(ranked, vetted, copies):
            assert full["negatives"][0] == question and question not in mined["negatives"]


def test_teacher_options_and_records_are_checked(tiny_model: Path, cross_encoder: Path, qa_file: Path,  # noqa: F811
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mined.jsonl"
    assert run(tiny_model, qa_file, out, "--teacher-max-ratio", "0.95") == 2  # no teacher
    assert run(tiny_model, qa_file, out, "--teacher", str(cross_encoder), "--teacher-max-ratio", "0") == 2
    assert run(tiny_model, qa_file, out, "--teacher-logits") == 2  # no teacher
    assert run(tiny_model, qa_file, out, "--teacher", str(cross_encoder), "--teacher-logits",
               "--teacher-max-ratio", "0.95") == 2  # a ratio of logits
    capsys.readouterr()
    pairs = make_pairs(3)
    clash = write_jsonl(tmp_path / "clash.jsonl", [pairs[0], pairs[1], {**pairs[2], "scores": 0.9}])
    cases = [
        (["--teacher", str(tmp_path / "nowhere")], qa_file, "not a model folder here"),
        (["--teacher", str(cross_encoder), "--scores-field", "negatives"], qa_file, "--scores-field 'negatives'"),
        (["--teacher", str(cross_encoder)], clash, f"bad record: {clash}, line 3: 'scores' is a field of this"),
    ]
    for extra, source, expected in cases:
        assert run(tiny_model, source, out, *extra) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (expected, errors)
        assert not out.exists()
