"""ONNX export: the files where sentence-transformers looks for them, embeddings that agree with
``SentenceTransformer(folder).encode`` (fp32 closely, int8 roughly) for BERT with and without a
Dense layer, XLM-R and ModernBERT (no token_type_ids) and a Qwen2 decoder; an export that fails
leaves the folder as it was."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install \"embedtune[onnx]\")")
pytest.importorskip("onnx", reason="onnx is not installed (pip install \"embedtune[onnx]\")")

from test_decoders import save_qwen_folder  # noqa: E402
from test_model_families import bert_folder, modernbert_folder, xlmr_folder  # noqa: E402

from embedtune.model import onnx as onnx_export  # noqa: E402
from embedtune.model.onnx import (  # noqa: E402
    FP32_FILE,
    INT8_FILE,
    OnnxEncoder,
    OnnxExportError,
    export_onnx,
)

# One padded batch: from one word to a few dozen tokens.
TEXTS = ["a", "how do I read a file?", "Open() returns a File object; call read() on it to get the whole text, or "
         "iterate over it for one line at a time.", "Sorting a list in place with a key", "what links apple and river"]
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
NO_TOKEN_TYPES = ["input_ids", "attention_mask"]


def bert_mean_folder(root: Path, tiny_model: Path) -> Path:
    """The tiny BERT with mean pooling and Normalize, query and document prompts."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(tiny_model), max_seq_length=64)
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), "mean"), models.Normalize()]
    SentenceTransformer(modules=modules, prompts={"query": "query: ", "document": "passage: "},
                        device="cpu").save(str(root / "st"))
    return root / "st"


# name: (builder, ONNX inputs, normalized)
FAMILIES = {
    "bert-mean": (lambda root, tok, tiny: bert_mean_folder(root, tiny), BERT_INPUTS, True),
    "bert-cls-dense": (lambda root, tok, tiny: bert_folder(root, tok), BERT_INPUTS, True),
    "xlmr": (lambda root, tok, tiny: xlmr_folder(root, tok), NO_TOKEN_TYPES, False),
    "modernbert": (lambda root, tok, tiny: modernbert_folder(root, tok), NO_TOKEN_TYPES, True),
    "qwen2": (lambda root, tok, tiny: save_qwen_folder(root), NO_TOKEN_TYPES, True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, tiny_model: Path) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name), tokenizer_dir, tiny_model)
            for name, (build, _, _) in FAMILIES.items()}


@pytest.fixture(scope="module")
def exported(folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Each family exported once, fp32 and int8."""
    return {name: export_onnx(str(folder), "int8") for name, folder in folders.items()}


def sentence_transformer(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def cosines(a: torch.Tensor, b: Any) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, torch.as_tensor(b).float(), dim=-1)


def fresh_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_writes_sentence_transformers_layout_and_agrees(folders: dict[str, Path],
                                                               exported: dict[str, dict[str, Any]],
                                                               family: str, record_property: Any) -> None:
    import onnx

    folder, result, (_, inputs, normalized) = folders[family], exported[family], FAMILIES[family]
    assert result["fp32"] == str(folder / "onnx" / FP32_FILE) and result["int8"] == str(folder / "onnx" / INT8_FILE)
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == sorted([FP32_FILE, INT8_FILE])
    assert not (folder / "onnx.tmp").exists()
    graph = onnx.load(str(folder / "onnx" / FP32_FILE)).graph
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == ["last_hidden_state"]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim][:2] == ["batch_size", "sequence_length"]

    st = sentence_transformer(folder)
    fp32, int8 = OnnxEncoder.from_folder(str(folder)), OnnxEncoder.from_folder(str(folder), int8=True)
    ours = fp32.encode(TEXTS, batch_size=len(TEXTS))
    theirs = st.encode(TEXTS, batch_size=len(TEXTS), convert_to_tensor=True)
    assert ours.shape == theirs.shape and cosines(ours, theirs).min() > 0.999
    torch.testing.assert_close(ours.norm(dim=-1), theirs.norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert normalized == torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    # The prompts, as encode_query and encode_document apply them.
    assert cosines(fp32.encode_query(TEXTS), st.encode_query(TEXTS)).min() > 0.999
    assert cosines(fp32.encode_document(TEXTS), st.encode_document(TEXTS)).min() > 0.999
    assert result["fp32 min cosine"] > 0.999

    int8_cosine = cosines(int8.encode(TEXTS, batch_size=len(TEXTS)), theirs).min().item()
    record_property("int8 cosine", int8_cosine)
    assert int8_cosine > 0.9 and result["int8 min cosine"] > 0.9


def test_batches_and_padding_do_not_change_an_embedding(folders: dict[str, Path],
                                                        exported: dict[str, dict[str, Any]]) -> None:
    encoder = OnnxEncoder.from_folder(str(folders["bert-cls-dense"]))
    whole = encoder.encode(TEXTS, "query", batch_size=len(TEXTS))
    one_by_one = encoder.encode(TEXTS, "query", batch_size=1)
    torch.testing.assert_close(whole, one_by_one, rtol=1e-4, atol=1e-5)
    assert encoder.encode([], batch_size=4).shape == (0, encoder.dim)
    with pytest.raises(ValueError, match="prompt_name 'nope' is not one of the model's prompts"):
        encoder.encode(TEXTS, "nope")


def test_reexport_replaces_the_onnx_folder_whole(folders: dict[str, Path], exported: dict[str, dict[str, Any]],
                                                 tmp_path: Path) -> None:
    folder = fresh_copy(folders["bert-mean"], tmp_path)
    (folder / "onnx" / "stale.onnx").write_bytes(b"of other weights")
    result = export_onnx(str(folder), None)
    assert set(result) == {"fp32", "fp32 min cosine"}
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == [FP32_FILE]  # no int8 of older weights
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("onnx")) == ["onnx"]


@pytest.mark.parametrize("failure", ["export", "agreement", "quantize", "rename", "read-only"])
def test_a_failed_export_leaves_the_folder_as_it_was(folders: dict[str, Path], exported: dict[str, dict[str, Any]],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     failure: str) -> None:
    folder = fresh_copy(folders["bert-mean"], tmp_path)
    before = listing(folder)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Unsupported: aten::frobnicate")

    if failure == "export":
        monkeypatch.setattr(torch.onnx, "export", refuse)
        error, match = OnnxExportError, r"^BertModel cannot be exported to ONNX .*aten::frobnicate"
    elif failure == "agreement":
        monkeypatch.setattr(onnx_export, "agreement", lambda model, path: 0.5)
        error, match = OnnxExportError, "the ONNX export of BertModel does not give the model's embeddings"
    elif failure == "quantize":
        # The module the export imports its quantizer from, whichever package object holds it now.
        monkeypatch.setattr(importlib.import_module("onnxruntime.quantization"), "quantize_dynamic", refuse)
        error, match = RuntimeError, "frobnicate"
    elif failure == "rename":  # the disk fills as the new onnx/ goes into place: the old one goes back
        real_replace = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if os.path.basename(src) == "onnx.tmp":
                raise OSError(28, "No space left on device")
            real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        error, match = OSError, "No space left"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        folder.chmod(0o555)
        error, match = PermissionError, ""
    try:
        with pytest.raises(error, match=match):
            export_onnx(str(folder), "int8")
    finally:
        folder.chmod(0o755)
    assert listing(folder) == before  # the earlier export untouched, nothing half-written beside it


def test_a_large_model_keeps_its_weights_in_one_external_file(folders: dict[str, Path],
                                                              exported: dict[str, dict[str, Any]], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)  # as past 2 GiB
    folder = fresh_copy(folders["bert-mean"], tmp_path)
    result = export_onnx(str(folder), "int8")
    names = sorted(p.name for p in (folder / "onnx").iterdir())
    assert FP32_FILE in names and "model.onnx_data" in names and INT8_FILE in names
    assert result["fp32 min cosine"] > 0.999 and result["int8 min cosine"] > 0.9
    theirs = sentence_transformer(folder).encode(TEXTS, convert_to_tensor=True)
    assert cosines(OnnxEncoder.from_folder(str(folder)).encode(TEXTS), theirs).min() > 0.999


def test_no_export_yet_or_a_bad_quantize_is_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(folders["bert-mean"], bare, ignore=shutil.ignore_patterns("onnx"))
    with pytest.raises(FileNotFoundError, match=r"model_qint8_avx512_vnni.onnx: no such file; export the model "
                                                r"with `embedtune export CHECKPOINT OUT --quantize int8`"):
        OnnxEncoder.from_folder(str(bare), int8=True)
    with pytest.raises(ValueError, match="quantize='int4': give None or 'int8'"):
        export_onnx(str(bare), "int4")
    assert not (bare / "onnx").exists()


def test_without_onnxruntime_the_export_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError) as caught:
        export_onnx(str(tmp_path), None)
    assert caught.value.name == "onnxruntime"
    assert str(caught.value) == ("ONNX export and inference need onnx and onnxruntime (onnxruntime is not "
                                 'installed): pip install "embedtune[onnx]"')
