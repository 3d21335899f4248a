"""Figures for runs and chapters, written as PNG files (no window needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend, so its figures show in the page
    matplotlib.use("Agg")  # draw to files only: works on servers, in CI and in training threads
import matplotlib.pyplot as plt  # noqa: E402

REFRESH_FIGURES = "MINIGPT_REFRESH_FIGURES"  # set to 1 to let the notebooks redraw the handbook's figures


def notebook_figures(root: str | Path) -> Path:
    """The folder a chapter notebook saves its figures in: `notebooks/figures/` (git-ignored, so running a
    notebook leaves the checkout clean), or the handbook's `chapters/figures/` when MINIGPT_REFRESH_FIGURES=1."""
    refresh = os.environ.get(REFRESH_FIGURES, "") == "1"
    folder = Path(root) / ("chapters" if refresh else "notebooks") / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def plot_losses(eval_steps: list[int], train_losses: list[float], val_losses: list[float],
                path: str | Path, batch_losses: list[float] | None = None,
                tokens_per_step: int | None = None, final: tuple[int, float, float] | None = None,
                title: str = "Training and validation loss") -> Path:
    """Train/val loss against optimizer steps, with tokens seen on the top axis.

    `batch_losses` (one per step) are drawn faintly underneath; `final` = (step, train, val)
    marks the end-of-run evaluation over the whole splits.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if batch_losses:
        ax.plot(range(1, len(batch_losses) + 1), batch_losses, color="0.75", linewidth=0.8,
                label="train loss, each batch")
    ax.plot(eval_steps, train_losses, "o-", color="tab:blue", markersize=3, label="train loss (eval)")
    ax.plot(eval_steps, val_losses, "s--", color="tab:orange", markersize=3, label="validation loss")
    if final is not None:
        step, train, val = final
        ax.plot([step], [train], "*", color="tab:blue", markersize=11, label=f"final train {train:.2f}")
        ax.plot([step], [val], "*", color="tab:orange", markersize=11, label=f"final validation {val:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if tokens_per_step:  # tokens seen grow linearly with steps: label them on a second axis
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                    lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    return save_figure(fig, path)


def plot_accuracy(points: list[tuple[int, float, float | None]], path: str | Path,
                  title: str = "Classification accuracy") -> Path:
    """Validation (and train) accuracy against optimizer steps; points are (step, val, train or None)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    steps = [step for step, _, _ in points]
    ax.plot(steps, [100 * val for _, val, _ in points], "s--", color="tab:orange", label="validation accuracy")
    trained = [(step, train) for step, _, train in points if train is not None]
    if trained:
        ax.plot([s for s, _ in trained], [100 * t for _, t in trained], "o-", color="tab:blue",
                label="train accuracy (eval batches)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG, and free the figure (pyplot keeps every open figure otherwise)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_panels(panels: list[tuple[str, dict[str, tuple[list[int], list[float]]]]], path: str | Path,
                title: str = "", xlabel: str = "step") -> Path:
    """Side-by-side panels of curves, e.g. an alignment run's reward, KL and accuracy. Each panel
    is (its title, {label: (steps, values)}); a series of a few points is drawn with markers."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels):
        for label, (steps, values) in series.items():
            ax.plot(steps, values, "o-" if len(steps) <= 30 else "-", markersize=4, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
