"""Untrusted files: nothing runs code when loaded, names stay inside output_dir, input has limits.

A checkpoint is read as untrusted input: pickled files load with weights_only=True or not at
all, and trainer_state.json is checked field by field. Names from the config never climb out of
output_dir. A record or a batch over the configured limits is refused by name before it can take
the memory.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_pairs, untokenized, write_jsonl

from embedtune.config import ConfigError, DataConfig, build_config, parse_args
from embedtune.data.records import DataError, Pair, Reject, read_pairs
from embedtune.data.split import preflight
from embedtune.data.stream import PairBatches, make_loader
from embedtune.training import checkpoint, integrity
from embedtune.training.state import CheckpointError, TrainerState


class Payload:
    """Unpickling it creates a folder: the sign that a load ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def torch_pickle(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)


def plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, list[str]]:
    """A real run with checkpoints at steps 2 and 4 (as arguments with a placeholder output_dir)."""
    from embedtune.commands.train import main

    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(60))
    args = ["--input_jsonl", str(data), "--base_model", str(tiny_model), "--batch_size", "8", "data.num_workers=0",
            "data.query_max_length=24", "data.document_max_length=32", "train.max_steps=4",
            "checkpoint.every_n_steps=2", "tracking.report_to=none", "eval.before=false"]
    assert main(args + ["--output_dir", str(root / "out")]) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return root / "out", args


def copy_run(finished_run, tmp_path: Path) -> tuple[Path, list[str]]:
    source, args = finished_run
    out = tmp_path / "out"
    shutil.copytree(source, out)
    return out, args + ["--output_dir", str(out), "train.max_steps=6"]


# --- pickles in checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("name, writer", [
    ("custom_checkpoint_0.pkl", torch_pickle),  # the schedule: Accelerate itself loads it unsafely
    ("random_states_0.pkl", plain_pickle),
    ("optimizer.bin", torch_pickle),
    ("pytorch_model.bin", torch_pickle),
])
def test_a_checkpoint_with_a_malicious_pickle_is_refused_and_never_run(finished_run, tmp_path: Path, capsys,
                                                                      name: str, writer) -> None:
    from embedtune.commands.train import main

    out, args = copy_run(finished_run, tmp_path)
    marker = tmp_path / "code-ran"
    folder = out / "checkpoints" / "step-00000004"
    writer(folder / name, marker)
    integrity.write_manifest(str(folder))  # whoever can write the folder can write its manifest too
    assert main(args + ["--resume_from_checkpoint", "step-00000004"]) == 1
    err = capsys.readouterr().err
    assert f"{name}: refused: it does not load as plain tensors and numbers" in err
    assert "weights_only` set to `False`" not in err  # torch's advice to load it anyway is not passed on
    assert not marker.exists()


def test_load_reads_registered_states_weights_only_even_unchecked(tmp_path: Path, monkeypatch) -> None:
    """Accelerate reads registered objects (our schedule) with weights_only=False; checkpoint.load
    makes it read them like everything else, so even a file that slipped past verify cannot run."""
    from accelerate import Accelerator

    def parts() -> tuple[Accelerator, torch.optim.lr_scheduler.LambdaLR]:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        accelerator.register_for_checkpointing(schedule)
        accelerator.prepare(model, optimizer)
        return accelerator, schedule

    accelerator, schedule = parts()
    for _ in range(3):
        schedule.step()
    folder = tmp_path / "step-00000003"
    accelerator.save_state(str(folder), safe_serialization=True)

    accelerator, schedule = parts()
    checkpoint.load(accelerator, str(folder))
    assert schedule.last_epoch == 3  # a good checkpoint loads, schedule included

    marker = tmp_path / "code-ran"
    torch_pickle(folder / "custom_checkpoint_0.pkl", marker)
    monkeypatch.setattr(checkpoint, "verify", lambda path: None)
    accelerator, schedule = parts()
    with pytest.raises(pickle.UnpicklingError, match="os.makedirs"):
        checkpoint.load(accelerator, str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("edit, expected", [
    ({"wandb_run_id": "../../../elsewhere"}, "'wandb_run_id' must be a W&B run id"),
    ({"step": -1}, "'step' must be a count"),
    ({"step": "4"}, "'step' must be a count"),
    ({"scores": {"../step-00000001": 1.0}}, "'scores' must map checkpoint names"),
    ({"surprise": 1}, "unknown field(s) surprise"),
    ({"config": []}, "'config' must be a JSON object"),
])
def test_a_tampered_trainer_state_is_refused_naming_the_field(finished_run, tmp_path: Path, edit: dict,
                                                             expected: str) -> None:
    out, _ = copy_run(finished_run, tmp_path)
    path = out / "checkpoints" / "step-00000004"
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, **edit}))
    with pytest.raises(CheckpointError) as err:
        TrainerState.load(str(path))
    assert str(path / "trainer_state.json") in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe", b"[" * 100_000])
def test_an_unreadable_trainer_state_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "trainer_state.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="trainer_state.json: "):
        TrainerState.load(str(tmp_path))


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("checkpoint.resume_from=../other/checkpoints/step-00000004", "checkpoint.resume_from"),
    ("checkpoint.resume_from=/x/../../etc", "checkpoint.resume_from"),
    ("checkpoint.resume_from=step-4", "checkpoint.resume_from"),
    ("checkpoint.resume_from=..", "checkpoint.resume_from"),
    ("tracking.run_name=../../outside", "tracking.run_name"),
    ("tracking.run_name=/etc/cron.d/x", "tracking.run_name"),
    ("tracking.run_name=runs/../../../x", "tracking.run_name"),
    ("tracking.run_name=C:\\Windows\\x", "tracking.run_name"),
    ("tracking.run_name=a\tb", "tracking.run_name"),
    ("tracking.project=..", "tracking.project"),
])
def test_names_that_climb_out_or_are_absolute_paths_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args(["--input_jsonl", "x.jsonl", override])
    assert f"{key}:" in str(err.value)


def test_names_and_checkpoint_paths_that_stay_inside_are_accepted(finished_run, tmp_path: Path) -> None:
    out, _ = copy_run(finished_run, tmp_path)
    cfg = build_config({"input_jsonl": "x", "tracking": {"run_name": "sweep/lr-3e-5 run 2"}})
    assert cfg.tracking.run_name == "sweep/lr-3e-5 run 2"
    named = checkpoint.find_checkpoint(str(out), "step-00000002")
    assert named == str(out / "checkpoints" / "step-00000002")
    # A path to a checkpoint folder is read, never written: any complete checkpoint will do.
    assert checkpoint.find_checkpoint(str(tmp_path / "new"), named) == named
    for which in (str(tmp_path), str(out / "checkpoints"), "../out/checkpoints/step-00000002", "trainer_state.json"):
        with pytest.raises(CheckpointError):
            checkpoint.find_checkpoint(str(out), which)


def test_a_linked_folder_in_checkpoints_is_no_checkpoint(finished_run, tmp_path: Path) -> None:
    out, _ = copy_run(finished_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoints" / "step-00000004", elsewhere)
    (out / "checkpoints" / "step-00000099").symlink_to(elsewhere)
    assert [Path(p).name for p in checkpoint.complete_checkpoints(str(out))] == ["step-00000002", "step-00000004"]
    checkpoint._retain(str(out), 1, {}, None)  # retention deletes in checkpoints/ only, never through a link
    assert elsewhere.exists() and (out / "checkpoints" / "step-00000099").is_symlink()


def test_yaml_tags_in_a_config_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{train_files: [x]}}\ntracking:\n  run_name: !!python/object/apply:os.makedirs ['{marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(path)])
    parse_args(["--input_jsonl", "x", f"tracking.tags=!!python/object/apply:os.makedirs ['{marker}']"])
    assert not marker.exists()


def test_no_unsafe_loader_in_the_sources() -> None:
    """Nothing is unpickled but weights-only, and no model's own code runs unless the config says so."""
    import ast

    unsafe = re.compile(r"torch\.load\((?!.*weights_only=True)|pickle\.loads?\(|import dill|allow_pickle\s*=\s*True"
                        r"|weights_only\s*=\s*False|yaml\.(unsafe_)?load\((?!text, Loader=_Loader)")
    found = []
    for path in sorted((ROOT / "embedtune").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(source.splitlines(), start=1)
                  if unsafe.search(line)]
        # trust_remote_code is passed on from model.trust_remote_code (or a flag), never set to True in code.
        found += [f"{path.relative_to(ROOT)}:{node.lineno} trust_remote_code=True" for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
                  and isinstance(node.value, ast.Constant) and node.value.value is True]
    assert not found, f"unsafe loading in: {found}"


# --- limits on input -------------------------------------------------------------------------


def test_a_huge_line_is_a_bad_record_and_is_never_held_in_memory(tmp_path: Path) -> None:
    """A 6 MB line with no newline, read with a 64 KiB limit: refused by line, memory stays flat."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"question": "q1", "answer": "a1"}\n')
        f.write(b'{"question": "q2", "answer": "' + b"x" * (6 << 20) + b'"}\n')
        f.write(b'{"question": "q3", "answer": "a3"}\n')
    cfg = DataConfig(train_files=[str(path)], on_bad_record="skip", max_record_bytes=64 << 10)
    tracemalloc.start()
    try:
        items = list(read_pairs([str(path)], cfg))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [type(i) for i in items] == [Pair, Reject, Pair]
    assert items[1].line == 2 and "longer than 65,536 bytes (data.max_record_bytes)" in items[1].reason
    assert len(items[1].raw) <= 2000
    assert peak < 2 << 20, f"peak {peak:,} bytes while reading past a 6 MB line"
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: longer than 65,536 bytes")):
        preflight(cfg.model_copy(update={"on_bad_record": "error"}))


def test_a_parquet_row_over_the_limit_is_a_bad_record(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "é" * 400]}), tmp_path / "rows.parquet")
    cfg = DataConfig(train_files=[str(tmp_path / "rows.parquet")], on_bad_record="skip", max_record_bytes=700)
    items = list(read_pairs(cfg.train_files, cfg))
    assert isinstance(items[0], Pair) and isinstance(items[1], Reject) and items[1].line == 2
    assert "longer than 700 bytes" in items[1].reason  # 800 bytes of UTF-8 in 400 characters


def test_too_many_negatives_refuse_the_record_and_the_first_ones_are_kept(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"question": "q1", "answer": "a1", "neg": ["n1", "n2", "n3"]},
                                              {"question": "q2", "answer": "a2", "neg": ["m"] * 4}])
    cfg = DataConfig(train_files=[str(path)], negatives_field="neg", max_negatives=2, max_negatives_per_record=3,
                     on_bad_record="skip")
    first, second = read_pairs([str(path)], cfg)
    assert first.negatives == ("n1", "n2")
    assert isinstance(second, Reject) and "lists 4 hard negatives, more than data.max_negatives_per_record (3)" in \
        second.reason


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_with_too_much_text_stops_before_it_is_tokenized(tmp_path: Path, workers: int) -> None:
    records = make_pairs(12)
    records[7]["answer"] = "long " * 200
    path = write_jsonl(tmp_path / "p.jsonl", records)
    cfg = DataConfig(train_files=[str(path)], shuffle=False, eval_fraction=0, max_batch_chars=900)
    tokenized = []
    dataset = PairBatches(cfg, 4, 1, seed=0, collate=lambda pairs: tokenized.append(len(pairs)) or untokenized(pairs))
    with pytest.raises(DataError) as err:
        list(make_loader(dataset, workers, pin_memory=False))
    text = str(err.value)
    # The worker's traceback is not part of the message, only what to do.
    assert text.startswith("global batch 2 of epoch 0 holds more than 900 characters of text (data.max_batch_chars)")
    assert f"{path}:8 (1,0" in text and "Traceback" not in text and "lower train.batch_size" in text.lower()
    assert workers or tokenized == [4]  # the first batch was tokenized, the second never was


def test_a_records_own_instruction_counts_as_text_of_its_batch(tmp_path: Path) -> None:
    records = [{**p, "instruction": ""} for p in make_pairs(12)]
    records[5]["instruction"] = "instruct: " * 100
    path = write_jsonl(tmp_path / "p.jsonl", records)
    cfg = DataConfig(train_files=[str(path)], shuffle=False, eval_fraction=0, max_batch_chars=900,
                     prompt_field="instruction")
    with pytest.raises(DataError, match="global batch 2 of epoch 0 holds more than 900 characters"):
        list(make_loader(PairBatches(cfg, 4, 1, seed=0, collate=untokenized), 0, pin_memory=False))


@pytest.mark.parametrize("name, content, expected", [
    ("cut.jsonl.gz", gzip.compress("".join(json.dumps(r) + "\n" for r in make_pairs(400)).encode())[:4000],
     "cannot be read after line"),
    ("fake.jsonl.gz", b'{"question": "q", "answer": "a"}\n', "cannot be read after line 0: BadGzipFile"),
    ("data.jsonl.zst", b"(\xb5/\xfd junk", "needs the zstandard package"),
])
def test_broken_or_unsupported_compressed_files_are_named(tmp_path: Path, name: str, content: bytes,
                                                         expected: str) -> None:
    import importlib.util

    if name.endswith(".zst") and importlib.util.find_spec("zstandard"):
        pytest.skip("zstandard is installed, so .zst files are read")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        list(read_pairs([str(path)], DataConfig(train_files=[str(path)])))
    assert str(err.value).startswith(str(path)) and expected in str(err.value)


def test_a_run_stopped_by_its_data_loader_worker_exits_promptly(tiny_model: Path, tmp_path: Path) -> None:
    """The error raised in a worker ends the run with status 1 and its own message; the worker,
    which ignores SIGTERM while training goes on, does not keep the exiting process waiting."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(60))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--input_jsonl", str(data), "--base_model",
                           str(tiny_model), "--output_dir", str(tmp_path / "out"), "--batch_size", "16",
                           "data.num_workers=1", "train.max_steps=4", "tracking.report_to=none", "eval.before=false",
                           "data.max_batch_chars=1000"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "\nerror: global batch 1 of epoch 0 holds more than 1,000 characters" in done.stderr
    assert "Caught DataError" not in done.stderr and "Traceback" not in done.stderr


# --- model folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("kept, expected", [
    ((), "holds no model (an empty folder): no config.json and no weights (model.safetensors or pytorch_model.bin)"),
    (("tokenizer.json", "tokenizer_config.json"),
     "holds no model (only a tokenizer): no config.json and no weights (model.safetensors or pytorch_model.bin)"),
    (("model.safetensors",), "holds no model (files: model.safetensors): no config.json;"),
    (("config.json", "tokenizer.json", "tokenizer_config.json"),
     "has config.json but no weights (model.safetensors or pytorch_model.bin, whole or sharded;"),
])
def test_a_base_model_folder_without_a_model_stops_in_one_line(tiny_model: Path, tmp_path: Path, capsys,
                                                              kept: tuple[str, ...], expected: str) -> None:
    """An empty folder, a tokenizer alone, weights without config.json, config.json without weights."""
    from embedtune.commands.train import main

    folder = tmp_path / "model"
    folder.mkdir()
    for name in kept:
        shutil.copy(tiny_model / name, folder / name)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(40))
    assert main(["--input_jsonl", str(data), "--base_model", str(folder), "--output_dir", str(tmp_path / "out"),
                 "--batch_size", "8", "data.num_workers=0", "train.max_steps=2", "tracking.report_to=none",
                 "eval.before=false"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    assert errors[0].startswith(f"error: cannot load model.base_model='{folder}': {folder} ") and expected in errors[0]
    assert errors[0].endswith("give the folder a transformers or sentence-transformers model was saved to "
                              "(save_pretrained writes config.json and the weights), or a Hub name")
    assert "Traceback" not in err and "upgrade transformers" not in err
    assert not (tmp_path / "out" / "final_model").exists()
