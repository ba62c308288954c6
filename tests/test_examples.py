"""Using a fine-tuned model: `embedtune search` and the runnable examples, on a tiny model trained
once with the quickstart recipe. What a user relies on: the hits are corpus texts, best first,
scored as sentence-transformers scores them with the model's prompts; the index is reused until
the model or the corpus changes; a bad input is one line that says what to fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_pairs, write_jsonl

from embedtune.cli import main as cli
from embedtune.commands.search import main as search
from embedtune.commands.train import main as train
from embedtune.data.records import Pair, is_held_out
from embedtune.examples import batch_search, qa_retrieval, semantic_search, similarity, vector_db

QUERY, DOCUMENT = "query: ", "passage: "  # the prefixes the run trains with, saved as the model's prompts
HELD_OUT = 0.1  # the quickstart's data.eval_fraction
HIT = re.compile(r"^\s+(\d+)\. (-?\d+\.\d{4})  (.*)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """The quickstart recipe on a tiny BERT and 200 learnable pairs, with query and document prefixes;
    3 steps leave it half trained, so some held-out questions miss their answer."""
    root = tmp_path_factory.mktemp("run")
    pairs = make_pairs(200)
    data = write_jsonl(root / "pairs.jsonl", pairs)
    out = root / "out"
    assert train(["--config", "quickstart", "--base_model", str(tiny_model), "--output_dir", str(out),
                  f"data.train_files=[{data}]", f"data.query_prefix={QUERY}", f"data.document_prefix={DOCUMENT}",
                  "data.query_max_length=24", "data.document_max_length=32", "data.num_workers=0",
                  "train.learning_rate=2e-3", "train.max_steps=3", "train.hard_negatives=null", "eval.before=false",
                  "tracking.report_to=none"]) == 0
    return {"out": out, "data": data, "pairs": pairs, "answers": [p["answer"] for p in pairs]}


@pytest.fixture(scope="module")
def model(run: dict):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(run["out"] / "final_model"), device="cpu")


def cosine(model, queries: list[str], documents: list[str]) -> torch.Tensor:
    """Brute force, with the prompts written out: (queries x documents) cosine similarities."""
    q = model.encode([QUERY + text for text in queries], convert_to_tensor=True)
    d = model.encode([DOCUMENT + text for text in documents], convert_to_tensor=True)
    return torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T


def held_out(pairs: list[dict]) -> list[dict]:
    return [p for p in pairs if is_held_out(Pair("", p["question"], p["answer"]), HELD_OUT)]


def printed_hits(out: str) -> dict[str, list[tuple[float, str]]]:
    """{question: [(score, text), ...]} from an example's output ("Q: ..." then "  1. 0.8123  text")."""
    hits: dict[str, list[tuple[float, str]]] = {}
    question = None
    for line in out.splitlines():
        if line.startswith("Q: "):
            question = line[3:]
            hits[question] = []
        elif (match := HIT.match(line)) and question is not None:
            hits[question].append((float(match[2]), match[3]))
    return hits


def assert_brute_force_hits(hits: dict[str, list[tuple[float, str]]], model, corpus: list[str], k: int) -> None:
    """Each question's hits are corpus texts, best first, the k best of a brute-force search (up to
    ties at the printed precision), each scored as brute force scores it."""
    assert hits and all(len(found) == k for found in hits.values())
    scores = cosine(model, list(hits), corpus)
    for row, (question, found) in zip(scores, hits.items()):
        texts = [text for _, text in found]
        assert set(texts) <= set(corpus), question
        printed = [score for score, _ in found]
        assert printed == sorted(printed, reverse=True)
        assert printed == pytest.approx(row.topk(k).values.tolist(), abs=2e-4)
        assert printed == pytest.approx([row[corpus.index(t)].item() for t in texts], abs=2e-4)
        assert texts[0] == corpus[int(row.argmax())] or printed[0] - printed[1] < 2e-4


# --- the examples ------------------------------------------------------------------------------


def test_semantic_search_finds_held_out_questions_answers_with_the_prompts(run: dict, model, capsys) -> None:
    assert semantic_search.main([str(run["out"]), "--top-k", "4"]) == 0
    hits = printed_hits(capsys.readouterr().out)
    assert list(hits) == [p["question"] for p in held_out(run["pairs"])[:3]]
    assert_brute_force_hits(hits, model, run["answers"], k=4)
    # Without the prompts the scores would be others: the check above has teeth.
    question, found = next(iter(hits.items()))
    bare = model.similarity(model.encode([question]), model.encode([found[0][1]])).item()
    assert abs(bare - found[0][0]) > 1e-3


def test_an_example_runs_as_a_module(run: dict) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "embedtune.examples.semantic_search", str(run["out"]),
                           "what links apple and river?", "--top-k", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    hits = printed_hits(done.stdout)
    assert list(hits) == ["what links apple and river?"] and len(hits["what links apple and river?"]) == 2


def test_qa_retrieval_counts_what_sentence_transformers_counts(run: dict, model, capsys) -> None:
    assert qa_retrieval.main([str(run["out"])]) == 0
    out = capsys.readouterr().out
    pairs = held_out(run["pairs"])
    scores = cosine(model, [p["question"] for p in pairs], run["answers"])
    right = sum(run["answers"][int(row.argmax())] == p["answer"] for row, p in zip(scores, pairs))
    assert f"{len(pairs)} held-out questions (never trained on), each against all 200 answers" in out
    assert f"right answer at rank 1: {right} of {len(pairs)} " in out

    # Given pairs: their answers join the corpus.
    extra = [{"question": f"which river runs past harbor {i}?", "answer": f"the river by harbor {i} is wide."}
             for i in range(4)]
    path = write_jsonl(run["out"].parent / "extra.jsonl", extra)
    assert qa_retrieval.main([str(run["out"]), "--pairs", str(path)]) == 0
    out = capsys.readouterr().out
    corpus = run["answers"] + [p["answer"] for p in extra]
    scores = cosine(model, [p["question"] for p in extra], corpus)
    right = sum(corpus[int(row.argmax())] == p["answer"] for row, p in zip(scores, extra))
    assert "each against all 204 answers" in out and f"right answer at rank 1: {right} of 4 " in out


def test_similarity_prints_the_matrix_sentence_transformers_computes(run: dict, model, capsys) -> None:
    queries = ["what links apple and river?", "what links copper and falcon?"]
    documents = [run["answers"][0], run["answers"][1], "a note with nothing shared"]
    argv = [str(run["out"])] + [a for q in queries for a in ("--query", q)] + \
        [a for d in documents for a in ("--document", d)]
    assert similarity.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^Q\d+ ", line)]
    printed = [[float(v) for v in re.findall(r"-?\d\.\d{4}", line)] for line in rows]
    expected = cosine(model, queries, documents)
    assert printed == [pytest.approx(row, abs=2e-4) for row in expected.tolist()]
    for line, row in zip(rows, expected):
        assert re.findall(r"\d\.\d{4}\*", line) == [f"{row.max().item():.4f}*"]  # the row's best, marked


def test_batch_search_writes_every_query_in_order_with_its_best_answers(run: dict, model, tmp_path: Path,
                                                                        capsys) -> None:
    queries = [p["question"] for p in run["pairs"][:30]]
    (tmp_path / "queries.txt").write_text("\n".join(queries) + "\n\n", encoding="utf-8")
    output = tmp_path / "hits.jsonl"
    assert batch_search.main([str(run["out"]), "--queries", str(tmp_path / "queries.txt"), "--output", str(output),
                              "--batch-size", "8", "--top-k", "3"]) == 0
    assert "30 queries searched against 200 answers in 4 batch(es) of up to 8" in capsys.readouterr().out
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [line["query"] for line in lines] == queries
    hits = {line["query"]: [(hit["score"], hit["text"]) for hit in line["hits"]] for line in lines}
    assert_brute_force_hits(hits, model, run["answers"], k=3)


def test_vector_db_gives_the_brute_force_hits_with_the_models_prompts(run: dict, model, tmp_path: Path,
                                                                      capsys) -> None:
    import lancedb

    questions = ["what links apple and river?", run["pairs"][5]["question"]]
    assert vector_db.main([str(run["out"]), *questions, "--db", str(tmp_path / "db"), "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "LanceDB table 'answers'" in out and ": 200 rows" in out
    hits = printed_hits(out)
    assert list(hits) == questions
    assert_brute_force_hits(hits, model, run["answers"], k=5)

    # The table holds each answer embedded with the document prompt ...
    table = lancedb.connect(str(tmp_path / "db")).open_table("answers").to_arrow().to_pylist()
    stored = torch.tensor([row["vector"] for row in table[:5]])
    expected = model.encode([DOCUMENT + row["text"] for row in table[:5]], convert_to_tensor=True)
    assert torch.allclose(stored, expected, atol=1e-5)
    # ... and the question went in with the query prompt: its embedding is that of prompt + question.
    query = model.encode_query(questions[0], convert_to_tensor=True)
    assert torch.allclose(query, model.encode(QUERY + questions[0], convert_to_tensor=True), atol=1e-6)
    assert not torch.allclose(query, model.encode(questions[0], convert_to_tensor=True), atol=1e-3)


def test_an_example_without_its_extra_says_which_to_install(run: dict, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lancedb", None)  # import lancedb now fails
    assert vector_db.main([str(run["out"])]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: this example needs lancedb, which is not installed: pip install 'embedtune[vectordb]'"]


def test_a_model_folder_searches_the_quickstart_answers(run: dict, tmp_path: Path, capsys) -> None:
    folder = shutil.copytree(run["out"] / "final_model", tmp_path / "model")
    assert similarity.main([str(folder)]) == 0
    captured = capsys.readouterr()
    assert "its questions and answers come from the quickstart's data" in captured.err
    assert "How do I" in captured.out  # the quickstart's questions are about the Python standard library


# --- embedtune search --------------------------------------------------------------------------


def searched(argv: list[str], capsys) -> tuple[list[dict], str]:
    assert search(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_search_ranks_like_sentence_transformers_in_faiss_and_torch(run: dict, model, tmp_path: Path,
                                                                    capsys) -> None:
    questions = [p["question"] for p in run["pairs"][:4]]
    argv = [str(run["out"]), *[a for q in questions for a in ("--query", q)], "--top-k", "5",
            "--index", str(tmp_path / "index")]
    torch_lines, err = searched(argv + ["--backend", "torch"], capsys)
    assert "index: built" in err and "200 documents" in err
    faiss_lines, _ = searched(argv + ["--backend", "faiss"], capsys)
    for ours, theirs in zip(faiss_lines, torch_lines, strict=True):  # the same up to float rounding
        assert [h["text"] for h in ours["hits"]] == [h["text"] for h in theirs["hits"]]
        assert [h["score"] for h in ours["hits"]] == pytest.approx([h["score"] for h in theirs["hits"]], abs=1e-5)
    hits = {line["query"]: [(hit["score"], hit["text"]) for hit in line["hits"]] for line in torch_lines}
    assert [hit["rank"] for hit in torch_lines[0]["hits"]] == [1, 2, 3, 4, 5]
    # embedtune's encoder and sentence-transformers agree to about 1e-4.
    assert_brute_force_hits(hits, model, run["answers"], k=5)

    # Through the embedtune command, in words.
    assert cli(["search", str(run["out"]), "--query", questions[0], "--top-k", "2", "--index",
                str(tmp_path / "index")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query: {questions[0]}"
    assert lines[1].split(None, 2) == ["1", f"{hits[questions[0]][0][0]:.4f}", hits[questions[0]][0][1]]


def test_the_index_is_reused_until_the_corpus_or_the_model_changes(run: dict, tmp_path: Path, capsys) -> None:
    # The default corpus (the run's answers) and index (OUTPUT_DIR/search_index).
    lines, err = searched([str(run["out"]), "--query", "apple"], capsys)
    index = run["out"] / "search_index"
    assert f"index: built {index} (200 documents" in err
    assert {h["text"] for h in lines[0]["hits"]} <= set(run["answers"])

    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"answer": a, "n": i} for i, a in enumerate(run["answers"][:50])])
    argv = [str(run["out"]), "--corpus", str(corpus), "--query", "a tale of meadow", "--index", str(tmp_path / "i")]
    first, err = searched(argv, capsys)
    assert "index: built" in err and "(50 documents" in err
    embeddings = tmp_path / "i" / "embeddings.npy"
    stamp = embeddings.stat().st_mtime_ns
    again, err = searched(argv, capsys)
    assert err.strip().splitlines()[-1] == f"index: reused {tmp_path / 'i'} (50 documents)"
    assert again == first and embeddings.stat().st_mtime_ns == stamp

    # A new document: the index is rebuilt, and the document found.
    new = "the meadow meets the glacier in a brand new tale."
    with open(corpus, "a", encoding="utf-8") as f:
        f.write(json.dumps({"answer": new}) + "\n")
    found, err = searched(argv[:-2] + ["--query", new, "--index", str(tmp_path / "i")], capsys)
    assert "index: rebuilt" in err and "the corpus changed (51 documents" in err
    assert found[0]["hits"][0]["text"] == new

    # Another model (here: other prompts) rebuilds it too; a changed model card does not.
    other = shutil.copytree(run["out"] / "final_model", tmp_path / "other")
    (other / "README.md").write_text("edited card\n", encoding="utf-8")
    _, err = searched([str(other), *argv[1:]], capsys)
    assert "index: reused" in err
    settings = json.loads((other / "config_sentence_transformers.json").read_text())
    settings["prompts"]["document"] = "doc: "
    (other / "config_sentence_transformers.json").write_text(json.dumps(settings))
    _, err = searched([str(other), *argv[1:]], capsys)
    assert "index: rebuilt" in err and "the model and encoding changed" in err
    # A model folder with an index and no corpus searches the index as it is.
    again, err = searched([str(other), "--query", new, "--index", str(tmp_path / "i")], capsys)
    assert "index: reused" in err and again[0]["hits"][0]["text"] == new


def test_search_reads_queries_and_text_corpora_from_files(run: dict, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("apples grow in the orchard\n\nrivers run to the sea\napples grow in the orchard\n")
    queries = write_jsonl(tmp_path / "q.jsonl", [{"question": "where do apples grow?"}, {"question": "the sea"}])
    lines, err = searched([str(run["out"]), "--corpus", str(corpus), "--queries", str(queries)], capsys)
    assert "2 documents" in err  # blank lines skipped, the repeated line counted once
    assert [line["query"] for line in lines] == ["where do apples grow?", "the sea"]
    assert all(len(line["hits"]) == 2 for line in lines)


def bad(argv: list[str], capsys) -> tuple[int, str]:
    code = search(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or code == 2, err  # one line; a usage error after argparse's usage
    return code, err[-1]


def test_bad_input_is_one_line_naming_the_file_and_the_fix(run: dict, tmp_path: Path, capsys) -> None:
    code, line = bad([str(tmp_path / "nowhere"), "--query", "x"], capsys)
    assert code == 1 and f"{tmp_path / 'nowhere'}: no such folder" in line and "final_model/" in line

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run["out"] / "config.yaml", unfinished / "config.yaml")
    code, line = bad([str(unfinished), "--query", "x"], capsys)
    assert code == 1 and "without final_model/" in line and "embedtune export" in line

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    code, line = bad([str(run["out"]), "--corpus", str(blank), "--query", "x"], capsys)
    assert code == 1 and line.startswith(f"error: {blank}: no document in it") and "'answer'" in line

    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"question": "q", "answer": "a"}])
    code, line = bad([str(run["out"]), "--corpus", str(corpus), "--field", "answr", "--query", "x"], capsys)
    assert code == 1
    assert line == (f"error: {corpus}, line 1: no 'answr' field (fields here: answer, question); name the field "
                    "that holds the text with --field")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"answer": "a"}\n{"answer": \n')
    code, line = bad([str(run["out"]), "--corpus", str(broken), "--query", "x"], capsys)
    assert code == 1 and f"{broken}, line 2: not valid JSON" in line

    code, line = bad([str(run["out"] / "final_model")], capsys)  # no query: a usage error
    assert code == 2 and line == "embedtune search: error: give a query: --query TEXT (repeatable) or --queries FILE"

    folder = shutil.copytree(run["out"] / "final_model", tmp_path / "model")
    code, line = bad([str(folder), "--query", "x"], capsys)
    assert code == 1 and "give --corpus FILE" in line

    # The examples say it the same way.
    assert semantic_search.main([str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no such folder, and no model on the Hugging Face Hub (not a Hub name "
        "(owner/name)); give a training run's output folder (holding final_model/) or a model folder"]
