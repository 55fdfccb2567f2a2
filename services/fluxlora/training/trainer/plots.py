"""loss.csv and loss.png: the run's curve for people and for the service to upload."""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def write_loss_csv(history: list[tuple[int, float, float]], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "lr"])
        for step, loss, lr in history:
            writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}"])
    return path


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average; bias-corrected so the start is not pulled toward zero."""
    alpha = 2 / (span + 1)
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        smoothed.append(average / weight)
    return smoothed


def write_loss_plot(history: list[tuple[int, float, float]], path: Path) -> Path:
    # Figure + Agg canvas directly: pyplot's global state is not safe in a threaded service.
    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    span = max(5, len(losses) // 20)
    axes.plot(steps, ema(losses, span), color="tab:blue", linewidth=2, label=f"EMA (span {span})")
    axes.set_xlabel("step")
    axes.set_ylabel("flow-matching MSE loss")
    axes.set_title("training loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    return path
