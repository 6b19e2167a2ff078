"""A run's report: learning curves and final test metrics as PNG charts, plus ``report.md`` linking them.

    towerrec report runs/ml100k-u1          # → runs/ml100k-u1/report/{*.png, report.md}

Reads ``RUN_DIR/logs/metrics.csv`` (Lightning's CSVLogger: one row per logging call, columns such
as ``train/loss``, ``train/<task>/loss``, ``val/<task>/<metric>``, ``step``, ``epoch``; a row
fills only the columns logged at that moment) and ``RUN_DIR/metrics.json`` (``metrics`` per stage
and task, ``baseline`` = the trivial predictor). Charts are drawn with matplotlib's Agg backend::

    train_loss.png      training loss (total and per task) vs step
    val_<task>.png      each validation metric of the task vs step (one panel per metric)
    test_metrics.png    final test metric of each task: model vs trivial baseline
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from towerrec.trainer.config import Config, ConfigError

# Metrics drawn (others, like counts and label means, describe the data rather than the model).
LOWER_IS_BETTER = ("rmse", "mae", "logloss", "ne", "loss")
HIGHER_IS_BETTER = ("auc", "gauc")
SKIPPED = ("count", "label_mean", "base_rate", "auc_error_bound", "gauc_users")


class ReportError(ConfigError):
    """The run folder lacks what a report needs; names the file."""


def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """``{column: [(step, epoch, value), ...]}`` for every non-empty cell of the CSV logger's file."""
    if not path.exists():
        raise ReportError(f"{path}: not found (is RUN_DIR a folder written by `towerrec fit`?)")
    series: dict[str, list[tuple[float, float, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ReportError(f"{path}: expected a CSV with a 'step' column (Lightning CSVLogger)")
        for row in reader:
            step = _number(row.get("step"))
            epoch = _number(row.get("epoch"))
            for column, cell in row.items():
                value = _number(cell)
                if column in ("step", "epoch") or value is None or step is None:
                    continue
                series.setdefault(column, []).append((step, epoch if epoch is not None else math.nan, value))
    return series


def _number(cell: str | None) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _tasks(series: dict, stage: str) -> dict[str, list[str]]:
    """``{task: [metric, ...]}`` of ``<stage>/<task>/<metric>`` columns."""
    tasks: dict[str, list[str]] = {}
    for column in sorted(series):
        parts = column.split("/")
        if len(parts) == 3 and parts[0] == stage and parts[2] not in SKIPPED:
            tasks.setdefault(parts[1], []).append(parts[2])
    return tasks


def _plot_train_loss(plt, series: dict, out: Path) -> Path | None:
    columns = [
        c
        for c in ("train/loss", *sorted(c for c in series if c.startswith("train/") and c.endswith("/loss")))
        if c in series
    ]
    if not columns:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for column in dict.fromkeys(columns):
        points = series[column]
        label = "total (balanced)" if column == "train/loss" else column.split("/")[1]
        ax.plot(
            [p[0] for p in points],
            [p[2] for p in points],
            label=label,
            linewidth=2 if column == "train/loss" else 1.2,
        )
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss per task")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "train_loss.png", plt)


def _plot_validation(plt, series: dict, out: Path) -> list[Path]:
    paths = []
    for task, metrics in _tasks(series, "val").items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            points = series[f"val/{task}/{metric}"]
            ax.plot([p[0] for p in points], [p[2] for p in points], marker="o")
            epochs = [p[1] for p in points]
            if all(not math.isnan(e) for e in epochs):
                for p in points:
                    ax.annotate(
                        f"e{int(p[1])}",
                        (p[0], p[2]),
                        textcoords="offset points",
                        xytext=(0, 6),
                        fontsize=7,
                        ha="center",
                    )
            better = (
                "lower is better"
                if metric in LOWER_IS_BETTER
                else "higher is better"
                if metric in HIGHER_IS_BETTER
                else ""
            )
            ax.set(xlabel="optimizer step", title=f"{metric}" + (f" ({better})" if better else ""))
            ax.grid(alpha=0.3)
        fig.suptitle(f"Validation metrics: {task}")
        paths.append(_save(fig, out / f"val_{task}.png", plt))
    return paths


def _plot_test(plt, result: dict, out: Path) -> Path | None:
    test = result.get("metrics", {}).get("test", {})
    baseline = result.get("baseline", {}).get("test", {})
    panels = [(task, metric) for task, values in test.items() for metric in values if metric not in SKIPPED]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.8), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        model_value = test[task][metric]
        base_value = baseline.get(task, {}).get(metric)
        labels, values, colors = ["model"], [model_value], ["tab:blue"]
        if base_value is not None:
            labels.append("trivial")
            values.append(base_value)
            colors.append("tab:gray")
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(f"{task}\n{metric}", fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle("Test metrics: model vs trivial predictor (each task's mean label)")
    return _save(fig, out / "test_metrics.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(run_dir: Path, result: dict, images: list[Path]) -> str:
    lines = [f"# Report: {run_dir}", ""]
    for key in ("train_seconds", "global_step", "checkpoint"):
        if key in result:
            lines.append(f"- {key}: {result[key]}")
    test = result.get("metrics", {}).get("test", {})
    baseline = result.get("baseline", {}).get("test", {})
    if test:
        lines += ["", "## Test metrics", "", "| task | metric | model | trivial |", "|---|---|---|---|"]
        for task, values in test.items():
            for metric, value in values.items():
                if metric in SKIPPED:
                    continue
                base = baseline.get(task, {}).get(metric)
                lines.append(f"| {task} | {metric} | {value:.4f} | {'' if base is None else f'{base:.4f}'} |")
    lines += ["", "## Charts", ""]
    for image in images:
        lines += [f"### {image.stem}", "", f"![{image.stem}]({image.name})", ""]
    return "\n".join(lines)


def make_report(run_dir: str | Path) -> Path:
    """Draws the charts and writes ``report.md`` under ``RUN_DIR/report``; returns that folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = read_metrics_csv(run_dir / "logs" / "metrics.csv")
    metrics_path = run_dir / "metrics.json"
    result = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = [
        _plot_train_loss(plt, series, out),
        *_plot_validation(plt, series, out),
        _plot_test(plt, result, out),
    ]
    images = [image for image in images if image is not None]
    (out / "report.md").write_text(_markdown(run_dir, result, images))
    return out


# ------------------------------------------------------------------------------------------ command


def run_report(cfg: Config, args: argparse.Namespace) -> int:
    out = make_report(args.run_dir or cfg.run_dir)
    print(f"[towerrec] report: {out / 'report.md'} ({len(list(out.glob('*.png')))} charts)", flush=True)
    return 0
