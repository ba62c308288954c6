"""Hub datasets as training and held-out data, from a dataset repository laid out in the local
Hugging Face cache exactly as the Hub serves it (README configs, Parquet shards), read offline.

The same files given by path, with the fields named globally, must train the very same run: the
Hub entry only decides which files are read and how their columns are named.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, make_pairs
from test_resume import assert_same_run, finish, kill_when, logged_steps, start

from embedtune.commands.train import main
from embedtune.config import Config, ConfigError, build_config, parse_args
from embedtune.data.hub import parse

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
README = """---
configs:
- config_name: pairs
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test.parquet
---
# acme/faq

Questions and answers.
"""


def lay_out_dataset(cache: Path, pairs: list[dict], shards: int = 2) -> Path:
    """``datasets--acme--faq`` in the cache's own layout: refs/main names a commit whose snapshot
    holds the README and the data, with the dataset's own column names (query, response)."""
    storage = cache / "datasets--acme--faq"
    snapshot = storage / "snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    (snapshot / "README.md").write_text(README)
    train, test = pairs[:-12], pairs[-12:]
    size = -(-len(train) // shards)
    for i in range(shards):
        rows = train[i * size:(i + 1) * size]
        table = pa.table({"query": [r["question"] for r in rows], "response": [r["answer"] for r in rows],
                          "topic": [r["question"].split()[2] for r in rows]})
        pq.write_table(table, snapshot / "data" / f"train-{i:05d}-of-{shards:05d}.parquet", row_group_size=16)
    pq.write_table(pa.table({"query": [r["question"] for r in test], "response": [r["answer"] for r in test]}),
                   snapshot / "data" / "test.parquet")
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    lay_out_dataset(cache, make_pairs(140, seed=5))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


TRAIN = "hub:acme/faq?config=pairs&split=train&columns=query:question,response:answer"
SHARDS = [f"data/train-{i:05d}-of-00002.parquet" for i in range(2)]


def run_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--base_model", str(model), "--output_dir", str(out), "--batch_size", "8", "--learning_rate", "2e-3",
            "--epochs", "2", "data.num_workers=2", "data.shuffle_buffer=16", "data.eval_fraction=0.1",
            "data.query_max_length=24", "data.document_max_length=32", "checkpoint.every_n_steps=4",
            "tracking.log_every_n_steps=1", "tracking.log_batch_ids=true", "eval.before=false",
            "tracking.report_to=none", "train.hard_negatives=null", *extra]


def test_entries_are_parsed_and_written_back_in_one_form(tmp_path: Path) -> None:
    spec = parse(TRAIN)
    assert (spec.name, spec.config, spec.split, spec.revision) == ("acme/faq", "pairs", "train", None)
    assert spec.columns == (("query", "question"), ("response", "answer"))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data:\n  train_files:\n    - hub: acme/faq\n      config: pairs\n      revision: v2\n"
                         "      columns: {query: question, response: answer}\n")
    cfg = parse_args(["--config", str(yaml_file)])
    [entry] = cfg.data.train_files
    assert entry == "hub:acme/faq@v2?config=pairs&split=train&columns=query:question,response:answer"
    assert parse(entry) == parse({"hub": "acme/faq", "config": "pairs", "revision": "v2",
                                  "columns": {"query": "question", "response": "answer"}})
    # What config.yaml holds loads back to the same config.
    assert Config(**cfg.to_dict()).data.train_files == [entry]


@pytest.mark.parametrize("entry, says", [
    ("hub:acme", None),
    ("hub:../etc", "not a Hub dataset name"),
    ("hub:acme/faq?splt=train", "unknown option splt"),
    ("hub:acme/faq?columns=query", "COLUMN:FIELD"),
    ({"hub": "acme/faq", "colums": {}}, "not colums"),
])
def test_a_malformed_entry_is_one_line(entry, says: str | None) -> None:
    if says is None:  # a name without an owner is a valid Hub name (e.g. squad)
        assert Config(data={"train_files": [entry]}).data.train_files == ["hub:acme?split=train"]
        return
    with pytest.raises(ConfigError, match=says) as caught:
        if isinstance(entry, str):
            build_config({}, [f"data.train_files={entry}"])
        else:
            build_config({"data": {"train_files": [entry]}})
    [line] = [line for line in str(caught.value).splitlines() if says in line]
    assert line.strip().startswith("data.train_files")


@pytest.mark.parametrize("order", ["stream", "indexed"])
def test_a_hub_dataset_trains_the_same_run_as_its_files(hub_cache: Path, models: dict[str, Path],
                                                        tmp_path: Path, order: str) -> None:
    snapshot = hub_cache / "datasets--acme--faq" / "snapshots" / COMMIT
    from_hub, from_files = tmp_path / "hub", tmp_path / "files"
    extra = [f"data.order={order}", "data.block_records=16"]
    assert main(run_args(models["dropout"], from_hub, f"data.train_files={TRAIN}", *extra)) == 0
    files = ",".join(str(snapshot / shard) for shard in SHARDS)
    assert main(run_args(models["dropout"], from_files, f"data.train_files=[{files}]", "data.query_field=query",
                         "data.positive_field=response", *extra)) == 0
    # The same batches (pair ids are file:row, the cache's files in both) and the same weights.
    assert_same_run(from_hub, from_files)
    saved = (from_hub / "config.yaml").read_text()
    assert TRAIN.split("?")[0] in saved  # the run says where its data came from


def test_a_killed_hub_run_resumes_into_the_same_run(hub_cache: Path, models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    env_args = [f"data.train_files={TRAIN}"]
    reference, out = tmp_path / "reference", tmp_path / "out"
    os.environ["HF_HUB_CACHE"] = str(hub_cache)  # for the subprocesses (monkeypatch restores it)
    finish(start(run_args(models["dropout"], reference, *env_args)))
    run = start(run_args(models["dropout"], out, *env_args))
    kill_when(run, lambda: logged_steps(out) >= 6)
    run.wait()
    assert not (out / "final_model").exists()
    finish(start(run_args(models["dropout"], out, *env_args, "--resume_from_checkpoint", "latest")))
    assert_same_run(out, reference)


def test_held_out_split_from_the_hub_and_bad_rows_named_by_dataset(hub_cache: Path, tiny_model: Path,
                                                                   tmp_path: Path, capsys) -> None:
    snapshot = hub_cache / "datasets--acme--faq" / "snapshots" / COMMIT
    test_split = TRAIN.replace("split=train", "split=test")
    out = tmp_path / "out"
    args = run_args(tiny_model, out, f"data.train_files={TRAIN}", f"data.eval_files={test_split}",
                    "train.max_steps=2", "eval.before=true")
    assert main(args) == 0
    # The test split, all of it, is the held-out set (nothing carved off the train split).
    assert "held-out before training (12 queries)" in (out / "logs" / "train.log").read_text()

    # A row with an empty answer in the second shard: named by dataset, split, file and row.
    shard = snapshot / SHARDS[1]
    table = pq.read_table(shard).to_pylist()
    table[3]["response"] = " "
    pq.write_table(pa.Table.from_pylist(table), shard)
    assert main(run_args(tiny_model, tmp_path / "bad", f"data.train_files={TRAIN}")) == 1
    err = capsys.readouterr().err
    assert f"acme/faq (config pairs, split train), {SHARDS[1]}, line 4: 'answer' must be a non-empty string" in err


@pytest.mark.parametrize("entry, says", [
    ("hub:acme/other", "not in the local Hugging Face cache"),
    ("hub:acme/faq?config=pairs&split=validation", "no split 'validation'"),
    ("hub:acme/faq?config=nope", "nope"),
    ("hub:acme/faq?config=pairs&columns=query:question,reply:answer",
     "no 'answer' field for the positive (fields here: question, response, topic); map a column to it in the "
     "dataset's entry (columns=COLUMN:answer)"),
])
def test_what_cannot_be_read_is_one_line_before_training(hub_cache: Path, tiny_model: Path, tmp_path: Path,
                                                         capsys, entry: str, says: str) -> None:
    out = tmp_path / "out"
    assert main(run_args(tiny_model, out, f"data.train_files={entry}", "train.max_steps=2")) == 1
    err = capsys.readouterr().err
    assert says in err, err
    assert not (out / "final_model").exists()
    if "cache" in says:
        assert "hf download acme/other --repo-type dataset" in err


def test_the_readmes_hub_entries_are_valid_and_the_same_run() -> None:
    """What a user copies from the README works: the YAML entries are accepted, and the one-line
    form it gives for the command line is the one config.yaml records for the training entry."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Datasets on the Hugging Face Hub", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    line = section.split("On the command line the same entry is one string:", 1)[1].split("`")[1]
    from_yaml = build_config(yaml.safe_load(block))
    key, _, value = line.partition("=")
    from_line = build_config({}, [line])
    assert key == "data.train_files"
    assert from_yaml.data.train_files == from_line.data.train_files == [value]
    assert parse(from_yaml.data.eval_files[0]).split == "test"
