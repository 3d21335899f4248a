"""Figures for runs and chapters, written as PNG files (no window needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw to files only: works on servers and in CI, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(eval_steps: list[int], tokens_seen: list[int], train_losses: list[float],
                val_losses: list[float], batch_losses: list[float], path: str | Path,
                title: str = "Training and validation loss") -> Path:
    """Train/val loss against optimizer steps (bottom axis) and tokens seen (top axis),
    over the loss of every single batch (faint)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if batch_losses:
        ax.plot(range(1, len(batch_losses) + 1), batch_losses, color="0.75", linewidth=0.8,
                label="train loss, each batch")
    ax.plot(eval_steps, train_losses, "o-", color="tab:blue", markersize=3, label="train loss (eval)")
    ax.plot(eval_steps, val_losses, "s--", color="tab:orange", markersize=3, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")

    if len(eval_steps) >= 2 and eval_steps[-1] > eval_steps[0]:
        # Tokens seen grow linearly with steps, so a second axis on top can label them.
        tokens_per_step = (tokens_seen[-1] - tokens_seen[0]) / (eval_steps[-1] - eval_steps[0])
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                    lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
