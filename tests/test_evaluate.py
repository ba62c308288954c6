"""The retrieval evaluator: its metrics against sentence-transformers' own, BEIR files, per-source
metrics, and the `embedtune eval` command against the evaluation that training runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl

from embedtune.commands.eval import main
from embedtune.data.records import DataError
from embedtune.retrieval import RetrievalSet, metrics_from_scores, paired_change, query_metrics

WORDS = ["apple", "river", "engine", "violin", "glacier", "pepper", "compass", "lantern", "harbor", "meadow"]


def beir_files(tmp_path: Path, n_queries: int = 24, n_docs: int = 60, seed: int = 0) -> tuple[Path, Path, Path,
                                                                                                dict]:
    rng = random.Random(seed)
    docs = {f"d{i}": " ".join(rng.choices(WORDS, k=8)) + f" doc {i}" for i in range(n_docs)}
    queries, qrels = {}, {}
    for q in range(n_queries):
        picked = rng.sample(sorted(docs), rng.choice([1, 1, 2, 3]))
        queries[f"q{q}"] = " ".join(docs[picked[0]].split()[:3]) + f" {rng.choice(WORDS)}?"
        qrels[f"q{q}"] = picked
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": k, "text": v, "source": "odd" if int(k[1:]) % 2 else "even"}
                                             for k, v in queries.items()])
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": k, "title": "", "text": v} for k, v in docs.items()])
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, ds in qrels.items() for d in ds]
    (tmp_path / "qrels.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "queries.jsonl", tmp_path / "corpus.jsonl", tmp_path / "qrels.tsv", \
        {"queries": queries, "corpus": docs, "qrels": qrels}


def test_metrics_by_hand() -> None:
    # Relevant documents 2 and 5; the ranking puts them 2nd and 4th.
    m = query_metrics([7, 2, 9, 5, 1], {2, 5}, k=10)
    assert m["mrr@10"] == pytest.approx(1 / 2)
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / torch.log2(torch.tensor(3.0)) + 1 / torch.log2(torch.tensor(5.0)))
                                         .item() / (1 + 1 / torch.log2(torch.tensor(3.0)).item()))
    assert m["recall@1"] == 0 and m["recall@10"] == 1
    # A relevant document past the cutoff counts for nothing in MRR@k and nDCG@k.
    late = query_metrics(list(range(20)), {15}, k=10)
    assert late["mrr@10"] == late["ndcg@10"] == late["recall@10"] == 0 and late["recall@100"] == 1
    assert late["map@100"] == pytest.approx(1 / 16)


def test_the_same_metrics_as_sentence_transformers(tiny_model: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from embedtune.model.encoder import EmbeddingModel

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model))
    st_dir = tmp_path / "st"
    model.save_sentence_transformer(str(st_dir), tokenizer, max_seq_length=64)
    q, c, r, raw = beir_files(tmp_path)
    assert main([str(st_dir), "--queries", str(q), "--corpus", str(c), "--qrels", str(r), "--json",
                 str(tmp_path / "m.json"), "--query-max-length", "64", "--document-max-length", "64"]) == 0
    ours = json.loads((tmp_path / "m.json").read_text())["metrics"]

    evaluator = InformationRetrievalEvaluator(raw["queries"], raw["corpus"], {k: set(v) for k, v in raw["qrels"].items()},
                                              accuracy_at_k=[1], precision_recall_at_k=[1, 10, 100], mrr_at_k=[10],
                                              ndcg_at_k=[10], map_at_k=[100], show_progress_bar=False)
    theirs = evaluator(SentenceTransformer(str(st_dir), device="cpu"))
    for name in ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100"):
        [key] = [k for k in theirs if k.endswith(f"cosine_{name}")]
        assert ours[name] == pytest.approx(theirs[key], abs=1e-5), name
    assert 0 < ours["ndcg@10"] < 1  # a random model: neither trivial nor hopeless
    # Per source: the two halves average back to the whole.
    assert (ours["odd/ndcg@10"] + ours["even/ndcg@10"]) / 2 == pytest.approx(ours["ndcg@10"])


def test_beir_files_are_checked_line_by_line(tmp_path: Path) -> None:
    q, c, r, _ = beir_files(tmp_path)
    data = RetrievalSet.from_files(str(q), str(c), str(r))
    assert len(data) == 24 and len(data.corpus) == 60 and set(data.sources) == {"odd", "even"}
    # A judgement about an unknown document names the qrels line.
    (tmp_path / "bad.tsv").write_text(r.read_text() + "q1\tnowhere\t1\n")
    lines = len(r.read_text().splitlines()) + 1
    with pytest.raises(DataError, match=rf"bad.tsv:{lines}: corpus id 'nowhere'"):
        RetrievalSet.from_files(str(q), str(c), str(tmp_path / "bad.tsv"))
    # Queries judged only irrelevant (score 0) are left out.
    (tmp_path / "zero.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t0\nq1\td1\t1\n")
    assert len(RetrievalSet.from_files(str(q), str(c), str(tmp_path / "zero.tsv"))) == 1
    (tmp_path / "dup.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n')
    with pytest.raises(DataError, match="dup.jsonl:2: id 'd1' appears twice"):
        RetrievalSet.from_files(str(q), str(tmp_path / "dup.jsonl"), str(r))


def test_chunked_scoring_matches_the_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    import embedtune.retrieval as ev

    torch.manual_seed(0)
    queries, corpus = torch.randn(50, 8), torch.randn(300, 8)
    relevant = [{random.Random(i).randrange(300)} for i in range(50)]
    full = metrics_from_scores(torch.nn.functional.normalize(queries, dim=-1)
                               @ torch.nn.functional.normalize(corpus, dim=-1).T, relevant)
    monkeypatch.setattr(ev, "SCORE_CHUNK", 7)
    _, indices = ev.score_and_rank(queries, corpus, 100)
    assert ev.metrics_from_ranking(indices, relevant)[0] == pytest.approx(full)


def test_eval_command_gives_the_numbers_training_reports(train_args: list[str], tmp_path: Path) -> None:
    from embedtune.commands.train import main as train_main

    out = Path(train_args[train_args.index("--output_dir") + 1])
    assert train_main(train_args + ["train.max_steps=1", "tracking.report_to=none"]) == 0
    before = json.loads((out / "training_progress.json").read_text())["eval_before"]
    qa = train_args[train_args.index("--input_jsonl") + 1]
    model = train_args[train_args.index("--base_model") + 1]
    assert main([model, "--qa", qa, "--held-out", "0.2", "--query-max-length", "24", "--document-max-length", "32",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == pytest.approx(before, abs=1e-5)


def test_eval_command_explains_bad_input(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_jsonl(tmp_path / "qa.jsonl", make_pairs(5) + ["{not json"])
    assert main([str(tiny_model), "--qa", str(good)]) == 1
    assert f"{good}, line 6: not valid JSON" in capsys.readouterr().err
    assert main([str(tiny_model), "--qa", str(good), "--on-bad-record", "skip", "--examples", "0"]) == 0
    assert "5 queries, 5 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tiny_model)])  # no data given


def test_eval_command_reads_each_questions_own_instruction_as_training_does(
        tiny_model: Path, tmp_path: Path) -> None:
    from embedtune.commands.train import main as train_main

    records = [{**p, "instruction": f"find the {p['question'].split()[2]} story: "} for p in make_pairs(120)]
    qa = str(write_jsonl(tmp_path / "qa.jsonl", records))
    out = tmp_path / "out"
    assert train_main(["--input_jsonl", qa, "--base_model", str(tiny_model), "--output_dir", str(out),
                       "data.num_workers=0", "data.query_max_length=24", "data.document_max_length=32",
                       "data.eval_fraction=0.2", "data.prompt_field=instruction", "train.max_steps=1",
                       "tracking.report_to=none"]) == 0
    before = json.loads((out / "training_progress.json").read_text())["eval_before"]
    common = [str(tiny_model), "--qa", qa, "--held-out", "0.2", "--query-max-length", "24",
              "--document-max-length", "32", "--examples", "0", "--json"]
    assert main(common + [str(tmp_path / "own.json"), "--prompt-field", "instruction"]) == 0
    assert main(common + [str(tmp_path / "none.json")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())["metrics"]
    assert own == pytest.approx(before, abs=1e-5)
    assert json.loads((tmp_path / "none.json").read_text())["metrics"] != pytest.approx(before, abs=1e-5)


def test_the_paired_change_and_its_interval() -> None:
    before = [0.2, 0.5, 0.4, 0.9, 0.1, 0.3] * 20
    better = [b + 0.1 + 0.05 * (i % 3) for i, b in enumerate(before)]
    change = paired_change(before, better)
    assert change["change"] == pytest.approx(0.15) and 0.1 < change["low"] < 0.15 < change["high"] < 0.2
    assert (change["better"], change["worse"], change["same"], change["queries"]) == (120, 0, 0, 120)
    same = paired_change(before, before)
    assert (same["change"], same["low"], same["high"], same["same"]) == (0, 0, 0, 120)
    mixed = paired_change([0.5] * 100, [0.6] * 50 + [0.4] * 50)  # no change on average: 0 inside
    assert mixed["low"] < 0 < mixed["high"] and (mixed["better"], mixed["worse"]) == (50, 50)
    assert paired_change(before, better) == change  # seeded: the same interval every time
    with pytest.raises(ValueError, match="the same queries"):
        paired_change(before, better[:-1])
