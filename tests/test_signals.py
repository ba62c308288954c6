"""Stop signals as a scheduler, a person and a dead launcher send them: real signals, and real
2-process runs under `accelerate launch` on the CPU.

A scheduler signals every process of the job, and torchrun passes its own SIGTERM on, so one stop
reaches a training process several times: it must still finish the step, save once and exit 0.
Only a person's second Ctrl-C stops at once. A killed launcher must not leave its processes behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import accelerate
import pytest
from conftest import ROOT, free_port
from packaging.version import Version
from test_resume import args_for, assert_same_run, descendants, finish, logged_steps, start

from embedtune.distributed import run_signals, stop_signals

# A signalled `accelerate launch` exits with torchrun's SignalException: before accelerate 1.16 as
# an uncaught exception (status 1, with its traceback), from 1.16 on as 128 + the signal, quietly.
SIGNAL_STATUS = Version(accelerate.__version__) >= Version("1.16")


def launcher_status(signum: int) -> int:
    return 128 + signum if SIGNAL_STATUS else 1

# --- the handler, in this process ------------------------------------------------------------


@pytest.fixture
def harmless_signals() -> Iterator[None]:
    """Outside the blocks under test, SIGTERM and SIGINT do nothing: a handler that failed to
    install fails the test instead of killing (SIGTERM) or interrupting (SIGINT) pytest."""
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("harmless_signals")
def test_sigterm_any_number_of_times_only_asks_to_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="embedtune")
    before = signal.getsignal(signal.SIGTERM)
    with run_signals() as flag:
        assert not flag["stop"]
        for _ in range(3):
            signal.raise_signal(signal.SIGTERM)
        assert flag["stop"]
    assert signal.getsignal(signal.SIGTERM) is before
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("SIGTERM received: training stops after its first step, with a checkpoint")
    assert [m.split(":")[0] for m in messages[1:]] == ["SIGTERM received again"] * 2


@pytest.mark.usefixtures("harmless_signals")
def test_a_second_ctrl_c_stops_at_once_even_as_sigterm(caplog: pytest.LogCaptureFixture) -> None:
    """torchrun passes a second Ctrl-C on as SIGTERM: after a SIGINT, any signal stops at once."""
    caplog.set_level(logging.WARNING, logger="embedtune")
    for second in (signal.SIGINT, signal.SIGTERM):
        with run_signals() as flag, stop_signals():
            signal.raise_signal(signal.SIGINT)
            assert flag["stop"]
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(second)
    assert "SIGINT received: finishing this step, saving a checkpoint, then exiting" in caplog.text
    assert "SIGTERM received after Ctrl-C: stopping at once, without saving this step" in caplog.text
    # After a SIGTERM, a first Ctrl-C only asks; the next one forces.
    with run_signals():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


@pytest.mark.usefixtures("harmless_signals")
def test_a_signal_before_the_loop_reaches_it_and_a_new_run_starts_clean() -> None:
    with run_signals() as run:
        signal.raise_signal(signal.SIGTERM)  # during setup
        with stop_signals() as loop:
            assert loop["stop"]
        assert run["stop"]
    with run_signals() as run, stop_signals() as loop:
        assert not run["stop"] and not loop["stop"]


# --- real runs of 2 processes under accelerate launch -----------------------------------------


def launch(args: list[str], out: Path, preemptible: bool = False, save_delay: float = 0,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """2 training processes under `accelerate launch` (or launch/preemptible.sh), in a session of
    their own; every checkpoint save lasts ``save_delay`` seconds longer. stderr goes to
    ``out``/../stderr.txt (a pipe nobody reads could fill and block the processes)."""
    launcher = ["bash", str(ROOT / "launch" / "preemptible.sh")] if preemptible else [
        sys.executable, "-m", "accelerate.commands.launch"]
    command = [*launcher, "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "embedtune.tools.slow_saves", str(save_delay)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command + args, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)


def stderr_of(out: Path) -> str:
    return (out.parent / "stderr.txt").read_text(errors="replace")


def wait_for(proc: subprocess.Popen, out: Path, ready: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended too early:\n" + stderr_of(out)[-3000:]
        assert time.time() < deadline, "timed out waiting for the run:\n" + stderr_of(out)[-3000:]
        time.sleep(0.005)


def signal_all(proc: subprocess.Popen, sig: int) -> None:
    """The launcher and every process under it, as a scheduler signals a job."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def saving(out: Path) -> bool:
    return any((out / "checkpoints").glob("*.tmp"))


def checkpoints(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def running(pid: int) -> bool:
    """Whether ``pid`` is alive; a zombie nobody has reaped yet counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def reference(models: dict[str, Path], data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run never stopped, on one process."""
    out = tmp_path_factory.mktemp("signals_reference") / "out"
    finish(start(args_for(models["plain"], data, out, "tracking.report_to=none")))
    return out


def test_sigterm_to_every_process_twice_saves_once_and_everything_exits_0(models, data, reference,
                                                                          tmp_path: Path) -> None:
    """The scheduler signals the launcher and every process, and again during the save."""
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "checkpoint.every_n_steps=1000")
    run = launch(args, out, preemptible=True, save_delay=2)
    wait_for(run, out, lambda: logged_steps(out) >= 5)
    signal_all(run, signal.SIGTERM)
    wait_for(run, out, lambda: saving(out))
    signal_all(run, signal.SIGTERM)
    assert run.wait(timeout=120) == 0, stderr_of(out)[-4000:]
    err = stderr_of(out)
    assert "Traceback" not in err, err[-4000:]
    assert err.count("SIGTERM received: finishing this step, saving a checkpoint, then exiting") == 2
    assert err.count("SIGTERM received again: the stop already asked goes on") >= 2
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] is False and progress["processes"] == 2
    assert checkpoints(out) == [f"step-{progress['step']:08d}"]
    # The checkpoint continues the same run: the same global batches and, to float rounding
    # (two processes sum in another order), the same weights as the run never stopped.
    finish(start(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(out, reference, atol=5e-5)


def test_plain_accelerate_launch_saves_and_its_processes_exit_0_but_it_does_not(models, data, tmp_path: Path) -> None:
    """torchrun makes its own SIGTERM an exception, and the launcher fails with it whatever its
    processes did (1, or 143 from accelerate 1.16); the processes saved once and stopped cleanly,
    and no traceback is theirs."""
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "checkpoint.every_n_steps=1000")
    run = launch(args, out, save_delay=2)
    wait_for(run, out, lambda: logged_steps(out) >= 5)
    signal_all(run, signal.SIGTERM)  # torchrun passes its own on: each process gets two
    wait_for(run, out, lambda: saving(out))
    signal_all(run, signal.SIGTERM)
    assert run.wait(timeout=120) == launcher_status(signal.SIGTERM)
    err = stderr_of(out)
    # Every traceback is the launcher's (before accelerate 1.16): none from a training process.
    tracebacks = err.count("Traceback")
    assert tracebacks == err.count("SignalException: Process"), err[-4000:]
    assert tracebacks == 0 if SIGNAL_STATUS else tracebacks >= 1, err[-4000:]
    assert err.count("stopped at step") == 2
    progress = json.loads((out / "training_progress.json").read_text())
    assert checkpoints(out) == [f"step-{progress['step']:08d}"]


def test_a_second_ctrl_c_at_the_launcher_stops_at_once(models, data, tmp_path: Path) -> None:
    """Ctrl-C reaches the launcher only (its processes have sessions of their own), which passes the
    first on as SIGINT and the second as SIGTERM: the processes stop in the middle of the save."""
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "checkpoint.every_n_steps=1000")
    # torchrun's own SIGKILL would otherwise come after 30 s: the stop must be the processes' own.
    run = launch(args, out, save_delay=120, env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"})
    wait_for(run, out, lambda: logged_steps(out) >= 3)
    os.killpg(run.pid, signal.SIGINT)
    wait_for(run, out, lambda: saving(out))
    os.killpg(run.pid, signal.SIGINT)
    pressed = time.time()
    assert run.wait(timeout=60) == launcher_status(signal.SIGINT)  # torchrun's, as after any signal of its own
    assert time.time() - pressed < 30
    err = stderr_of(out)
    assert err.count("SIGTERM received after Ctrl-C: stopping at once, without saving this step") == 2, err[-4000:]
    assert err.count("stopped at once, without saving the step in progress") == 2
    assert checkpoints(out) and all(name.endswith(".tmp") for name in checkpoints(out))


@pytest.mark.parametrize("kill", ["launcher", "its process group"])
def test_killing_the_launcher_stops_its_processes(models, data, tmp_path: Path, kill: str) -> None:
    """Each process asks the kernel for a SIGTERM when the launcher dies: it stops as on any
    SIGTERM, after its step and a checkpoint, instead of training on with nobody waiting."""
    out = tmp_path / "out"
    args = args_for(models["plain"], data, out, "tracking.report_to=none", "checkpoint.every_n_steps=1000",
                    "--epochs", "100")  # minutes of training left when the launcher dies
    run = launch(args, out)
    wait_for(run, out, lambda: logged_steps(out) >= 3)
    processes = descendants(run.pid)  # the 2 training processes and their DataLoader workers
    assert len(processes) >= 2
    try:
        if kill == "launcher":
            os.kill(run.pid, signal.SIGKILL)
        else:  # the training processes are not in it: torchrun gives each a session of its own
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        deadline = time.time() + 30
        while any(map(running, processes)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(running, processes)), "still running after the launcher was killed:\n" + stderr_of(
            out)[-3000:]
    finally:
        for pid in filter(running, processes):
            os.kill(pid, signal.SIGKILL)
    err = stderr_of(out)
    assert err.count(f"SIGTERM (the launcher, pid {run.pid}, is gone) received") >= 2, err[-3000:]
    progress = json.loads((out / "training_progress.json").read_text())
    assert progress["completed"] is False
    assert checkpoints(out) == [f"step-{progress['step']:08d}"]
