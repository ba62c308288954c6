"""Plots of a run from its own files, for runs without W&B (or without network).

``embedtune report OUTPUT_DIR`` reads ``OUTPUT_DIR/training_metrics.jsonl`` and draws PNGs into
``OUTPUT_DIR/plots``: the training loss (raw and smoothed), the learning rate, the held-out
metrics, and the gradient norm and throughput when they were logged. It works on a run that is
still going or was killed: a last line cut short is skipped.

Figures are drawn with ``matplotlib.figure.Figure`` and saved through the Agg renderer, so no
pyplot state or global backend is touched in the calling process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from embedtune.logs import scrub_console

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = "training_metrics.jsonl"
PLOTS_DIR = "plots"
HEADLINE = ("ndcg@10", "mrr@10", "recall@10")
SIZE, DPI = (8.0, 4.5), 100
# Every file the report can write, in drawing order, and what it shows.
PLOTS = {"loss.png": "training loss", "lr.png": "learning rate", "eval.png": "held-out metrics",
         "eval_sources.png": "per-source held-out metrics", "grad_norm.png": "gradient norm",
         "throughput.png": "throughput"}


class ReportError(ValueError):
    """The run's files cannot be plotted; the message says which file and what to do."""


Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values)


def run_dir(output_dir: str) -> str:
    """The run's folder, also when its metrics file itself is named."""
    if os.path.basename(output_dir) == METRICS and os.path.isfile(output_dir):
        return os.path.dirname(output_dir) or "."
    return output_dir


def read_metrics(output_dir: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of ``training_metrics.jsonl`` and the line numbers of rows that could not be read.

    A run that is killed while writing leaves its last line cut short; such lines are skipped
    (and reported) rather than failing the whole report.
    """
    output_dir = run_dir(output_dir)
    path = os.path.join(output_dir, METRICS)
    if not os.path.isdir(output_dir):
        raise ReportError(f"{output_dir}: no such folder; give the output_dir of a run "
                          f"(the folder that holds {METRICS}), e.g. embedtune report outputs/run")
    if not os.path.isfile(path):
        raise ReportError(f"{path}: not found; is {output_dir} the output_dir of a run? The trainer writes "
                          f"{METRICS} there from its first logged step on.")
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
            else:
                bad.append(number)
    if not rows:
        raise ReportError(f"{path}: no metrics rows yet. The trainer writes one every "
                          "tracking.log_every_n_steps steps (and the held-out metrics with eval.before); "
                          "wait for the first one, or lower tracking.log_every_n_steps.")
    return rows, bad


def collect_series(rows: list[dict[str, Any]]) -> Series:
    """Per metric, its (step, value) points in step order.

    Training keys are written without their ``train/`` prefix (``loss``, ``lr``...); a prefixed
    key is read the same. Held-out keys keep ``eval/``, including per-source ones
    (``eval/<source>/ndcg@10``). Non-numbers are left out; a non-finite value (written as null
    and named under ``nonfinite``, or a bare NaN of an older run) is NaN: a gap in the line.
    """
    series: Series = {}
    for row in sorted(rows, key=lambda r: r["step"]):  # stable: rows of one step keep their order
        step = int(row["step"])
        flagged = row.get("nonfinite")
        nonfinite = {k for k in flagged if isinstance(k, str)} if isinstance(flagged, list) else set()
        for key, value in row.items():
            if value is None and key in nonfinite:
                value = math.nan
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = key.removeprefix("train/")
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def smooth(values: list[float], span: float) -> list[float]:
    """Exponential moving average with bias correction (the start is not pulled towards 0).

    ``span`` is the averaging length in points; non-finite values are passed over.
    """
    weight = 1.0 - 1.0 / max(span, 1.0)
    out: list[float] = []
    average, total = 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = weight * average + (1 - weight) * value
            total = weight * total + (1 - weight)
        out.append(average / total if total else math.nan)
    return out


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError("embedtune report needs matplotlib: pip install matplotlib") from exc
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _figure(title: str, ylabel: str) -> tuple[Figure, Any]:
    fig = _new_figure(*SIZE)
    ax = fig.add_subplot()
    _step_axis(ax)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return fig, ax


def _step_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run
    ax.grid(True, alpha=0.3)


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def loss_figure(steps: list[int], values: list[float]) -> Figure:
    fig, ax = _figure("training loss", "loss")
    ax.plot(steps, values, color="tab:blue", alpha=0.35 if len(values) >= 10 else 1.0, linewidth=1,
            label="loss (mean over each logging window)")
    if len(values) >= 10:
        ax.plot(steps, smooth(values, len(values) / 20), color="tab:blue", linewidth=2, label="smoothed")
    ax.legend(loc="upper right")
    return fig


def lr_figure(steps: list[int], values: list[float]) -> Figure:
    fig, ax = _figure("learning rate", "learning rate")
    ax.plot(steps, values, color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def grad_norm_figure(steps: list[int], values: list[float], clip: float | None) -> Figure:
    fig, ax = _figure("gradient norm (before clipping)", "gradient norm")
    ax.plot(steps, values, color="tab:red", linewidth=1, marker="." if len(values) < 50 else None)
    finite = _finite(values)
    if clip:
        ax.axhline(clip, color="black", linestyle="--", linewidth=1, label=f"train.max_grad_norm = {clip:g}")
        ax.legend(loc="upper right")
    # Spikes of several orders of magnitude would flatten everything else on a linear axis.
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")
    return fig


def throughput_figure(steps: list[int], values: list[float]) -> Figure:
    fig, ax = _figure("throughput", "pairs per second")
    ax.plot(steps, values, color="tab:purple", marker="." if len(values) < 50 else None)
    ax.set_ylim(bottom=0)
    return fig


def _metric_order(names: list[str]) -> list[str]:
    """The headline metrics first, then the rest by name."""
    return sorted(names, key=lambda n: (HEADLINE.index(n) if n in HEADLINE else len(HEADLINE), n))


def eval_figure(metrics: Series) -> Figure:
    """One line per held-out metric; the legend gives each one's last value."""
    fig, ax = _figure("held-out retrieval (step 0: before training)", "score")
    for name in _metric_order(list(metrics)):
        steps, values = metrics[name]
        ax.plot(steps, values, marker="o", markersize=4, label=f"{name} ({values[-1]:.4f})")
    ax.legend(loc="best", fontsize="small")
    return fig


def eval_sources_figure(by_source: dict[str, Series]) -> Figure:
    """One panel per metric, one line per data source, for the per-source held-out metrics."""
    names = _metric_order(sorted({m for metrics in by_source.values() for m in metrics}))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _new_figure(SIZE[0] * min(cols, 2), SIZE[1] * rows * 0.8)
    fig.suptitle("held-out retrieval per source")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(name)
        _step_axis(ax)
        for source in sorted(by_source):
            if name in by_source[source]:
                steps, values = by_source[source][name]
                ax.plot(steps, values, marker="o", markersize=3, label=source)
        ax.legend(loc="best", fontsize="x-small")
    return fig


def build_figures(series: Series, max_grad_norm: float | None = None) -> dict[str, Figure]:
    """File name -> figure, for the series that are there (no eval metrics, no eval.png)."""
    figures: dict[str, Figure] = {}
    simple: list[tuple[str, str, Callable[[list[int], list[float]], Figure]]] = [
        ("loss", "loss.png", loss_figure), ("lr", "lr.png", lr_figure),
        ("pairs_per_s", "throughput.png", throughput_figure)]
    for key, file, draw in simple:
        if key in series and _finite(series[key][1]):
            figures[file] = draw(*series[key])
    if "grad_norm" in series and _finite(series["grad_norm"][1]):
        figures["grad_norm.png"] = grad_norm_figure(*series["grad_norm"], max_grad_norm)
    overall: Series = {}
    by_source: dict[str, Series] = {}
    for key, points in series.items():
        if not key.startswith("eval/") or not _finite(points[1]):
            continue
        source, _, metric = key.removeprefix("eval/").rpartition("/")
        if source:
            by_source.setdefault(source, {})[metric] = points
        else:
            overall[metric] = points
    if overall:
        figures["eval.png"] = eval_figure(overall)
    if by_source:
        figures["eval_sources.png"] = eval_sources_figure(by_source)
    return {name: figures[name] for name in PLOTS if name in figures}


def _max_grad_norm(output_dir: str) -> float | None:
    """The clipping threshold from the run's config.yaml, drawn on the gradient norm plot."""
    try:
        with open(os.path.join(output_dir, "config.yaml"), encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("train", {}).get("max_grad_norm")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_run(output_dir: str, out_dir: str | None = None) -> list[str]:
    """Draw the run's PNGs into ``out_dir`` (default ``output_dir/plots``); returns their paths."""
    output_dir = run_dir(output_dir)
    rows, bad = read_metrics(output_dir)
    if bad:
        print(f"skipped {len(bad)} unreadable line(s) of {os.path.join(output_dir, METRICS)} "
              f"(line {', '.join(map(str, bad[:5]))}{'...' if len(bad) > 5 else ''}); a killed run cuts "
              "its last line short", file=sys.stderr)
    figures = build_figures(collect_series(rows), _max_grad_norm(output_dir))
    if not figures:
        raise ReportError(f"{os.path.join(output_dir, METRICS)}: no numeric metrics to plot")
    out_dir = out_dir or os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = os.path.join(out_dir, name)
        fig.savefig(path, format="png")
        paths.append(path)
    for name, what in PLOTS.items():
        # A plot left from an earlier report of this folder would pass for this run's.
        if name not in figures and os.path.exists(os.path.join(out_dir, name)):
            print(f"note: {os.path.join(out_dir, name)} is from an earlier report; this run logged no {what}",
                  file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    scrub_console()  # main also runs without the embedtune command (python -m embedtune.commands.report)
    parser = argparse.ArgumentParser(
        prog="embedtune report",
        description="Draw PNG plots of a run (loss, learning rate, held-out metrics, gradient norm, "
                    "throughput) from its training_metrics.jsonl; no W&B needed.")
    parser.add_argument("output_dir", help="the run's output_dir")
    parser.add_argument("--out", help="folder for the PNGs (default: OUTPUT_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.output_dir, args.out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
