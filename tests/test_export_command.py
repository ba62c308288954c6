"""``embedtune export CHECKPOINT OUT``: any checkpoint, of a finished run or of one stopped before its
end, becomes a sentence-transformers folder with the weights of its step and a card that says so,
without the training data; bad input is refused in one line and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, write_jsonl
from safetensors.torch import load_file

from embedtune.commands.export import main
from embedtune.data.fingerprint import data_fingerprint

TEXTS = ["what links apple and river number 3?", "the engine meets the violin in story 7.", "a tale of copper"]


def train(tiny_model: Path, folder: Path, *extra: str) -> Path:
    """A 6-step run saving checkpoints every 3 steps; its training data is deleted afterwards."""
    from accelerate.state import AcceleratorState

    from embedtune.commands.train import main as train_main

    data = write_jsonl(folder / "pairs.jsonl", make_pairs(120))
    out = folder / "out"
    assert train_main(["--input_jsonl", str(data), "--base_model", str(tiny_model), "--output_dir", str(out),
                       "--batch_size", "16", "--learning_rate", "1e-3", "data.num_workers=0",
                       "data.query_max_length=24", "data.document_max_length=32", "train.max_steps=6",
                       "train.warmup_ratio=0", "data.eval_fraction=0.2", "tracking.report_to=none",
                       "tracking.log_every_n_steps=1", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3",
                       *extra]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    (folder / "fingerprint.json").write_text(json.dumps(data_fingerprint([str(data)])))
    data.unlink()  # an export never needs it
    return out


@pytest.fixture(scope="module")
def finished(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run, evaluated at step 3 and at its end (step 6), with checkpoints at both."""
    return train(tiny_model, tmp_path_factory.mktemp("finished"), "eval.every_n_steps=3")


@pytest.fixture(scope="module")
def stopped(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped as a preempted one is (SIGTERM during its checkpoint at step 3): it saves step 4
    and exits without a final model. Each save is scored on the held-out set (checkpoint.best_metric)."""
    from embedtune.training import checkpoint

    def preempt(folder: str) -> None:
        if folder.endswith("step-00000003.tmp"):
            signal.raise_signal(signal.SIGTERM)  # the training loop's handler takes it: stop after this step

    checkpoint.SAVE_HOOKS.append(preempt)
    try:
        return train(tiny_model, tmp_path_factory.mktemp("stopped"), "checkpoint.best_metric=ndcg@10")
    finally:
        checkpoint.SAVE_HOOKS.remove(preempt)


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def encode(folder: Path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)


def embeddings_at(base: Path, checkpoint: Path) -> torch.Tensor:
    """The embeddings of the model with a checkpoint's weights, computed by embedtune's own forward."""
    from embedtune.model.encoder import EmbeddingModel
    from embedtune.model.packing import Padded

    model, tokenizer = EmbeddingModel.from_pretrained(str(base))
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    model.eval()
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(Padded(tokens["input_ids"], tokens["attention_mask"]))


def hub_card(folder: Path) -> tuple[dict[str, float], dict[str, float], object]:
    """(this model's held-out figures, the base model's, the card's metadata), read with the Hub's own parser."""
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(folder / "README.md")
    index = metadata_load(folder / "README.md").get("model-index")
    results = model_index_to_eval_results(index)[1] if index else []
    assert all(r.task_type == "information-retrieval" and r.dataset_type == "held-out" for r in results)
    after = {r.metric_type.removeprefix("cosine_"): r.metric_value for r in results
             if r.metric_type.startswith("cosine_")}
    before = {r.metric_type.removeprefix("base_model_cosine_"): r.metric_value for r in results
              if r.metric_type.startswith("base_model_cosine_")}
    return after, before, card.data


def eval_row(out: Path, step: int) -> dict[str, float]:
    """The first evaluation the run logged at ``step``."""
    for line in (out / "training_metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] == step and "eval/ndcg@10" in row:
            return {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
    raise AssertionError(f"no evaluation at step {step}")


def test_the_last_checkpoint_of_a_finished_run_is_its_final_model(finished: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    assert main([str(step_dir(finished, 6)), str(out)]) == 0
    assert f"{out}: the model of step-00000006 (step 6)" in capsys.readouterr().out
    assert not (tmp_path / "model.tmp").exists()
    torch.testing.assert_close(encode(out), encode(finished / "final_model"), rtol=0, atol=1e-6)

    text = (out / "README.md").read_text()
    assert "the weights of step 6, exported from `step-00000006` with `embedtune export`" in text
    assert "its last step (the run finished there)" in text
    progress = json.loads((finished / "training_progress.json").read_text())
    after, before, data = hub_card(out)
    assert after == progress["eval_after"] == eval_row(finished, 6)
    assert before == progress["eval_before"] == eval_row(finished, 0)
    assert "loss:MultipleNegativesRankingLoss" in data.tags and data.library_name == "sentence-transformers"
    # The data is gone: the card gives it as the checkpoint recorded it, the same fingerprint as before.
    fingerprint = json.loads((finished.parent / "fingerprint.json").read_text())["sha256"]
    assert f"`{fingerprint}`" in text and "as the run recorded them in the checkpoint" in text


def test_a_checkpoint_in_the_middle_has_the_weights_and_metrics_of_its_step(finished: Path, tiny_model: Path,
                                                                            tmp_path: Path) -> None:
    checkpoint = step_dir(finished, 3)
    out = tmp_path / "model"
    assert main([str(checkpoint), str(out)]) == 0
    saved, exported = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, saved[f"encoder.{name}"], rtol=0, atol=0, msg=name)
    at_step = encode(out)
    torch.testing.assert_close(at_step, embeddings_at(tiny_model, checkpoint), rtol=0, atol=1e-5)
    assert not torch.allclose(at_step, encode(finished / "final_model"), atol=1e-4)  # step 3 is not step 6

    text = (out / "README.md").read_text()
    assert "# out (step 3)" in text and "the run went on to step 6 and finished" in text
    assert "after this checkpoint's weights as the run evaluated them at step 3" in text
    after, before, _ = hub_card(out)
    assert after == eval_row(finished, 3) and before == eval_row(finished, 0)
    assert after != eval_row(finished, 6)


def test_the_last_checkpoint_of_a_stopped_run(stopped: Path, tiny_model: Path, tmp_path: Path) -> None:
    from embedtune.training.checkpoint import best_checkpoint, complete_checkpoints
    from embedtune.training.state import TrainerState

    assert not (stopped / "final_model").exists()
    assert not json.loads((stopped / "training_progress.json").read_text())["completed"]
    last = Path(complete_checkpoints(str(stopped))[-1])
    assert last.name == "step-00000004"
    out = tmp_path / "model"
    assert main([str(last), str(out)]) == 0
    torch.testing.assert_close(encode(out), embeddings_at(tiny_model, last), rtol=0, atol=1e-5)

    text = (out / "README.md").read_text()
    scores = TrainerState.load(str(last)).scores
    score = scores["step-00000004"]
    assert "the weights of step 4" in text and "the run had not finished at export" in text
    assert f"held-out ndcg@10 {score:.4f} at this step" in text
    best = best_checkpoint(scores) == last.name
    assert ("the best of the 2 checkpoints the run scored" in text) == best
    after, before, _ = hub_card(out)
    assert after == eval_row(stopped, 4) and after["ndcg@10"] == score
    assert before == eval_row(stopped, 0)


def test_the_final_models_card_gives_the_hub_the_runs_metrics(finished: Path) -> None:
    progress = json.loads((finished / "training_progress.json").read_text())
    after, before, data = hub_card(finished / "final_model")
    assert after == progress["eval_after"] and before == progress["eval_before"]
    assert data.pipeline_tag == "sentence-similarity" and data.base_model is None  # a local base model
    assert data.tags[:3] == ["sentence-transformers", "sentence-similarity", "feature-extraction"]
    assert not any(tag.startswith("dataset_size:") for tag in data.tags)  # max_steps: one epoch's size not counted


def damaged(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "damaged"
    shutil.copytree(step_dir(finished, 3), step_dir(run, 3))
    weights = step_dir(run, 3) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64] ^= 1
    weights.write_bytes(bytes(data))
    return step_dir(run, 3)


def incomplete(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "incomplete"
    shutil.copytree(step_dir(finished, 3), step_dir(run, 3))
    (step_dir(run, 3) / "trainer_state.json").unlink()
    return step_dir(run, 3)


def unfinished_save(finished: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints" / "step-00000009.tmp"
    shutil.copytree(step_dir(finished, 3), folder)
    return folder


@pytest.mark.parametrize("make, says", [
    (damaged, "model.safetensors: damaged: its contents differ from what was written"),
    (incomplete, "incomplete: no trainer_state.json"),
    (unfinished_save, "a checkpoint save that did not finish"),
    (lambda finished, tmp_path: finished, "a run's output folder, not a checkpoint; give one of its checkpoints, "
     "e.g. the newest"),
    (lambda finished, tmp_path: finished / "final_model", "a sentence-transformers model folder already"),
    (lambda finished, tmp_path: tmp_path / "nowhere", "no such folder"),
])
def test_what_is_not_an_intact_checkpoint_is_refused_in_one_line(finished: Path, tmp_path: Path, capsys, make,
                                                                 says: str) -> None:
    path = make(finished, tmp_path)
    out = tmp_path / "model"
    assert main([str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and says in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "model.tmp").exists()


def test_an_out_folder_that_holds_something_is_refused(finished: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(step_dir(finished, 3)), str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out}: exists and is not empty; give a new folder (or empty this one)\n"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert main([str(step_dir(finished, 3)), str(tmp_path / "file")]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    (out / "notes.txt").unlink()  # an empty folder is taken
    assert main([str(step_dir(finished, 3)), str(out)]) == 0 and (out / "modules.json").exists()


def test_onnx_is_exported_into_the_folder_before_it_is_in_place(finished: Path, tmp_path: Path, capsys,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer

    from embedtune.model.onnx import OnnxEncoder

    out = tmp_path / "model"
    # Without onnxruntime: one line naming the extra, before any work.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main([str(step_dir(finished, 3)), str(out), "--onnx"]) == 1
    assert capsys.readouterr().err == ("error: ONNX export and inference need onnx and onnxruntime (onnxruntime is "
                                       'not installed): pip install "embedtune[onnx]"\n')
    assert not out.exists()
    monkeypatch.undo()  # onnxruntime's own module back in place

    # The real export, int8 included: ONNX Runtime gives the model's embeddings.
    assert main([str(step_dir(finished, 3)), str(out), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert f"int8 {out / 'onnx' / 'model_qint8_avx512_vnni.onnx'}" in printed and ".tmp" not in printed
    texts = [p["question"] for p in make_pairs(6, seed=4)]
    reference = SentenceTransformer(str(out), device="cpu").encode_query(texts, convert_to_tensor=True)
    for int8, floor in ((False, 0.999), (True, 0.9)):
        got = OnnxEncoder.from_folder(str(out), int8=int8).encode_query(texts)
        assert torch.nn.functional.cosine_similarity(got, reference).min().item() > floor

    # An exporter that fails leaves nothing behind.
    def broken(folder: str, quantize: str | None, trust_remote_code: bool = False) -> dict:
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr("embedtune.commands.export.export_onnx", broken)
    again = tmp_path / "again"
    assert main([str(step_dir(finished, 3)), str(again), "--onnx"]) == 1
    assert f"error: could not write {again}: RuntimeError: the exporter failed" in capsys.readouterr().err
    assert not again.exists() and not (tmp_path / "again.tmp").exists()


def test_the_base_models_own_code_runs_only_when_the_command_allows_it(finished: Path, tmp_path: Path) -> None:
    from embedtune.training.from_checkpoint import export_checkpoint, open_checkpoint
    from embedtune.training.state import CheckpointError

    run = open_checkpoint(str(step_dir(finished, 3)))
    run.cfg.model.trust_remote_code = True  # as a checkpoint of such a run says
    with pytest.raises(CheckpointError, match="allow that with --trust-remote-code"):
        export_checkpoint(run, str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()
