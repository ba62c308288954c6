"""The config refuses what it cannot run, and accepts every shape users write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from embedtune.config import ConfigError, build_config, parse_args

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data) if path.suffix != ".json" else json.dumps(data))
    return path


def test_unknown_key_is_refused_with_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", {"data": {"train_files": ["x.jsonl"]}, "train": {"lerning_rate": 1e-4}})
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(path)])
    text = str(err.value)
    assert str(path) in text and "train.lerning_rate" in text and "learning_rate" in text


def test_wrong_type_and_bad_choice_name_the_key_and_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", {"data": {"train_files": ["x"]}, "train": {"epochs": "three"},
                                         "loss": {"name": "TripletMarginLoss"}})
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(path)])
    text = str(err.value)
    assert "train.epochs" in text and "'three'" in text
    assert "loss.name" in text and "MultipleNegativesRankingLoss" in text


def test_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match="no/such.yaml"):
        parse_args(["--config", "no/such.yaml"])


def test_flat_json_config_is_accepted_as_is(tmp_path: Path) -> None:
    path = write(tmp_path / "flat.json", {
        "input_jsonl": "data/train.jsonl", "output_dir": "out", "base_model": "some/model", "num_epochs": 3,
        "train_batch_size": 16, "loss_function": "MultipleNegativesRankingLoss", "max_seq_length": 256})
    cfg = parse_args(["--config", str(path)])
    assert cfg.data.train_files == ["data/train.jsonl"]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.base_model) == (3, 16, "some/model")
    assert cfg.data.query_max_length == cfg.data.document_max_length == 256
    assert cfg.loss.name == "MultipleNegativesRankingLoss"


def test_flags_and_dotted_overrides_win_over_the_file_and_are_typed(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", {"data": {"train_files": ["a.jsonl"]}, "train": {"epochs": 1}})
    cfg = parse_args(["--config", str(path), "--epochs", "4", "--learning_rate", "3e-5",
                      "--input_jsonl", "b.jsonl", "--input_jsonl", "c.jsonl", "data.query_prefix=query: ",
                      "train.max_steps=7", "--loss_function", "MultipleNegativesSymmetricRankingLoss"])
    assert cfg.train.epochs == 4 and cfg.train.learning_rate == pytest.approx(3e-5)
    assert cfg.data.train_files == ["b.jsonl", "c.jsonl"]
    assert cfg.data.query_prefix == "query: " and cfg.train.max_steps == 7
    assert cfg.loss.symmetric is True


def test_a_learning_rate_written_2e_5_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train_files: [a.jsonl]\ntrain:\n  learning_rate: 2e-5\n")
    assert parse_args(["--config", str(path)]).train.learning_rate == pytest.approx(2e-5)


def test_batch_size_must_split_into_accumulation_steps() -> None:
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_config({"input_jsonl": "a", "train": {"batch_size": 10, "gradient_accumulation_steps": 4}})


def test_no_training_data_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--input_jsonl"):
        build_config({})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = parse_args(["--config", str(path)])
    assert cfg.data.train_files


def test_shipped_config_is_found_by_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["--config", "quickstart"])
    assert cfg.data.train_files == ["embedtune:resources/python_docs_qa.jsonl.gz"]


def test_the_readme_documents_every_config_key() -> None:
    from pydantic import BaseModel

    from embedtune.config import Config

    readme = (ROOT / "README.md").read_text()
    missing = []
    for section, field in Config.model_fields.items():
        sub = field.annotation
        keys = ([f"{section}.{k}" for k in sub.model_fields] if isinstance(sub, type) and issubclass(sub, BaseModel)
                else [section])
        missing += [k for k in keys if f"| `{k}` |" not in readme]
    assert not missing, f"README config reference lacks: {missing}"


def test_mixed_precision_no_survives_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train_files: [a.jsonl]\ntrain:\n  mixed_precision: no\n")
    assert parse_args(["--config", str(path)]).train.mixed_precision == "no"
    assert parse_args(["--config", str(path), "train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
