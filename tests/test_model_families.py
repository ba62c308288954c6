"""Any sentence-transformers model loads as itself and comes back as itself: BERT, XLM-R and
ModernBERT folders written by sentence-transformers (pooling modes, Dense, Normalize, prompts,
similarity, lower-casing) train through the real trainer and export the same module stack with
the same embeddings; a Hub name loads from the local cache; what cannot be trained stops with
one line that says what to set."""

from __future__ import annotations

import json
import logging
import shutil
import string
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from embedtune.data.collate import PairCollator
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.folder import ModelLoadError, read_model_folder

TEXTS = ["how do I read a file?", "Open() returns a File object; call read() on it.", "a",
         "Sorting a list in place with a key"]
WORDS = ["how", "do", "read", "a", "file", "open", "returns", "object", "call", "on", "it", "sorting", "list",
         "in", "place", "with", "key", "what", "links", "and", "number", "the", "meets", "story", "tale", "of",
         "query", "passage", "apple", "river", "engine", "violin"]


# --- tiny models, saved by sentence-transformers itself ---------------------------------------


def xlmr_tokenizer() -> Any:
    """A cased XLM-R (Unigram, SentencePiece-style) tokenizer over a small hand-made vocabulary."""
    from transformers import XLMRobertaTokenizer

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = specials + [("▁", -3.0)] + [(f"▁{w}", -2.0) for w in WORDS] + [(c, -6.0) for c in chars]
    return XLMRobertaTokenizer(vocab=vocab)


def save_st_folder(hf_dir: Path, out: Path, pooling: str, dense: Any, normalize: bool, *, include_prompt: bool = True,
                   prompts: dict[str, str], similarity: str) -> Path:
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(1)
    transformer = models.Transformer(str(hf_dir), max_seq_length=64)
    hidden = transformer.get_embedding_dimension()
    modules = [transformer, models.Pooling(hidden, pooling_mode=pooling, include_prompt=include_prompt), dense]
    if normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name=similarity, device="cpu")
    model.save(str(out))
    return out


def bert_folder(root: Path, tokenizer_dir: Path) -> Path:
    """BERT, CLS pooling, a Dense layer with tanh, Normalize; query/passage prompts; dot product."""
    from sentence_transformers import models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    dense = models.Dense(32, 16, activation_function=torch.nn.Tanh())
    return save_st_folder(root / "hf", root / "st", "cls", dense, True,
                          prompts={"query": "query: ", "passage": "passage: "}, similarity="dot")


def xlmr_folder(root: Path, tokenizer_dir: Path) -> Path:
    """XLM-R with its own Unigram tokenizer, mean pooling, a residual Dense without activation, no
    Normalize; do_lower_case set as older sentence-transformers releases wrote it."""
    from sentence_transformers import models
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    tokenizer = xlmr_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2)
    XLMRobertaModel(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    dense = models.Dense(32, 24, activation_function=None, use_residual=True)
    out = save_st_folder(root / "hf", root / "st", "mean", dense, False, prompts={"query": "Query: "},
                         similarity="cosine")
    bert_config = json.loads((out / "sentence_bert_config.json").read_text())
    (out / "sentence_bert_config.json").write_text(json.dumps({**bert_config, "do_lower_case": True}))
    return out


def modernbert_folder(root: Path, tokenizer_dir: Path) -> Path:
    """ModernBERT, last-token pooling that leaves the prompt out, a Dense with GELU, Normalize."""
    from sentence_transformers import models
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = ModernBertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                              local_attention=16, pad_token_id=tokenizer.pad_token_id,
                              cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                              bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    ModernBertModel(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    dense = models.Dense(32, 32, activation_function=torch.nn.GELU())
    return save_st_folder(root / "hf", root / "st", "lasttoken", dense, True, include_prompt=False,
                          prompts={"query": "query: "}, similarity="cosine")


FAMILIES = {"bert": bert_folder, "xlmr": xlmr_folder, "modernbert": modernbert_folder}


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name), tokenizer_dir) for name, build in FAMILIES.items()}


# --- helpers ------------------------------------------------------------------------------------


def ours(folder: Path | str, texts: list[str], prompt: str = "") -> torch.Tensor:
    model, tokenizer = EmbeddingModel.from_pretrained(str(folder))
    model.eval()
    length = read_model_folder(str(folder)).max_seq_length or 64
    with torch.no_grad():
        return model(PairCollator(tokenizer, length, length, query_prefix=prompt).queries(texts))


def theirs(folder: Path | str, texts: list[str], prompt_name: str | None = None) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    return st.encode(texts, prompt_name=prompt_name, convert_to_tensor=True)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.nn.functional.cosine_similarity(a, b).min().item() >= 0.9999
    torch.testing.assert_close(a.norm(dim=-1), b.norm(dim=-1), rtol=1e-3, atol=1e-5)


def stack(folder: Path) -> list[str]:
    return [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]


def module_config(folder: Path, kind: str) -> dict[str, Any]:
    [path] = [m["path"] for m in json.loads((folder / "modules.json").read_text()) if m["type"].endswith(kind)]
    return json.loads((folder / path / "config.json").read_text())


def dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    [path] = [m["path"] for m in json.loads((folder / "modules.json").read_text()) if m["type"].endswith("Dense")]
    return load_file(str(folder / path / "model.safetensors"))


def st_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config_sentence_transformers.json").read_text())


# --- the families -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_base_loads_as_sentence_transformers_loads_it(family_folders: dict[str, Path], family: str) -> None:
    base = family_folders[family]
    folder = read_model_folder(str(base))
    assert folder.modules == tuple(stack(base)) and len(folder.dense) == 1
    assert_same(ours(base, TEXTS), theirs(base, TEXTS))
    assert_same(ours(base, TEXTS, folder.query_prompt), theirs(base, TEXTS, "query"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_trains_and_exports_the_same_module_stack(family_folders: dict[str, Path], train_args: list[str],
                                                           family: str) -> None:
    from embedtune.commands.train import main

    base = family_folders[family]
    args = list(train_args)
    args[args.index("--base_model") + 1] = str(base)
    assert main(args + ["train.max_steps=2", "tracking.report_to=none"]) == 0
    final = Path(args[args.index("--output_dir") + 1]) / "final_model"

    assert stack(final) == stack(base)
    for key in ("pooling_mode", "include_prompt"):
        assert module_config(final, "Pooling")[key] == module_config(base, "Pooling")[key]
    before, after = st_config(base), st_config(final)
    for key in ("prompts", "similarity_fn_name", "default_prompt_name"):
        assert after[key] == before[key], key
    dense_before, dense_after = dense_weights(base), dense_weights(final)
    assert dense_before.keys() == dense_after.keys()
    assert not torch.equal(dense_before["linear.weight"], dense_after["linear.weight"])  # trained
    config_before, config_after = module_config(base, "Dense"), module_config(final, "Dense")
    assert config_after == config_before

    was, now = read_model_folder(str(base)), read_model_folder(str(final))
    assert (now.pooling, now.normalize, now.dim, now.similarity) == (was.pooling, was.normalize, was.dim,
                                                                      was.similarity)
    assert_same(theirs(final, TEXTS), ours(final, TEXTS))
    if was.do_lower_case:  # the export lower-cases too, in sentence-transformers and here
        assert now.do_lower_case
        lower = [text.lower() for text in TEXTS]
        assert_same(theirs(final, TEXTS), theirs(final, lower))
        assert_same(ours(final, TEXTS), ours(final, lower))
    assert_same(theirs(final, TEXTS, "query"), ours(final, TEXTS, now.query_prompt))


def test_do_lower_case_lower_cases_every_text(family_folders: dict[str, Path]) -> None:
    base = family_folders["xlmr"]
    assert read_model_folder(str(base)).do_lower_case
    cased, lower = ["Hello World APPLE"], ["hello world apple"]
    assert_same(ours(base, cased), ours(base, lower))
    assert_same(ours(base, cased), theirs(base, cased))
    # The tokenizer itself is cased: without do_lower_case the two differ.
    plain = base.parent / "cased"
    shutil.copytree(base, plain)
    config = json.loads((plain / "sentence_bert_config.json").read_text())
    (plain / "sentence_bert_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    assert torch.nn.functional.cosine_similarity(ours(plain, cased), ours(plain, lower)).item() < 0.9999


# --- a Hub name from the local cache -----------------------------------------------------------


def lay_out_cache(root: Path, repo: str, folder: Path) -> Path:
    """The Hugging Face cache's own layout: refs/main names a commit, snapshots/<commit> holds the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = root / "hub" / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    shutil.copytree(folder, storage / "snapshots" / commit)
    return storage / "snapshots" / commit


def test_a_hub_name_loads_from_the_local_cache(family_folders: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = lay_out_cache(tmp_path, "org/name", family_folders["bert"])
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    folder = read_model_folder("org/name")
    assert Path(folder.path).resolve() == snapshot.resolve() and folder.hub_id == "org/name"
    assert folder.pooling == "cls" and folder.normalize is True
    assert folder.prompts["query"] == "query: " and folder.prompt("passage") == "passage: "
    assert folder.similarity == "dot" and folder.dim == 16
    model, _ = EmbeddingModel.from_pretrained("org/name")
    assert (model.pooling, model.normalize, model.dim, len(model.dense)) == ("cls", True, 16, 1)

    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as caught:
        read_model_folder("org/not-cached")
    assert "\n" not in str(caught.value) and "model.base_model='org/not-cached'" in str(caught.value)


# --- what cannot be trained stops, in one line --------------------------------------------------


def edited_copy(base: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(base, copy)
    return copy


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def one_line_error(name: str, **kwargs: Any) -> str:
    with pytest.raises(ModelLoadError) as caught:
        EmbeddingModel.from_pretrained(name, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_an_unknown_module_type_stops_before_training(family_folders: dict[str, Path], tmp_path: Path,
                                                      train_args: list[str], capsys: pytest.CaptureFixture) -> None:
    from embedtune.commands.train import main

    folder = edited_copy(family_folders["bert"], tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_LayerNorm",
                       "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    message = one_line_error(str(folder))
    assert "'sentence_transformers.models.LayerNorm'" in message and "modules.json" in message

    args = list(train_args)
    args[args.index("--base_model") + 1] = str(folder)
    assert main(args + ["tracking.report_to=none"]) == 1
    assert "sentence_transformers.models.LayerNorm" in capsys.readouterr().err
    assert not (Path(args[args.index("--output_dir") + 1]) / "final_model").exists()

    modules[2]["type"] = "custom_st.Transformer"  # the model's own code, named like ours
    (folder / "modules.json").write_text(json.dumps(modules))
    assert "'custom_st.Transformer'" in one_line_error(str(folder))


@pytest.mark.parametrize("mode", ["max", "weightedmean", "mean_sqrt_len_tokens"])
def test_a_pooling_mode_not_trained_is_refused_unless_model_pooling_is_set(family_folders: dict[str, Path],
                                                                          tmp_path: Path, mode: str) -> None:
    folder = edited_copy(family_folders["bert"], tmp_path)
    edit_json(folder / "1_Pooling" / "config.json", pooling_mode=mode)
    message = one_line_error(str(folder))
    assert mode in message and "model.pooling" in message and "mean, cls, lasttoken" in message
    model, _ = EmbeddingModel.from_pretrained(str(folder), pooling="mean")
    assert model.pooling == "mean" and model.include_prompt


def test_include_prompt_false_is_refused_where_it_would_change_the_pooling(family_folders: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    folder = edited_copy(family_folders["bert"], tmp_path)
    edit_json(folder / "1_Pooling" / "config.json", include_prompt=False)
    message = one_line_error(str(folder))
    assert "include_prompt" in message and "model.pooling=cls" in message
    model, _ = EmbeddingModel.from_pretrained(str(folder), pooling="cls")
    assert model.include_prompt  # the export pools the prompt, as training did
    # Last-token pooling never pools a prompt token: kept (the ModernBERT folder).
    model, _ = EmbeddingModel.from_pretrained(str(family_folders["modernbert"]))
    assert model.pooling == "last" and not model.include_prompt


def test_a_model_with_its_own_code_needs_trust_remote_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({
        "model_type": "tiny-custom-encoder", "architectures": ["TinyCustomModel"], "hidden_size": 32,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModel": "modeling_tiny.TinyCustomModel"}}))
    message = one_line_error(str(custom))
    assert "model.trust_remote_code=true" in message

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "tiny-unknown-encoder", "hidden_size": 32}))
    assert "model.trust_remote_code=true" in one_line_error(str(unknown))

    # Trusted, the code runs (here: it is missing, which is said in one line too) and a warning says so.
    with caplog.at_level(logging.WARNING):
        message = one_line_error(str(custom), trust_remote_code=True)
    assert "configuration_tiny.py" in message
    assert any("trust_remote_code" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_dense_activation_of_the_models_own_code_needs_trust_remote_code(family_folders: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    folder = edited_copy(family_folders["bert"], tmp_path)
    edit_json(folder / "2_Dense" / "config.json", activation_function="custom_activations.Swish")
    message = one_line_error(str(folder))
    assert "custom_activations.Swish" in message and "model.trust_remote_code=true" in message
