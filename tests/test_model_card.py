"""The model card: numbers as measured, a data fingerprint that tracks every byte, no secrets, still loadable."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_pairs, write_jsonl

from embedtune.config import build_config, dump_yaml
from embedtune.data.fingerprint import data_fingerprint
from embedtune.secrets import REDACTED
from embedtune.training.card_metadata import hub_name
from embedtune.training.model_card import progress_pairs, write_model_card, write_run_card

BEFORE = {"ndcg@10": 0.41234, "mrr@10": 0.35, "recall@10": 0.7, "docs/ndcg@10": 0.5}
AFTER = {"ndcg@10": 0.8125, "mrr@10": 0.7751, "recall@10": 0.95, "map@100": 0.66, "docs/ndcg@10": 0.9}


def config_dict(tmp_path: Path, *overrides: str) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(30))
    return build_config({"input_jsonl": [str(data)]}, [f"output_dir={tmp_path / 'out'}", *overrides]).to_dict()


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


def card(tmp_path: Path, config: dict, base_model: str = "sentence-transformers/all-MiniLM-L6-v2", **kwargs) -> str:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    args = {"base_model": base_model, "config": config,
            "fingerprint": data_fingerprint(config["data"]["train_files"]), "eval_before": BEFORE,
            "eval_after": AFTER, "wandb_url": None, "num_examples": 1234, "steps": 77, "duration_s": 3725.0}
    path = write_model_card(str(model_dir), **{**args, **kwargs})
    assert path == str(model_dir / "README.md")
    return Path(path).read_text(encoding="utf-8")


def test_card_front_matter_and_eval_table(tmp_path: Path) -> None:
    text = card(tmp_path, config_dict(tmp_path, "data.query_prefix=query: "),
                wandb_url="https://wandb.ai/team/embedtune/runs/abc123")
    front = front_matter(text)
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert front["tags"] == ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense",
                             "embedtune", "loss:MultipleNegativesRankingLoss"]
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"

    rows = {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["ndcg@10"] == ["0.4123", "0.8125", "+0.4002"]
    assert rows["mrr@10"] == ["0.3500", "0.7751", "+0.4251"]
    assert rows["map@100"] == ["", "0.6600", ""]  # measured after only
    assert rows["docs/ndcg@10"] == ["0.5000", "0.9000", "+0.4000"]
    assert rows["steps trained"] == ["77"] and rows["duration"] == ["1h 02m 05s"]
    assert rows["batch size"] == ["32 pairs per step"]
    assert "MultipleNegativesRankingLoss" in rows["loss"][0]

    assert 'model.encode(queries, prompt_name="query")' in text
    assert "[https://wandb.ai/team/embedtune/runs/abc123](https://wandb.ai/team/embedtune/runs/abc123)" in text
    full = re.search(r"## Full config\n\n```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(full)["data"]["query_prefix"] == "query: "


def test_card_without_eval_or_wandb_points_at_local_logs(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    text = card(tmp_path, config, base_model=str(tmp_path), eval_before=None, eval_after=None)
    assert "base_model" not in front_matter(text)  # a local folder means nothing on the Hub
    assert "model-index" not in front_matter(text) and "metrics" not in front_matter(text)
    assert "No held-out evaluation was run." in text and "| metric |" not in text
    assert f"embedtune report {config['output_dir']}" in text and "training_metrics.jsonl" in text
    assert "prompt_name" not in text  # no prefixes, no prompts to pass


def test_front_matter_is_the_hubs_own_model_card_data(tmp_path: Path) -> None:
    """Read back with huggingface_hub's parser, the front matter holds the figures as given, named
    as sentence-transformers names its retrieval evaluator's."""
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    config = config_dict(tmp_path, "loss.matryoshka_dims=[32,16]", "tracking.run_name=faq-embedder",
                         "export.language=en", "export.license=apache-2.0")
    config["data"]["train_files"] = ["hub:acme/faq?config=pairs&split=train", "local.jsonl",
                                     "hf://datasets/acme/more@main/data/train.jsonl", "hub:acme/faq?split=extra"]
    (tmp_path / "model").mkdir()
    path = Path(write_model_card(str(tmp_path / "model"), base_model="all-MiniLM-L6-v2", config=config,
                                 fingerprint={"files": []}, eval_before=BEFORE, eval_after=AFTER, wandb_url=None,
                                 num_examples=4000, steps=125, duration_s=60.0, train_pairs=1234))

    data = ModelCard.load(path).data
    assert data.language == "en" and data.license == "apache-2.0"
    assert data.datasets == ["acme/faq", "acme/more"]
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "sentence-transformers" and data.pipeline_tag == "sentence-similarity"
    assert data.tags == ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense", "embedtune",
                         "dataset_size:1234", "loss:MatryoshkaLoss", "loss:MultipleNegativesRankingLoss"]
    assert data.metrics == ["cosine_ndcg@10", "cosine_mrr@10", "cosine_recall@10", "cosine_map@100"]

    name, results = model_index_to_eval_results(metadata_load(path)["model-index"])
    assert name == "faq-embedder"
    assert {(r.task_type, r.task_name) for r in results} == {("information-retrieval", "Information Retrieval")}
    figures = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert figures == {**{("held-out", f"cosine_{k}"): v for k, v in AFTER.items() if "/" not in k},
                       **{("held-out", f"base_model_cosine_{k}"): v for k, v in BEFORE.items() if "/" not in k},
                       ("held-out-docs", "cosine_ndcg@10"): AFTER["docs/ndcg@10"],
                       ("held-out-docs", "base_model_cosine_ndcg@10"): BEFORE["docs/ndcg@10"]}
    named = {r.metric_type: r.metric_name for r in results}
    assert named["cosine_ndcg@10"] == "Cosine Ndcg@10"
    assert named["base_model_cosine_ndcg@10"] == "Base Model Cosine Ndcg@10"


def test_a_distilled_model_says_so(tmp_path: Path) -> None:
    """The loss row, the fields and the Hub tags name the distillation term and its settings."""
    config = config_dict(tmp_path, "data.negatives_field=negatives", "data.scores_field=teacher",
                         "loss.distill=DistillKLDivLoss", "loss.distill_weight=400", "loss.temperature=0.05")
    text = card(tmp_path, config)
    rows = {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["loss"] == ["MultipleNegativesRankingLoss + 400 x DistillKLDivLoss (scale 20.0, temperature 0.05)"]
    assert "hard negatives `negatives`, a teacher's scores `teacher`" in text
    assert front_matter(text)["tags"][-2:] == ["loss:MultipleNegativesRankingLoss", "loss:DistillKLDivLoss"]

    alone = card(tmp_path, config_dict(tmp_path, "data.negatives_field=negatives", "data.scores_field=teacher",
                                       "loss.name=MarginMSELoss"))
    assert "| loss | MarginMSELoss |" in alone and "temperature" not in alone.split("## Full config")[0]


def test_dataset_size_is_one_epochs_pairs_where_the_run_tells_it() -> None:
    by_epochs = {"train": {"max_steps": None}}
    assert progress_pairs({"completed": True, "examples_seen": 300, "epochs_completed": 3}, by_epochs) == 100
    assert progress_pairs({"train_pairs": 90, "examples_seen": 300, "epochs_completed": 3}, by_epochs) == 90
    for unknown in ({"completed": False, "examples_seen": 300, "epochs_completed": 3},
                    {"completed": True, "stopped_early": True, "examples_seen": 250, "epochs_completed": 2},
                    {"completed": True, "examples_seen": 300, "epochs_completed": 0}):
        assert progress_pairs(unknown, by_epochs) is None
    assert progress_pairs({"completed": True, "examples_seen": 300, "epochs_completed": 3},
                          {"train": {"max_steps": 40}}) is None  # steps, not whole epochs


@pytest.mark.parametrize("name, hub", [("BAAI/bge-small-en-v1.5", "BAAI/bge-small-en-v1.5"),
                                       ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
                                       ("/models/bge", None), ("./bge", None), ("../a/b", None),
                                       ("~/models/x", None), ("a/b/c", None)])
def test_hub_name(name: str, hub: str | None) -> None:
    assert hub_name(name) == hub


def test_card_says_when_the_base_models_own_code_runs(tmp_path: Path) -> None:
    text = card(tmp_path, config_dict(tmp_path, "model.trust_remote_code=true"))
    assert "- **Remote code:** the base model's own code runs when it loads" in text
    assert "trust_remote_code=True)  # or its Hub id once uploaded" in text  # how to load it, in the usage
    plain = card(tmp_path, config_dict(tmp_path))
    assert "Remote code" not in plain and "trust_remote_code=True" not in plain


def test_fingerprint_follows_the_bytes(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", make_pairs(20, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", make_pairs(20, seed=2))
    first = data_fingerprint([str(a), str(b)])
    assert first == data_fingerprint([str(a), str(b)])
    assert [f["sha256"] for f in first["files"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert [f["size"] for f in first["files"]] == [a.stat().st_size, b.stat().st_size]
    assert first["num_files"] == 2 and first["size"] == a.stat().st_size + b.stat().st_size

    moved = tmp_path / "moved"
    moved.mkdir()
    for p in (a, b):
        shutil.copy(p, moved / p.name)
    assert data_fingerprint([str(moved / "*.jsonl")])["sha256"] == first["sha256"]  # same bytes, other place

    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one byte, same size
    b.write_bytes(bytes(data))
    changed = data_fingerprint([str(a), str(b)])
    assert changed["sha256"] != first["sha256"]
    assert changed["files"][0] == first["files"][0] and changed["files"][1]["sha256"] != first["files"][1]["sha256"]
    assert data_fingerprint([str(a)])["sha256"] != changed["sha256"]  # a file less


def test_fingerprint_of_packaged_data() -> None:
    from embedtune.data.records import resolve_files

    name = "embedtune:resources/python_docs_qa.jsonl.gz"
    [entry] = data_fingerprint([name])["files"]
    [path] = resolve_files([name])
    assert entry["name"] == name and entry["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_no_secret_reaches_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("EMBEDTUNE_TEST_MARKER", "env-marker-value-42")
    config = config_dict(tmp_path, "tracking.tags=[0123456789abcdef0123456789abcdef01234567]")
    config["tracking"]["api_key"] = "planted-api-key-value"
    config["extra"] = {"HF_TOKEN": "hf_plantedtokenvalue", "db": {"Password": "hunter2-planted"},
                       "client_secret": ["s3cr3t-in-a-list"]}
    config["data"]["eval_files"] = ["https://alice:pa55word-planted@example.org/eval.jsonl?token=tok-planted&x=1"]
    text = card(tmp_path, config)
    for secret in ("planted-api-key-value", "hf_plantedtokenvalue", "hunter2-planted", "s3cr3t-in-a-list",
                   "0123456789abcdef0123456789abcdef01234567", "pa55word-planted", "tok-planted", "env-marker-value-42"):
        assert secret not in text, secret
    full = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert full["tracking"]["api_key"] == REDACTED and full["extra"]["db"]["Password"] == REDACTED
    assert full["data"]["eval_files"] == [f"https://{REDACTED}@example.org/eval.jsonl?token={REDACTED}&x=1"]
    assert full["train"]["batch_size"] == 32  # the rest is kept as is
    assert config["tracking"]["api_key"] == "planted-api-key-value"  # the caller's dict is not changed


def test_card_replaces_the_sentence_transformers_readme_and_the_model_still_loads(
        tiny_model: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedtune.model.encoder import EmbeddingModel

    out = tmp_path / "out"
    model_dir = out / "final_model"
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model), pooling="cls", normalize=False)
    model.save_sentence_transformer(str(model_dir), tokenizer, 48, prompts={"query": "query: ", "document": ""})
    assert (model_dir / "README.md").exists()  # sentence-transformers' own card, written on save

    config = config_dict(tmp_path, f"model.base_model={tiny_model}", "data.query_prefix=query: ")
    (out / "config.yaml").write_text(dump_yaml(build_config(config)), encoding="utf-8")
    (out / "training_progress.json").write_text(json.dumps({
        "completed": True, "step": 5, "examples_seen": 80, "duration_s": 12.5, "eval_before": BEFORE,
        "eval_after": AFTER, "final_model": str(model_dir)}), encoding="utf-8")
    path = write_run_card(str(out))
    text = Path(path).read_text(encoding="utf-8")
    assert path == str(model_dir / "README.md")
    assert "embedtune" in front_matter(text)["tags"] and "base_model" not in front_matter(text)
    assert "This is a [sentence-transformers]" not in text
    for line in ("- **Pooling:** cls", "- **Normalized embeddings:** no", "- **Embedding dimension:** 32",
                 "- **Maximum sequence length:** 48 tokens", "- **Modules:** Transformer -> Pooling"):
        assert line in text
    assert "| ndcg@10 | 0.4123 | 0.8125 | +0.4002 |" in text and "| steps trained | 5 |" in text
    fingerprint = data_fingerprint(config["data"]["train_files"])["sha256"]
    assert f"`{fingerprint}`" in text

    st = SentenceTransformer(str(model_dir), device="cpu")
    embeddings = st.encode(["what links apple and river?", "a tale of apple"], prompt_name="query")
    assert embeddings.shape == (2, 32)
    assert 'model.encode(documents, prompt_name="document")' in text  # as the card says, and it works
    assert st.encode(["a tale of apple"], prompt_name="document").shape == (1, 32)
