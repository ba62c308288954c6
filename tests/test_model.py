"""Pooling, sentence-transformers settings, and an export that reproduces our embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embedtune.data.collate import PairCollator
from embedtune.model.encoder import EmbeddingModel, pool

TEXTS = ["how do I read a file?", "open() returns a file object; call read() on it for the whole text.",
         "a", "sorting a list in place with a key function and reverse order"]


def test_pooling_ignores_padding_on_either_side() -> None:
    hidden = torch.arange(24, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, right, "last")[0], hidden[0, 1])
    torch.testing.assert_close(pool(hidden, left, "last")[0], hidden[0, 3])
    torch.testing.assert_close(pool(hidden, right, "cls")[1], hidden[1, 0])


def test_a_text_embeds_the_same_alone_or_in_a_padded_batch(tiny_model: Path) -> None:
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model))
    model.eval()
    collate = PairCollator(tokenizer, 64, 64)
    with torch.no_grad():
        batch = model(collate.documents(TEXTS))
        alone = model(collate.documents(TEXTS[2:3]))
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), ("last", True)])
def test_export_loads_in_sentence_transformers_with_our_embeddings(tiny_model: Path, tmp_path: Path,
                                                                   pooling: str, normalize: bool) -> None:
    from sentence_transformers import SentenceTransformer

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model), pooling=pooling, normalize=normalize)
    model.eval()
    collate = PairCollator(tokenizer, 64, 64, query_prefix="query: ", document_prefix="passage: ")
    with torch.no_grad():
        ours_q = model(collate.queries(TEXTS))
        ours_d = model(collate.documents(TEXTS))
    path = tmp_path / "exported"
    model.save_sentence_transformer(str(path), tokenizer, 64, prompts={"query": "query: ", "document": "passage: "})
    assert (path / "model.safetensors").exists() and not list(path.rglob("*.bin"))

    st = SentenceTransformer(str(path), device="cpu")
    theirs_q = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    theirs_d = st.encode(TEXTS, prompt_name="document", convert_to_tensor=True)
    for ours, theirs in ((ours_q, theirs_q), (ours_d, theirs_d)):
        assert torch.nn.functional.cosine_similarity(ours, theirs).min().item() >= 0.9999
    assert st.similarity(theirs_q, theirs_d).shape == (4, 4)

    # Loading the export back into the trainer keeps its pooling and normalization.
    again, _ = EmbeddingModel.from_pretrained(str(path))
    assert (again.pooling, again.normalize) == (pooling, normalize)


def test_export_writes_the_full_state_it_is_given(tiny_model: Path, tmp_path: Path) -> None:
    """Under FSDP or DeepSpeed the export gets the assembled state: encoder and Dense weights come from it."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from embedtune.model.modules import Dense

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny_model))
    model.dense.append(Dense(32, 8, activation_function=torch.nn.Tanh()))
    assert model.dim == 8
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["dense.0.linear.weight"].fill_(0.5)
    state["encoder.embeddings.word_embeddings.weight"][0].fill_(0.25)
    path = tmp_path / "exported"
    model.save_sentence_transformer(str(path), tokenizer, 32, state_dict=state)

    assert bool((load_file(str(path / "2_Dense" / "model.safetensors"))["linear.weight"] == 0.5).all())
    assert bool((load_file(str(path / "model.safetensors"))["embeddings.word_embeddings.weight"][0] == 0.25).all())
    assert not bool((model.dense[0].linear.weight == 0.5).all())  # the live modules are left as they are
    assert SentenceTransformer(str(path), device="cpu").encode(TEXTS).shape == (4, 8)


def test_training_runs_with_dropout_on(tiny_model: Path, tmp_path: Path) -> None:
    """A fine-tuned encoder trains with its dropout (from_pretrained hands it over in eval mode)."""
    from embedtune.commands.train import main

    seen = []
    original = EmbeddingModel.forward

    def spy(self, *args, **kwargs):
        seen.append(self.training)
        return original(self, *args, **kwargs)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as patch:
        patch.setattr(EmbeddingModel, "forward", spy)
        args = ["--input_jsonl", str(write_pairs(tmp_path)), "--base_model", str(tiny_model), "--output_dir",
                str(tmp_path / "out"), "--batch_size", "8", "train.max_steps=2", "data.num_workers=0",
                "tracking.report_to=none", "eval.before=true"]
        assert main(args) == 0
    assert True in seen and False in seen  # trained in train mode, evaluated in eval mode


def write_pairs(tmp_path: Path) -> Path:
    from conftest import make_pairs, write_jsonl

    return write_jsonl(tmp_path / "p.jsonl", make_pairs(40))
