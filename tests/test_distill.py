"""Distillation on a teacher's scores: the losses against sentence-transformers' own, the scores
validated per record and kept with the right texts through shuffling, workers, processes, GradCache
and resume."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from test_distributed import run_training, tiny_model_no_dropout  # noqa: F401 (a fixture)
from test_gradcache import accelerator, grads_of, tiny  # noqa: F401 (a fixture)
from test_resume import assert_same_run, finish, kill_when, logged_steps, start

from embedtune.commands.train import main
from embedtune.config import DataConfig
from embedtune.data.collate import PairCollator
from embedtune.data.records import Pair, Reject, is_held_out, parse_record
from embedtune.data.stream import PairBatches, make_loader
from embedtune.losses.base import Embedded
from embedtune.losses.distill import DistillKLDivLoss, MarginMSELoss
from embedtune.losses.ranking import MultipleNegativesRankingLoss
from embedtune.model.encoder import EmbeddingModel
from embedtune.training.step import GradCacheStep, plain_step


def teacher(query: str, document: str) -> float:
    """A made-up teacher: a score that is a function of the very texts, so a score that travels
    with the wrong text is seen."""
    digest = hashlib.sha256(f"{query}\x00{document}".encode()).digest()
    return round(int.from_bytes(digest[:4], "big") / 2**32 * 10 - 5, 6)


def scored_records(n: int, seed: int = 0) -> list[dict]:
    records = make_pairs(n, seed=seed)
    for i, r in enumerate(records):
        r["negatives"] = [f"an unrelated note about item {i}", f"story {i + 1} without a link",
                          f"a third text {i}"][: 1 + i % 3]
        r["scores"] = [teacher(r["question"], d) for d in [r["answer"], *r["negatives"]]]
    return records


# --- the losses ----------------------------------------------------------------------------------


def embedded_of(q: torch.Tensor, p: torch.Tensor, negatives: list[torch.Tensor], owner: list[int],
                scores: torch.Tensor, negative_scores: torch.Tensor) -> Embedded:
    return Embedded(queries=q, positives=p, negatives=torch.stack(negatives), negative_owner=torch.tensor(owner),
                    positive_scores=scores, negative_scores=negative_scores)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ["MarginMSELoss", "DistillKLDivLoss"])
def test_the_losses_give_sentence_transformers_values_and_gradients(name: str, k: int) -> None:
    from sentence_transformers.sentence_transformer import losses

    torch.manual_seed(k)
    batch, dim = 6, 16
    q, p = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim, requires_grad=True)
    n = torch.randn(batch, k, dim, requires_grad=True)
    labels = torch.randn(batch, k + 1) * 4
    theirs = (losses.MarginMSELoss(model=None) if name == "MarginMSELoss"
              else losses.DistillKLDivLoss(model=None, temperature=2.0))
    expected = theirs.compute_loss_from_embeddings([q, p, *n.unbind(1)], labels)
    expected_grads = torch.autograd.grad(expected, [q, p, n])
    ours = MarginMSELoss() if name == "MarginMSELoss" else DistillKLDivLoss(temperature=2.0)
    batch_view = Embedded(queries=q, positives=p, negatives=n.reshape(batch * k, dim),
                          negative_owner=torch.arange(batch).repeat_interleave(k), positive_scores=labels[:, 0],
                          negative_scores=labels[:, 1:].reshape(-1))
    got = ours(batch_view)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for mine, reference in zip(torch.autograd.grad(got, [q, p, n]), expected_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["MarginMSELoss", "DistillKLDivLoss"])
def test_pairs_with_other_numbers_of_negatives_each_weigh_one_pair(name: str) -> None:
    """Two pairs with 1 and 3 negatives: the mean of each pair's own loss, as sentence-transformers
    computes it for a batch of that pair alone."""
    from sentence_transformers.sentence_transformer import losses

    torch.manual_seed(0)
    q, p, n = torch.randn(2, 8), torch.randn(2, 8), torch.randn(4, 8)
    teacher_positive, teacher_negative = torch.tensor([3.0, 2.0]), torch.tensor([1.0, -1.0, 0.5, 4.0])
    owner = [0, 1, 1, 1]
    theirs = losses.MarginMSELoss(model=None) if name == "MarginMSELoss" else losses.DistillKLDivLoss(model=None)
    per_pair = [theirs.compute_loss_from_embeddings([q[:1], p[:1], n[0:1]], torch.tensor([[3.0, 1.0]])),
                theirs.compute_loss_from_embeddings([q[1:], p[1:], n[1:2], n[2:3], n[3:4]],
                                                    torch.tensor([[2.0, -1.0, 0.5, 4.0]]))]
    ours = MarginMSELoss() if name == "MarginMSELoss" else DistillKLDivLoss()
    got = ours(embedded_of(q, p, list(n), owner, teacher_positive, teacher_negative))
    assert got.item() == pytest.approx(sum(v.item() for v in per_pair) / 2, rel=1e-5)


@pytest.mark.parametrize("name", ["MarginMSELoss", "DistillKLDivLoss"])
def test_a_pair_without_negatives_trains_the_ranking_term_only(name: str) -> None:
    """With loss.distill, a record without hard negatives is not a bad record: it adds nothing to the
    distillation term, which stays a mean over all the pairs (so that it is exact over processes)."""
    from embedtune.losses import requires_negatives
    from embedtune.losses.distill import RankingWithDistillation

    torch.manual_seed(1)
    q, p, n = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    owner = [0, 0, 2]  # the second pair has none
    teacher_positive, teacher_negative = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, -1.0, 0.5])
    distill = MarginMSELoss() if name == "MarginMSELoss" else DistillKLDivLoss()
    ranking = MultipleNegativesRankingLoss(scale=20.0)
    combined = RankingWithDistillation(ranking, distill, weight=0.5)
    assert not requires_negatives(combined.needs) and requires_negatives(distill.needs)
    batch = embedded_of(q, p, list(n), owner, teacher_positive, teacher_negative)
    # The pairs with negatives, alone: each one's own loss, then the mean over all 3 pairs.
    first = distill(embedded_of(q[:1], p[:1], list(n[:2]), [0, 0], teacher_positive[:1], teacher_negative[:2]))
    third = distill(embedded_of(q[2:], p[2:], list(n[2:]), [0], teacher_positive[2:], teacher_negative[2:]))
    assert distill(batch).item() == pytest.approx((first.item() + third.item()) / 3, rel=1e-5)
    assert combined(batch).item() == pytest.approx(ranking(batch).item() + 0.5 * distill(batch).item(), rel=1e-6)


def test_gradcache_gives_the_distillation_gradients_of_the_plain_step(tokenizer_dir: Path, tmp_path: Path,
                                                                       accelerator) -> None:  # noqa: F811
    from embedtune.losses.distill import RankingWithDistillation

    model, tokenizer = EmbeddingModel.from_pretrained(str(tiny(tokenizer_dir, tmp_path, dropout=0.0)))
    pairs = [Pair(str(i), r["question"], r["answer"], tuple(r["negatives"]), scores=tuple(r["scores"]))
             for i, r in enumerate(scored_records(10))]
    batch = PairCollator(tokenizer, 24, 40)(pairs)
    for loss_fn in (MarginMSELoss(), DistillKLDivLoss(temperature=0.5),
                    RankingWithDistillation(MultipleNegativesRankingLoss(), MarginMSELoss(), 0.3)):
        plain_loss = plain_step(model, batch, loss_fn, 1.0, accelerator)
        plain = grads_of(model)
        cached_loss = GradCacheStep(3)(model, batch, loss_fn, 1.0, accelerator)
        cached = grads_of(model)
        assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
        for name, grad in plain.items():
            torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- the scores in the data ----------------------------------------------------------------------


@pytest.mark.parametrize("scores, says", [
    ([1.0], "lists 1 teacher score(s) for the positive and 2 hard negative(s)"),
    ([1.0, 2.0, 3.0, 4.0], "lists 4 teacher score(s)"),
    ([1.0, float("nan"), 2.0], "must be a list of finite numbers"),
    ([1.0, True, 2.0], "must be a list of finite numbers"),
    ("1 2 3", "must be a list of finite numbers"),
])
def test_scores_that_do_not_fit_the_record_are_a_named_bad_record(scores, says: str) -> None:
    cfg = DataConfig(train_files=["x"], negatives_field="negatives", scores_field="scores", eval_fraction=0.0)
    record = {"question": "q", "answer": "a", "negatives": ["n1", "n2"], "scores": scores}
    item = parse_record("train.jsonl", 7, json.dumps(record), cfg)
    assert isinstance(item, Reject) and says in item.message() and item.message().startswith("train.jsonl, line 7")


def test_scores_are_kept_for_the_negatives_kept_and_held_out_records_need_none() -> None:
    cfg = DataConfig(train_files=["x"], negatives_field="negatives", scores_field="scores", max_negatives=2,
                     eval_fraction=0.5)
    record = {"question": "q", "answer": "a", "negatives": ["n1", "n2", "n3"], "scores": [4, 3, 2, 1]}
    pair = parse_record("f", 1, json.dumps(record), cfg)
    assert pair.negatives == ("n1", "n2") and pair.scores == (4.0, 3.0, 2.0)
    # Without scores: a bad record when it trains, fine when it is held out.
    found = {"trains": None, "held": None}
    for i in range(40):
        bare = {"question": f"question {i}", "answer": "a"}
        item = parse_record("f", i + 1, json.dumps(bare), cfg)
        held = is_held_out(Pair("", bare["question"], "a"), 0.5)
        found["held" if held else "trains"] = item
    assert isinstance(found["held"], Pair) and found["held"].scores is None
    assert isinstance(found["trains"], Reject) and "`embedtune score`" in found["trains"].reason


@pytest.mark.parametrize("workers, processes", [(0, 1), (2, 1), (2, 2)])
def test_scores_travel_with_their_texts_through_shuffling_workers_and_processes(
        tmp_path: Path, tokenizer_dir: Path, workers: int, processes: int) -> None:
    from transformers import AutoTokenizer

    records = scored_records(60)
    path = write_jsonl(tmp_path / "scored.jsonl", records)
    cfg = DataConfig(train_files=[str(path)], negatives_field="negatives", scores_field="scores", shuffle_buffer=16,
                     eval_fraction=0.0)
    collate = PairCollator(AutoTokenizer.from_pretrained(tokenizer_dir), 24, 32)
    seen = 0
    for rank in range(processes):
        dataset = PairBatches(cfg, 8, 1, seed=5, collate=collate, num_processes=processes, rank=rank)
        dataset.set_epoch(1)
        for batch in make_loader(dataset, workers, pin_memory=False):
            rows = [records[int(i.rsplit(":", 1)[1]) - 1] for i in batch.ids]
            expected = [r["scores"][0] for r in rows] + [s for r in rows for s in r["scores"][1:]]
            assert batch.scores.tolist() == pytest.approx(expected)
            # ... and each is the teacher's score of the text in that place.
            texts = [r["answer"] for r in rows] + [n for r in rows for n in r["negatives"]]
            queries = [r["question"] for r in rows] + [r["question"] for r in rows for _ in r["negatives"]]
            assert batch.scores.tolist() == pytest.approx([teacher(q, d) for q, d in zip(queries, texts, strict=True)])
            seen += len(rows)
    assert seen == 60


# --- training ------------------------------------------------------------------------------------


def distill_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["--input_jsonl", str(data), "--base_model", str(model), "--batch_size", "8", "--learning_rate", "5e-3",
            "data.negatives_field=negatives", "data.scores_field=scores", "data.num_workers=2",
            "data.query_max_length=24", "data.document_max_length=32", "train.warmup_ratio=0",
            "tracking.log_every_n_steps=1", "train.mixed_precision=no", "data.eval_fraction=0.2", *extra]


def test_two_processes_distill_as_one(tiny_model_no_dropout: Path, tmp_path: Path) -> None:  # noqa: F811
    """Some records have no hard negative (mining with a margin leaves some without): they train the
    ranking term only, and the run is still the same on 2 processes with GradCache as on 1."""
    records = scored_records(27)
    for record in records[::4]:
        record["negatives"], record["scores"] = [], record["scores"][:1]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    args = distill_args(tiny_model_no_dropout, data, "loss.distill=MarginMSELoss", "loss.distill_weight=0.5",
                        "train.hard_negatives=null")
    one = run_training(1, args + ["tracking.report_to=none"], tmp_path / "one")
    two = run_training(2, args + ["loss.mini_batch_size=3", "tracking.report_to=none"], tmp_path / "two")
    assert len(one["losses"]) >= 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], tensor, rtol=1e-4, atol=5e-5, msg=name)


def test_a_killed_distillation_run_resumes_into_the_same_run(models: dict[str, Path], tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", scored_records(90))
    extra = ("data.scores_field=scores", "--loss_function", "DistillKLDivLoss", "loss.temperature=0.5",
             "tracking.report_to=none")
    from test_resume import args_for

    reference, out = tmp_path / "reference", tmp_path / "out"
    finish(start(args_for(models["dropout"], data, reference, *extra)))
    run = start(args_for(models["dropout"], data, out, *extra))
    kill_when(run, lambda: logged_steps(out) >= 9)
    run.wait()
    assert not (out / "final_model").exists()
    finish(start(args_for(models["dropout"], data, out, *extra, "--resume_from_checkpoint", "latest")))
    assert_same_run(out, reference)
    losses = [json.loads(line)["loss"] for line in (out / "training_metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert all(math.isfinite(v) for v in losses)


def test_each_term_is_logged_so_that_the_weight_can_be_chosen(tiny_model: Path, tmp_path: Path) -> None:
    """The run logs the ranking term and the (unweighted) distillation term beside the loss, which is
    their weighted sum: a user sees whether distill_weight makes the teacher's term matter."""
    data = write_jsonl(tmp_path / "train.jsonl", scored_records(40))
    out = tmp_path / "out"
    assert main(distill_args(tiny_model, data, "--output_dir", str(out), "loss.distill=DistillKLDivLoss",
                             "loss.temperature=0.5", "loss.distill_weight=3", "train.hard_negatives=null",
                             "tracking.report_to=none")) == 0
    rows = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) >= 4  # about 32 training pairs, batch 8, logged every step
    for row in steps:
        assert row["distill_loss"] > 0 and row["ranking_loss"] > 0
        assert row["loss"] == pytest.approx(row["ranking_loss"] + 3 * row["distill_loss"], rel=1e-5)


@pytest.mark.parametrize("settings, says", [
    (["--loss_function", "MarginMSELoss"], "MarginMSELoss learns a teacher's scores: set data.scores_field"),
    (["loss.distill=DistillKLDivLoss"], "DistillKLDivLoss learns a teacher's scores: set data.scores_field"),
    (["loss.distill=MarginMSELoss", "data.scores_field=scores", "train.hard_negatives={in_batch: false}"],
     "whose teacher scores (data.scores_field) then score other texts"),
    (["--loss_function", "TripletLoss", "loss.distill=MarginMSELoss"], "loss.distill adds its term to an in-batch"),
    (["loss.distill=MarginMSELoss", "data.scores_field=scores", "data.negatives_field=null"],
     "loss.distill=MarginMSELoss learns the teacher's scores of each record's hard negatives: set "
     "data.negatives_field"),
])
def test_what_cannot_distill_is_one_line_before_training(tiny_model: Path, tmp_path: Path, capsys,
                                                         settings: list[str], says: str) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", scored_records(20))
    out = tmp_path / "out"
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(out),
            "data.negatives_field=negatives", "tracking.report_to=none", *settings]
    # A config that does not validate is a usage error (2); one the setup refuses, an error (1).
    assert main(args) == (2 if "loss.distill adds" in says else 1)
    err = capsys.readouterr().err
    assert says in " ".join(err.split()), err
    assert not (out / "final_model").exists()
