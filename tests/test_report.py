"""`embedtune report`: PNGs drawn from training_metrics.jsonl, with no W&B and no pyplot state."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from embedtune.commands.report import build_figures, collect_series, main, plot_run, read_metrics, smooth

METRICS = ("ndcg@10", "mrr@10", "recall@10", "map@100", "recall@1", "recall@100")


def write_run(folder: Path, steps: int = 60, eval_every: int | None = 20, sources: tuple[str, ...] = (),
              prefixed: bool = False, cut_last_line: bool = False) -> Path:
    """A run's metrics file as the trainer writes it: train rows every step, eval rows now and then."""
    folder.mkdir(parents=True, exist_ok=True)
    train = "train/" if prefixed else ""
    lines = []
    for step in range(0, steps + 1):
        if eval_every and step % eval_every == 0:
            row: dict = {"step": step}
            for i, name in enumerate(METRICS):
                row[f"eval/{name}"] = 0.3 + 0.1 * i + step / 1000
                for j, source in enumerate(sources):
                    row[f"eval/{source}/{name}"] = 0.2 + 0.05 * j + step / 1000
            lines.append(json.dumps(row))
        if step:
            lines.append(json.dumps({"step": step, f"{train}loss": 3.0 / step, f"{train}lr": 1e-5 * (1 - step / steps),
                                     f"{train}grad_norm": 1.0 + step % 3, f"{train}pairs_per_s": 100.0 + step,
                                     f"{train}epoch": 0}))
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"step": 61, "loss": 0.0'  # a killed run stops mid-line
    (folder / "training_metrics.jsonl").write_text(text, encoding="utf-8")
    return folder


def read_png(path: str) -> tuple[int, int]:
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.std() > 0.01, f"{path} is blank"
    return pixels.shape[0], pixels.shape[1]


def test_report_writes_every_plot_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", sources=("docs", "forum"), cut_last_line=True)
    assert main([str(run)]) == 0
    out, err = capsys.readouterr()
    written = out.split()
    names = ["loss.png", "lr.png", "eval.png", "eval_sources.png", "grad_norm.png", "throughput.png"]
    assert written == [str(run / "plots" / name) for name in names]
    assert "skipped 1 unreadable line" in err
    for path in written:
        height, width = read_png(path)
        assert 300 <= height <= 2000 and 600 <= width <= 2000, (path, height, width)
    assert read_png(str(run / "plots" / "loss.png")) == (450, 800)


def test_plots_are_drawn_from_the_logged_values(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", steps=40, prefixed=True)  # train/ keys are read as well
    rows, bad = read_metrics(str(run))
    assert bad == []
    figures = build_figures(collect_series(rows), max_grad_norm=2.5)

    [raw, smoothed] = figures["loss.png"].axes[0].lines
    assert list(raw.get_xdata()) == list(range(1, 41))
    assert list(raw.get_ydata()) == pytest.approx([3.0 / s for s in range(1, 41)])
    assert smoothed.get_ydata()[0] == pytest.approx(3.0) and smoothed.get_ydata()[-1] > 3.0 / 40

    assert list(figures["lr.png"].axes[0].lines[0].get_ydata()) == pytest.approx([1e-5 * (1 - s / 40)
                                                                                    for s in range(1, 41)])
    eval_lines = figures["eval.png"].axes[0].lines
    labels = [line.get_label().split()[0] for line in eval_lines]
    assert labels[:3] == ["ndcg@10", "mrr@10", "recall@10"] and sorted(labels) == sorted(METRICS)
    ndcg = eval_lines[0]
    assert list(ndcg.get_xdata()) == [0, 20, 40] and list(ndcg.get_ydata()) == pytest.approx([0.3, 0.32, 0.34])
    clip_lines = [line for line in figures["grad_norm.png"].axes[0].lines if "max_grad_norm" in line.get_label()]
    assert clip_lines and clip_lines[0].get_ydata()[0] == 2.5
    assert list(figures["throughput.png"].axes[0].lines[0].get_ydata())[-1] == 140.0


def test_eval_plot_only_when_eval_metrics_were_logged(tmp_path: Path) -> None:
    without = plot_run(str(write_run(tmp_path / "no_eval", eval_every=None)))
    assert [Path(p).name for p in without] == ["loss.png", "lr.png", "grad_norm.png", "throughput.png"]
    assert not (tmp_path / "no_eval" / "plots" / "eval.png").exists()

    named_file = plot_run(str(tmp_path / "no_eval" / "training_metrics.jsonl"))  # the file itself also works
    assert named_file == without

    only_eval = tmp_path / "only_eval"
    only_eval.mkdir()
    (only_eval / "training_metrics.jsonl").write_text(json.dumps({"step": 0, "eval/ndcg@10": 0.5}) + "\n")
    out = tmp_path / "elsewhere"
    assert [Path(p).name for p in plot_run(str(only_eval), str(out))] == ["eval.png"]
    assert read_png(str(out / "eval.png"))


@pytest.mark.parametrize("content", [None, "", "\n", '{"step": 3, "lo'])
def test_missing_or_empty_metrics_exit_1_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         content: str | None) -> None:
    if content is not None:
        (tmp_path / "training_metrics.jsonl").write_text(content)
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "training_metrics.jsonl") in err
    assert ("not found" in err) if content is None else ("no metrics rows yet" in err)
    assert not (tmp_path / "plots").exists()


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_no_pyplot_state_is_touched(tmp_path: Path) -> None:
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_run(str(write_run(tmp_path / "run")))
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_smoothing_starts_at_the_first_value_and_passes_over_nan() -> None:
    assert smooth([2.0, 2.0, 2.0], 5) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth([1.0, math.nan, 3.0], 1)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 3.0


def test_report_of_a_real_training_run(train_args: list[str]) -> None:
    from embedtune.commands.train import main as train_main

    assert train_main(train_args + ["tracking.report_to=none"]) == 0
    run = Path(train_args[train_args.index("--output_dir") + 1])
    names = [Path(p).name for p in plot_run(str(run))]
    assert names == ["loss.png", "lr.png", "eval.png", "grad_norm.png", "throughput.png"]
    rows, _ = read_metrics(str(run))
    series = collect_series(rows)
    assert series["loss"][0] == [1, 2, 3, 4] and series["eval/ndcg@10"][0] == [0, 4]
