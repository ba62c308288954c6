"""Training batches take the layout that costs least for their lengths (packed with attention in
groups, or padded in chunks), and every layout gives the same embeddings, losses and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_gradcache import batch_of, grads_of, tiny
from transformers import BertConfig

from embedtune.data.collate import PairCollator
from embedtune.data.records import Pair
from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.model.packing import Chunked, LayoutChoice, Packed, Padded, Plan, Ragged, padded_tokens
from embedtune.training.step import plain_step

CPU = torch.device("cpu")
MINILM = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def lengths(*runs: tuple[int, int]) -> torch.Tensor:
    """(count, length) runs -> a lengths tensor, shuffled as a batch would be."""
    values = torch.tensor([length for count, length in runs for _ in range(count)])
    return values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))]


def test_the_cpu_lays_each_batch_out_as_its_lengths_make_cheapest() -> None:
    choice = LayoutChoice.for_model(MINILM, packed=True, max_chunks=4, device=CPU)
    # Texts of one length: nothing to unpad, so one padded block (fewest calls).
    assert choice.choose(lengths((64, 16))) == Plan(False, 1)
    # Mostly padding (a few long documents among short ones): packed, attention in length groups.
    plan = choice.choose(lengths((56, 40), (8, 480)))
    assert plan.packed and plan.parts > 1
    # The chosen plan costs no more than any other, and packing saved real work on the mixed batch.
    mixed = lengths((56, 40), (8, 480))
    assert all(choice.cost(mixed, plan) <= choice.cost(mixed, other) for other in choice.plans(64, 4))
    assert choice.cost(mixed, plan) < 0.5 * choice.cost(mixed, Plan(False, 1))
    # Packing off (an architecture that failed the check): padded, in chunks where they pay.
    unpacked = LayoutChoice.for_model(MINILM, packed=False, max_chunks=4, device=CPU)
    assert not unpacked.choose(mixed).packed and unpacked.choose(mixed).parts > 1
    # A GPU keeps its fixed rule: packed whenever packing is on (varlen attention needs no groups).
    assert LayoutChoice.for_model(MINILM, True, 4, torch.device("cuda")).choose(mixed) == Plan(True, 0)
    assert LayoutChoice.for_model(MINILM, False, 4, torch.device("cuda")).choose(mixed) == Plan(False, 4)
    # And so does the CPU with model.layout_by_cost=false.
    assert LayoutChoice.for_model(MINILM, True, 4, CPU, by_cost=False).choose(lengths((64, 16))).packed


def pairs_of(short: int, long: int) -> list[Pair]:
    """Questions of a few words; answers mostly short with a few long ones."""
    return [Pair(str(i), f"question {i}?", ("word " * (long if i % 8 == 0 else short)).strip(), ())
            for i in range(48)]


def trained_by_cost(tokenizer_dir: Path, tmp_path: Path) -> tuple[EmbeddingModel, object, PairCollator]:
    """A tiny packing model in training mode, up to 4 chunks, and a collator counting its layouts."""
    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    assert model.enable_packing(tokenizer)
    model.padded_chunks = 4
    model.train()
    collate = PairCollator(tokenizer, 16, 120)
    collate.layouts = model.layout_choice(CPU)
    return model, tokenizer, collate


def test_the_chosen_layouts_give_the_losses_and_gradients_of_one_padded_block(tokenizer_dir: Path,
                                                                              tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, tokenizer, collate = trained_by_cost(tokenizer_dir, tmp_path)
    batches = [collate(pairs_of(short, long)) for short, long in ((5, 100), (30, 36), (8, 8))]
    for batch in batches + [batch_of(tokenizer, n=48)]:
        model.layout_by_cost = True
        kinds = {type(model.prepare(side, CPU)) for side in (batch.query, batch.document)}
        assert kinds <= {Packed, Padded, Chunked}
        chosen_loss = plain_step(model, batch, MultipleNegativesRankingLoss(), 1.0, accelerator)
        chosen = grads_of(model)
        model.layout_by_cost, model.packed = False, False  # one padded block
        model.padded_chunks = 1
        block_loss = plain_step(model, batch, MultipleNegativesRankingLoss(), 1.0, accelerator)
        block = grads_of(model)
        model.packed, model.padded_chunks = True, 4
        assert chosen_loss.item() == pytest.approx(block_loss.item(), rel=1e-5)
        for name, grad in block.items():
            torch.testing.assert_close(chosen[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The batches above took more than one layout between them: the choice follows the lengths.
    model.layout_by_cost = True
    plans = {model.layout_choice(CPU).choose(b.document.lengths) for b in batches}
    assert len(plans) > 1


def test_the_tokens_counted_as_computed_are_those_of_the_layout_taken(tokenizer_dir: Path, tmp_path: Path) -> None:
    model, _, collate = trained_by_cost(tokenizer_dir, tmp_path)
    for short, long in ((5, 100), (30, 36), (8, 8)):
        batch = collate(pairs_of(short, long))
        computed = 0
        for side in (batch.query, batch.document):
            ready = model.prepare(side, CPU)
            if isinstance(ready, Packed):
                computed += len(ready.input_ids)
            elif isinstance(ready, Chunked):
                computed += sum(chunk.input_ids.numel() for chunk in ready.chunks)
            else:
                computed += ready.input_ids.numel()
        assert batch.computed_tokens == computed
        assert batch.real_tokens <= computed <= sum(padded_tokens(s.lengths) for s in (batch.query, batch.document))


def test_packed_attention_in_length_groups_matches_one_padded_block(tokenizer_dir: Path, tmp_path: Path) -> None:
    from embedtune.model.packing import pack_ragged, pad_ragged

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    assert model.enable_packing(tokenizer)
    model.eval()
    ids = [list(range(5, 5 + n)) for n in (3, 40, 7, 7, 1, 25, 12, 2)]
    ragged = Ragged(torch.tensor([i for t in ids for i in t]), torch.tensor([len(t) for t in ids]))
    with torch.no_grad():
        padded = model(pad_ragged(ragged, model.pad_token_id))
        for groups in (1, 2, 3, 8, 20):
            torch.testing.assert_close(model(pack_ragged(ragged, groups)), padded, rtol=1e-5, atol=1e-6)
