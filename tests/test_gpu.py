"""On a CUDA device (``pytest -m gpu``): the layouts training uses there give the padded result in
bf16, compiled or not. Deselected by default; CI has no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_gradcache import batch_of, tiny

from embedtune.model.encoder import EmbeddingModel
from embedtune.model.packing import Ragged

pytestmark = pytest.mark.gpu


def embeddings_and_grads(model: EmbeddingModel, inputs: Ragged, device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(model.prepare(inputs, device))
    weights = torch.linspace(-1, 1, out.shape[1], device=device)
    (out.float() @ weights).pow(2).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.detach().float(), grads


def compare_layouts(tokenizer_dir: Path, tmp_path: Path, device: torch.device, dtype: torch.dtype,
                    compile: bool) -> dict[str, tuple[float, float]]:
    """Max embedding difference and relative gradient difference of each layout against one
    padded block, on a batch of documents of mixed lengths."""
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    model.to(device).train()
    if compile:
        model.encoder.compile(dynamic=True)
    documents = batch_of(tokenizer, n=64).document
    reference = embeddings_and_grads(model, documents, device, dtype)
    found = {}
    model.padded_chunks = 4
    found["chunks"] = embeddings_and_grads(model, documents, device, dtype)
    model.padded_chunks = 1
    if model.enable_packing(tokenizer):
        model.train()
        found["packed"] = embeddings_and_grads(model, documents, device, dtype)
    return {name: (float((out - reference[0]).abs().max()), float((grad - reference[1]).norm() / reference[1].norm()))
            for name, (out, grad) in found.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_chunked_and_packed_layouts_match_the_padded_block_in_bf16(tokenizer_dir: Path, tmp_path: Path,
                                                                   compile: bool) -> None:
    differences = compare_layouts(tokenizer_dir, tmp_path, torch.device("cuda"), torch.bfloat16, compile)
    assert set(differences) == {"chunks", "packed"}
    for name, (embedding, gradient) in differences.items():
        assert embedding < 2e-2 and gradient < 2e-2, (name, embedding, gradient)
