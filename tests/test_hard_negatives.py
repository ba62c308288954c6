"""Hard negatives mined during training (train.hard_negatives): what a round picks, that the steps
train on it, that it is refreshed when asked, and that a killed run resumes onto the same ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from test_resume import args_for, assert_same_run, batches, finish, kill_when, logged_steps, start

from embedtune.commands.train import main
from embedtune.config import ConfigError, parse_args
from embedtune.data.records import Pair, is_held_out, read_pairs, text_key
from embedtune.data.stream import make_loader
from embedtune.mining.refresh import MinedNegatives, pair_key
from embedtune.training.trainer import Trainer

ROUND = "hard negatives mined with the weights of step"


def sharing_pairs(n: int) -> list[dict]:
    """Pairs whose answers share words across records, and questions asked twice with two answers."""
    records = make_pairs(n, seed=9)
    records.append({"question": records[0]["question"], "answer": "a second, different answer to the first question"})
    return records


def trainer_for(model: Path, data: Path, out: Path, *extra: str) -> Trainer:
    cfg = parse_args(["--input_jsonl", str(data), "--base_model", str(model), "--output_dir", str(out),
                      "--batch_size", "8", "--learning_rate", "1e-3", "data.eval_fraction=0.2", "data.num_workers=0",
                      "data.query_max_length=24", "data.document_max_length=32", "tracking.report_to=none",
                      "checkpoint.every_n_steps=null", "eval.before=false", *extra])
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer


def test_a_round_gives_each_training_pair_other_training_answers_and_never_a_held_out_one(
        tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", sharing_pairs(60))
    trainer = trainer_for(tiny_model, data, tmp_path / "out", "train.hard_negatives={num: 3, relative_margin: 0.0}")
    try:
        trainer._mine()
        table = trainer.mined
        assert table is not None and table.step == 0
        pairs = [p for p in read_pairs([str(data)], trainer.cfg.data) if isinstance(p, Pair)]
        training = [p for p in pairs if not is_held_out(p, 0.2)]
        held_out_answers = {p.positive for p in pairs if is_held_out(p, 0.2)} - {p.positive for p in training}
        assert held_out_answers and len(table) == len(training)
        answers_of: dict[int, set[str]] = {}
        for p in training:
            answers_of.setdefault(text_key(p.query), set()).add(p.positive)
        for pair in training:
            negatives = table.negatives_of(pair)
            assert negatives is not None and len(negatives) == 3
            assert not set(negatives) & answers_of[text_key(pair.query)]  # never an answer of its own question
            assert all(n in {p.positive for p in training} for n in negatives)
            assert not set(negatives) & held_out_answers
        # The stream hands the pairs over with these negatives in place of their own.
        batches = [b for b, _ in trainer.dataset.global_batches()]
        assert all(p.negatives == table.negatives_of(p) for b in batches for p in b)
        # Its checkpointed state reads back with the weights-only reader, unchanged.
        buffer = io.BytesIO()
        torch.save(table.state_dict(), buffer)
        buffer.seek(0)
        again = MinedNegatives()
        again.load_state_dict(torch.load(buffer, weights_only=True))
        assert all(again.negatives_of(p) == table.negatives_of(p) for p in training)
        assert again.negatives_of(Pair("x", "a question never seen", "an answer")) is None
    finally:
        trainer.lock.release()


def test_a_margin_keeps_documents_scored_almost_as_high_as_the_answer_out(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", sharing_pairs(60))
    found = {}
    for margin in (0.0, 0.5):
        trainer = trainer_for(tiny_model, data, tmp_path / f"out{margin}",
                              f"train.hard_negatives={{num: 2, relative_margin: {margin}}}")
        try:
            trainer._mine()
            table = trainer.mined
            found[margin] = sum(len(r[r >= 0]) for r in table.rows)  # type: ignore[union-attr]
            if margin:
                # Every negative kept scores below half the positive's score.
                model = trainer.accelerator.unwrap_model(trainer.model)
                collate = trainer.collate
                pairs = [p for p in read_pairs([str(data)], trainer.cfg.data) if isinstance(p, Pair)
                         and not is_held_out(p, 0.2)][:10]
                model.eval()
                with torch.no_grad():
                    for pair in pairs:
                        negatives = table.negatives_of(pair)
                        texts = [pair.positive, *negatives]
                        q = model(model.prepare(collate.queries([pair.query]), torch.device("cpu")))
                        d = model(model.prepare(collate.documents(texts), torch.device("cpu")))
                        scores = (q @ d.T)[0]
                        assert all(s < 0.5 * scores[0] + 1e-5 for s in scores[1:])
        finally:
            trainer.lock.release()
    assert found[0.5] < found[0.0]


def test_steps_train_on_the_mined_negatives_and_each_round_uses_the_weights_of_its_step(
        tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", sharing_pairs(80))
    out = tmp_path / "out"
    # No margin: every pair gets its negative whatever the (random) weights score.
    trainer = trainer_for(tiny_model, data, out, "train.hard_negatives={every_n_steps: 3, relative_margin: null}",
                          "--epochs", "2")
    seen: list[tuple[int, int, int]] = []
    train_step = trainer.step_fn
    tables: dict[int, dict[str, torch.Tensor]] = {}
    mine = trainer._mine

    def counting(model, batch, loss_fn, share, accelerator):  # noqa: ANN001, ANN202
        seen.append((trainer.state.step, batch.num_positives, int(batch.negative_owner.numel())))
        return train_step(model, batch, loss_fn, share, accelerator)

    def keeping() -> None:
        mine()
        tables[trainer.state.step] = {k: v.clone() for k, v in trainer.mined.state_dict().items()  # type: ignore[union-attr]
                                      if isinstance(v, torch.Tensor)}

    trainer.step_fn = counting
    trainer._mine = keeping  # type: ignore[method-assign]
    try:
        summary = trainer.train()
    finally:
        trainer.lock.release()
    steps = summary["step"]
    # A round before step 1, then every 3 steps (none after the last step), across the epoch boundary.
    assert sorted(tables) == list(range(0, steps, 3))
    # Every micro-step trained with a mined negative for each of its pairs.
    assert all(negatives == pairs for _, pairs, negatives in seen)
    # The weights move, so later rounds pick other negatives than the base model did.
    assert any(not torch.equal(tables[0]["rows"], tables[s]["rows"]) for s in tables if s)
    log = (out / "logs" / "train.log").read_text()
    assert log.count(ROUND) == len(tables)
    metrics = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in metrics if "negatives/per_pair" in m]
    assert [m["step"] for m in rounds] == sorted(tables) and all(m["negatives/per_pair"] > 0.9 for m in rounds)


def test_every_epoch_mines_at_each_epochs_start_and_not_twice_on_a_rounds_step(tiny_model: Path,
                                                                              tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", sharing_pairs(80))
    out = tmp_path / "out"
    # 65 training pairs in batches of 8: 9 steps an epoch; rounds every 3 steps land on step 9 too.
    trainer = trainer_for(tiny_model, data, out, "train.hard_negatives={every_epoch: true, every_n_steps: 3}",
                          "--epochs", "3")
    try:
        summary = trainer.train()
    finally:
        trainer.lock.release()
    log = (out / "logs" / "train.log").read_text()
    rounds = [int(line.split(ROUND)[1].split(":")[0]) for line in log.splitlines() if ROUND in line]
    steps = summary["step"]
    per_epoch = steps // 3
    assert rounds == sorted(set(range(0, steps, 3)) | {per_epoch, 2 * per_epoch})


def killed_and_resumed(model: Path, data: Path, tmp_path: Path, kill_at: int, *settings: str) -> Path:
    """A run SIGKILLed once it has logged ``kill_at`` steps, then resumed: checked to be the same
    run (batches, weights) as an uninterrupted one; returns its output folder."""
    extra = ("tracking.report_to=none", *settings)
    reference = tmp_path / "reference"
    finish(start(args_for(model, data, reference, *extra)))
    out = tmp_path / "out"
    args = args_for(model, data, out, *extra)
    run = start(args)
    kill_when(run, lambda: logged_steps(out) >= kill_at)
    run.wait()
    assert not (out / "final_model").exists()
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference)
    return out


def test_a_killed_run_resumes_onto_the_negatives_its_checkpoint_holds(models, data, tmp_path: Path) -> None:
    # Rounds and checkpoints both every 4 steps: the checkpoint of a step holds that step's round.
    out = killed_and_resumed(models["dropout"], data, tmp_path, 10, "train.hard_negatives={every_n_steps: 4, num: 2}")
    log = (out / "logs" / "train.log").read_text()
    resumed = log[log.index("resumed from"):]
    at = int(resumed.split("step ", 1)[1].split(",")[0])
    rounds = [int(line.split(ROUND)[1].split(":")[0]) for line in resumed.splitlines() if ROUND in line]
    # The resumed part took its checkpoint's round rather than mining one at its start.
    assert at % 4 == 0 and at >= 8 and rounds[0] == at + 4


def saved_table(out: Path, step: int) -> MinedNegatives:
    table = MinedNegatives()
    table.load_state_dict(torch.load(out / "checkpoints" / f"step-{step:08d}" / "custom_checkpoint_1.pkl",
                                     weights_only=True))
    return table


def test_two_processes_mine_the_same_negatives_as_one_and_train_the_same_run(models, data, tmp_path: Path) -> None:
    extra = ("tracking.report_to=none", "train.hard_negatives={num: 2, every_n_steps: 12}", "--epochs", "1",
             "checkpoint.keep_last=10")
    runs = {}
    for processes in (1, 2):
        runs[processes] = tmp_path / f"p{processes}"
        finish(start(args_for(models["plain"], data, runs[processes], *extra), processes=processes))
    # Each process embedded and searched its share; both ended with the whole table, the one
    # process's (the base model's round, kept in the step-4 checkpoint; and step 12's).
    for step in (4, 12):
        one, two = saved_table(runs[1], step), saved_table(runs[2], step)
        assert one.step == two.step == (0 if step == 4 else 12) and len(one) == len(two) > 100
        assert torch.equal(one.keys, two.keys) and one.texts == two.texts
        assert (one.rows != two.rows).float().mean() < 0.02  # float rounding may swap a near tie
    assert_same_run(runs[2], runs[1], atol=5e-5)


def test_in_batch_mode_puts_each_pairs_negatives_in_its_own_batch_and_keeps_the_epoch(
        tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", sharing_pairs(200))
    trainer = trainer_for(tiny_model, data, tmp_path / "out",
                          "train.hard_negatives={in_batch: true, num: 1, relative_margin: null}")
    try:
        table = trainer.mined
        plain = [[p.id for p in b] for b, _ in trainer.dataset.global_batches()]
        trainer._mine()
        dataset = trainer.dataset
        grouped = [b for b, _ in dataset.global_batches()]
        # The same pairs, once each, in as many batches of the same sizes; no negatives attached.
        assert sorted(p.id for b in grouped for p in b) == sorted(i for b in plain for i in b)
        assert [len(b) for b in grouped] == [len(b) for b in plain]
        assert all(p.negatives == () for b in grouped for p in b)

        def together(batches: list[list[Pair]]) -> float:
            """Share of pairs whose mined negative is the answer of another pair in their batch."""
            hits = total = 0
            for batch in batches:
                answers = {text_key(p.positive) for p in batch}
                for pair in batch:
                    keys = table.negative_keys(pair)  # type: ignore[union-attr]
                    total += 1
                    hits += bool(keys) and keys[0] in answers
            return hits / total

        by_id = {p.id: p for b in grouped for p in b}
        # Hubs (answers close to many questions) cap what any grouping reaches; random batches reach B/N.
        assert together(grouped) > 0.35 and together(grouped) > 5 * together([[by_id[i] for i in b] for b in plain])
        # Fixed by (data, seed, epoch, negatives): workers and a resumed position give the same batches.
        ids = [[p.id for p in b] for b in grouped]
        dataset.set_position(0, 3)
        assert [b.ids for b in make_loader(dataset, 2, pin_memory=False)] == ids[3:]
    finally:
        trainer.lock.release()


def test_an_in_batch_run_killed_mid_epoch_resumes_into_the_same_run(models, data, tmp_path: Path) -> None:
    # Killed in the second epoch, after its round.
    out = killed_and_resumed(models["dropout"], data, tmp_path, 22,
                             "train.hard_negatives={in_batch: true, every_epoch: true, window: 4}")
    plain = tmp_path / "plain"
    finish(start(args_for(models["dropout"], data, plain, "tracking.report_to=none")))
    assert sorted(map(tuple, (ids for _, ids in batches(out)))) != sorted(map(tuple, (ids for _, ids in batches(plain))))


def test_hard_negatives_need_an_in_batch_loss_and_a_time_to_mine(tiny_model: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{**r, "label": 1.0} for r in make_pairs(20)])
    with pytest.raises(ConfigError, match="mines never"):
        parse_args(["--input_jsonl", str(data), "train.hard_negatives={before_training: false}"])
    with pytest.raises(ConfigError, match="margin or relative_margin, not both"):
        parse_args(["--input_jsonl", str(data), "train.hard_negatives={margin: 0.1, relative_margin: 0.1}"])
    out = tmp_path / "out"
    assert main(["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(out),
                 "loss.name=CoSENTLoss", "data.label_field=label", "train.hard_negatives={num: 1}",
                 "tracking.report_to=none"]) == 1
    assert "train.hard_negatives trains mined negatives with the in-batch ones, which CoSENTLoss does not use" \
        in capsys.readouterr().err


def test_pair_keys_follow_the_normalized_texts() -> None:
    assert pair_key("What is X?", "X is a thing.") == pair_key("what  is x?", "x is a THING.")
    assert pair_key("What is X?", "X is a thing.") != pair_key("What is X?", "Y is a thing.")
