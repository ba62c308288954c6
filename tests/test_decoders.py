"""Decoder embedders (Qwen2-style, as e5-mistral and gte-Qwen2): causal attention in every layout
(packed, padded, chunked), the EOS token appended by the tokenizer itself and pooled as the last
token, the same embeddings from the exported model; query instructions from the model's prompts or
from each record."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from test_model_families import TEXTS, assert_same, ours, theirs

from embedtune.config import ConfigError, DataConfig, ModelConfig
from embedtune.data.collate import PairCollator, query_prefix
from embedtune.data.records import Pair, Reject, parse_record
from embedtune.model.encoder import EmbeddingModel, append_eos_token
from embedtune.model.folder import ModelLoadError, read_model_folder
from embedtune.model.packing import Masking, Ragged, _attend, pack_ragged, pad_chunked, pad_ragged

EOS = "<|endoftext|>"
PROMPTS = {"query": "Instruct: find the answer. Query: ", "web_search_query": "Instruct: search the web. Query: "}
LONG = "a question that goes on and on, far past the length limit of the queries " * 4


def qwen_tokenizer() -> Any:
    """A byte-level BPE tokenizer of Qwen2's class over single characters; like Qwen2's, it adds no
    special token of its own, so appending EOS is left to model.append_eos."""
    from transformers import Qwen2Tokenizer

    chars = list(string.ascii_letters + string.digits + string.punctuation) + ["Ġ"]
    return Qwen2Tokenizer(vocab={c: i for i, c in enumerate(chars)}, merges=[], eos_token=EOS, pad_token=EOS,
                          unk_token=None)


def save_qwen_folder(root: Path) -> Path:
    """A tiny Qwen2 (grouped-query attention: 4 heads, 2 key/value heads) as a sentence-transformers
    folder: last-token pooling, Normalize, two query prompts."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    Qwen2Model(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    transformer = models.Transformer(str(root / "hf"), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], prompts=PROMPTS,
                             similarity_fn_name="cosine", device="cpu")
    st.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qwen_folder(tmp_path_factory.mktemp("qwen2"))


def texts_of(ragged: Ragged) -> list[list[int]]:
    return [chunk.tolist() for chunk in ragged.input_ids.split(ragged.lengths.tolist())]


def hidden_states(model: EmbeddingModel, ragged: Ragged, packed: bool) -> list[torch.Tensor]:
    """Each text's last hidden states, (length, hidden), through the packed or the padded layout."""
    with torch.no_grad():
        if packed:
            inputs = pack_ragged(ragged)
            hidden = model.encoder(input_ids=inputs.input_ids[None], position_ids=inputs.position_ids[None],
                                   embedtune_packing=inputs.packing).last_hidden_state[0]
            return list(hidden.split(ragged.lengths.tolist()))
        padded = pad_ragged(ragged, model.pad_token_id)
        hidden = model.encoder(input_ids=padded.input_ids, attention_mask=padded.attention_mask).last_hidden_state
        return [row[:n] for row, n in zip(hidden, ragged.lengths.tolist())]


# --- causal attention, packed and padded ---------------------------------------------------------


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                        masking: Masking) -> torch.Tensor:
    """Attention text by text with an explicit mask, the slow way."""
    outs, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
        ki, vi = (t.repeat_interleave(qi.shape[0] // t.shape[0], dim=0) for t in (ki, vi))
        scores = qi @ ki.transpose(1, 2) / qi.shape[-1] ** 0.5
        idx = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if masking.causal:
            allowed &= idx[None, :] <= idx[:, None]
        if masking.window is not None:
            allowed &= (idx[None, :] - idx[:, None]).abs() < masking.window
        outs.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vi).transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("masking", [Masking(), Masking(causal=True), Masking(causal=True, window=3),
                                     Masking(window=2)], ids=["full", "causal", "causal-window", "window"])
@pytest.mark.parametrize("route", ["per_text", "grouped", "padded"])
def test_packed_attention_routes_mask_as_the_module_does(route: str, masking: Masking) -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 8, 3]
    packing = pack_ragged(Ragged(torch.zeros(sum(lengths), dtype=torch.long), torch.tensor(lengths)), groups=2).packing
    q = torch.randn(sum(lengths), 4, 8, generator=generator)
    k, v = (torch.randn(sum(lengths), 2, 8, generator=generator) for _ in range(2))  # grouped-query
    got = _attend(route, q, k, v, packing, None, 0.0, masking)
    torch.testing.assert_close(got, reference_attention(q, k, v, lengths, masking), rtol=1e-5, atol=1e-5)


def test_a_decoder_packs_and_stays_causal(qwen_folder: Path) -> None:
    model, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder))
    assert model.pooling == "last" and model.encoder.config.use_cache is False
    assert model.enable_packing(tokenizer)  # the probe: packed == padded
    model.eval()
    ragged = PairCollator(tokenizer, 64, 64).queries(TEXTS + [LONG])
    with torch.no_grad():
        padded = model(pad_ragged(ragged, model.pad_token_id))
        torch.testing.assert_close(model(pack_ragged(ragged)), padded, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(pad_chunked(ragged, model.pad_token_id, 2)), padded, rtol=1e-4, atol=1e-5)

    # Change one token in the middle of the longest text: the tokens before it keep their states.
    ids = texts_of(ragged)
    row = max(range(len(ids)), key=lambda i: len(ids[i]))
    cut = len(ids[row]) // 2
    changed = [list(t) for t in ids]
    changed[row][cut] = (changed[row][cut] + 1) % tokenizer.eos_token_id
    other = Ragged(torch.tensor([i for t in changed for i in t]), ragged.lengths)
    for packed in (True, False):
        before, after = hidden_states(model, ragged, packed), hidden_states(model, other, packed)
        torch.testing.assert_close(after[row][:cut], before[row][:cut], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after[row][cut:], before[row][cut:], atol=1e-4)
        for i in range(len(ids)):  # other texts do not see it at all
            if i != row:
                torch.testing.assert_close(after[i], before[i], rtol=1e-5, atol=1e-5)


def test_a_packed_decoder_batch_builds_no_tokens_by_tokens_mask(qwen_folder: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed row of 64 x 256 tokens would take a (16k x 16k) mask: 256 MiB that nothing reads."""
    from transformers import masking_utils

    model, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder))
    assert model.enable_packing(tokenizer)
    masks: list[tuple[int, ...]] = []
    sdpa_mask = masking_utils.sdpa_mask

    def seen(*args: Any, **kwargs: Any) -> Any:
        mask = sdpa_mask(*args, **kwargs)
        masks.append(tuple(mask.shape) if mask is not None else ())
        return mask

    monkeypatch.setattr(masking_utils, "sdpa_mask", seen)
    ragged = PairCollator(tokenizer, 64, 64).queries(TEXTS + [LONG])
    packed = model(pack_ragged(ragged))
    assert not [shape for shape in masks if shape]
    padded = model(pad_ragged(ragged, model.pad_token_id))  # padded batches keep SDPA's padding mask
    assert [shape for shape in masks if shape] == [(len(TEXTS) + 1, 1, 64, 64)]
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


# --- EOS appended and pooled; training and the export agree ----------------------------------------


def test_the_tokenizer_appends_eos_in_every_route(qwen_folder: Path) -> None:
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(qwen_folder))("how")["input_ids"][-1] != AutoTokenizer.from_pretrained(
        str(qwen_folder)).eos_token_id  # the base's own tokenizer does not: model.append_eos does it
    _, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder))
    eos = tokenizer.eos_token_id
    collate = PairCollator(tokenizer, 24, 32)
    assert collate.fast is not None  # the Rust fast path agrees with the tokenizer's own call
    pairs = [Pair("a", "how do I read a file?", "call read()."), Pair("b", LONG, LONG)]
    batch = collate(pairs)
    for ragged, limit in ((batch.query, 24), (batch.document, 32)):
        for ids in texts_of(ragged):
            assert ids[-1] == eos and ids.count(eos) == 1 and len(ids) <= limit
    assert batch.query.lengths.tolist()[1] == 24  # cut by truncation, and still ending with EOS
    assert tokenizer(LONG, truncation=True, max_length=10)["input_ids"][-1] == eos
    # A tokenizer that appends it already is left as it is (Qwen3-Embedding's does).
    append_eos_token(tokenizer)
    assert tokenizer("x")["input_ids"].count(eos) == 1


def test_a_decoder_trains_and_exports_the_same_embeddings(qwen_folder: Path, train_args: list[str]) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from embedtune.commands.train import main

    args = list(train_args)
    args[args.index("--base_model") + 1] = str(qwen_folder)
    assert main(args + ["train.max_steps=2", "tracking.report_to=none"]) == 0
    final = Path(args[args.index("--output_dir") + 1]) / "final_model"

    folder = read_model_folder(str(final))
    assert folder.pooling == "last" and folder.normalize
    assert folder.prompts == read_model_folder(str(qwen_folder)).prompts and PROMPTS.items() <= folder.prompts.items()
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    assert tokenizer("how do I read a file?")["input_ids"][-1] == tokenizer.eos_token_id
    st = SentenceTransformer(str(final), device="cpu")
    features = st.tokenize(TEXTS + [LONG])
    mask = features["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # the last real token, on either padding side
    assert (features["input_ids"][torch.arange(len(last)), last] == tokenizer.eos_token_id).all()

    texts = TEXTS + [LONG]
    assert_same(theirs(final, texts), ours(final, texts))
    assert_same(theirs(final, texts, "query"), ours(final, texts, PROMPTS["query"]))
    model, trained_tokenizer = EmbeddingModel.from_pretrained(str(final))
    assert model.enable_packing(trained_tokenizer)
    model.eval()
    with torch.no_grad():
        length = folder.max_seq_length or 64
        packed = model(PairCollator(trained_tokenizer, length, length).queries(texts))
    assert_same(theirs(final, texts), packed)


def test_append_eos_needs_last_token_pooling(qwen_folder: Path) -> None:
    with pytest.raises(ValidationError, match="model.append_eos=true .* last-token pooling"):
        ModelConfig(append_eos=True, pooling="mean")
    with pytest.raises(ModelLoadError, match="model.append_eos=true") as caught:
        EmbeddingModel.from_pretrained(str(qwen_folder), pooling="mean", append_eos=True)
    assert "\n" not in str(caught.value)
    _, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder), append_eos=False)
    assert tokenizer("how")["input_ids"][-1] != tokenizer.eos_token_id
    _, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder), pooling="mean")  # null: off with mean pooling
    assert tokenizer("how")["input_ids"][-1] != tokenizer.eos_token_id


# --- query instructions -------------------------------------------------------------------------------


def decoded_queries(tokenizer: Any, collate: PairCollator, pairs: list[Pair]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in texts_of(collate(pairs).query)]


def test_query_prompt_and_prompt_field_reach_the_queries(qwen_folder: Path) -> None:
    _, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder))
    folder = read_model_folder(str(qwen_folder))
    prefix = query_prefix(DataConfig(query_prompt="web_search_query"), folder)
    assert prefix == PROMPTS["web_search_query"]
    assert query_prefix(DataConfig(query_prefix="q: "), folder) == "q: "
    collate = PairCollator(tokenizer, 128, 128, query_prefix=prefix)

    cfg = DataConfig(prompt_field="instruction")
    own = parse_record("f.jsonl", 1, json.dumps({"question": "what?", "answer": "that.",
                                                 "instruction": "Instruct: answer it. Query: "}), cfg)
    empty = parse_record("f.jsonl", 2, json.dumps({"question": "why?", "answer": "so.", "instruction": ""}), cfg)
    assert isinstance(own, Pair) and own.prompt == "Instruct: answer it. Query: "
    assert isinstance(empty, Pair) and empty.prompt == ""
    plain = Pair("p", "how?", "like so.")
    queries = decoded_queries(tokenizer, collate, [own, empty, plain])
    assert queries == ["Instruct: answer it. Query: what?", "why?", PROMPTS["web_search_query"] + "how?"]
    # The model's prompt text is what sentence-transformers prepends for that prompt name too.
    assert collate.queries(["how?"]).input_ids.tolist() == tokenizer(prefix + "how?")["input_ids"]


def test_held_out_questions_are_embedded_with_their_own_instruction(qwen_folder: Path) -> None:
    from accelerate import Accelerator

    from embedtune.retrieval import RetrievalSet, set_encoder

    model, tokenizer = EmbeddingModel.from_pretrained(str(qwen_folder))
    model.eval()
    collate = PairCollator(tokenizer, 128, 128, query_prefix=PROMPTS["query"])
    pairs = [Pair("a", "what?", "that.", prompt="Instruct: answer it. Query: "), Pair("b", "how?", "like so."),
             Pair("c", "why?", "so.", prompt="")]
    held_out = RetrievalSet.from_pairs(pairs)
    assert held_out.prompts == ["Instruct: answer it. Query: ", None, ""]
    encode = set_encoder(model, collate, held_out, 2, Accelerator(cpu=True))
    with torch.no_grad():
        trained_as = model(collate(pairs).query)  # the questions as training tokenizes them
    torch.testing.assert_close(encode(held_out.queries, "query"), trained_as, rtol=1e-5, atol=1e-6)
    assert RetrievalSet.from_pairs([Pair("b", "how?", "like so.")]).prompts == []


def test_a_bad_prompt_name_or_prompt_field_is_one_line(qwen_folder: Path, qa_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = read_model_folder(str(qwen_folder))
    with pytest.raises(ConfigError) as caught:
        query_prefix(DataConfig(query_prompt="search"), folder)
    message = str(caught.value)
    assert "\n" not in message and "data.query_prompt='search'" in message
    assert "'query', 'web_search_query'" in message
    with pytest.raises(ValidationError, match="data.query_prompt .* data.query_prefix"):
        DataConfig(query_prompt="query", query_prefix="query: ")

    cfg = DataConfig(prompt_field="instruction")
    missing = parse_record("f.jsonl", 3, json.dumps({"question": "what?", "answer": "that."}), cfg)
    wrong = parse_record("f.jsonl", 4, json.dumps({"question": "what?", "answer": "that.", "instruction": 3}), cfg)
    assert isinstance(missing, Reject) and isinstance(wrong, Reject)
    assert missing.message().startswith("f.jsonl, line 3: no 'instruction' field") and "\n" not in missing.message()
    assert wrong.message().startswith("f.jsonl, line 4: 'instruction'") and "must be a string" in wrong.message()

    from embedtune.commands.train import main

    out = tmp_path / "out"
    code = main(["--input_jsonl", str(qa_file), "--base_model", str(qwen_folder), "--output_dir", str(out),
                 "data.num_workers=0", "data.prompt_field=instruction", "tracking.report_to=none",
                 "train.max_steps=1"])
    assert code == 1
    assert f"{qa_file}, line 1: no 'instruction' field" in capsys.readouterr().err


def test_a_decoder_on_a_gpu_with_bf16_defaults_to_bf16(qwen_folder: Path, tiny_model: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from embedtune.config import build_config
    from embedtune.training.devices import default_precision

    def config(model: Path, *extra: str) -> Any:
        return build_config({"data": {"train_files": ["x.jsonl"]}, "model": {"base_model": str(model)}}, list(extra))

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert default_precision(config(qwen_folder)) is None  # no GPU here: Accelerate's default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    assert default_precision(config(qwen_folder)) == "bf16"
    assert default_precision(config(tiny_model)) is None  # an encoder keeps Accelerate's default
    assert default_precision(config(qwen_folder, "train.mixed_precision=no")) == "no"  # the config decides
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert default_precision(config(qwen_folder)) is None  # so does accelerate launch (Accelerate reads it)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert default_precision(config(qwen_folder)) is None  # a GPU without bf16
