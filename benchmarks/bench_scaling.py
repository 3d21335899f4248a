"""A small scaling-law sweep (chapter 9.13): held-out loss against model size on Tiny Shakespeare.

Every model is trained by chapter 5's loop (`train_loop` over `train_step`, AdamW from
`make_optimizer`, warm-up then cosine) on the same text, one token per character, for the same
number of tokens D, from the same seed; only the size differs (n_layers x emb_dim, heads of 16
dimensions, nanoGPT's character model otherwise: tied head, no biases, no dropout). For each
model the table gives the non-embedding parameters N (every weight but the token and position
tables), D, the compute 6ND (Kaplan et al.'s estimate) beside the FLOPs the model really needs
(`GPTModel.flops_per_token` x D: attention and the tied head included), and the final loss on
the held-out last 10% of the text. It then fits L(N) = a N^-alpha + c and, in log-log space,
L(N) = a N^-alpha, by least squares written out, prints both and draws the log-log plot.

Why characters: with GPT-2's 50,257 tokens the embedding table of even the smallest model
would outweigh its blocks many times over, and the 1.1 MB of text is only 338,025 GPT-2
tokens; 65 characters keep the embeddings negligible and give a million tokens to train on.

    python benchmarks/bench_scaling.py                  # 6 sizes x 1,536,000 tokens, 1 thread (8 minutes of CPU)
    python benchmarks/bench_scaling.py --quick          # 3 sizes x 61,440 tokens (about 10 s)
    python benchmarks/bench_scaling.py --compute 3e12   # fixed compute: D = C / (6N) per size
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import TrainConfig, model_config  # noqa: E402
from minigpt.data import corpus_path, create_dataloader, read_text, split_text  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402
from minigpt.scale import cpu_description  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402
from minigpt.train import Loaders, StepSetup, TrainState, calc_loss_loader, make_optimizer, train_loop  # noqa: E402

# (n_layers, emb_dim): about 12 x n_layers x emb_dim^2 non-embedding weights each, 12k to 1.8M.
SIZES = [(1, 32), (2, 48), (2, 64), (3, 96), (4, 128), (6, 160)]
QUICK_SIZES = [(1, 32), (2, 64), (3, 96)]
HEAD_DIM = 16


@dataclass(frozen=True)
class Sweep:
    """What every model of a sweep shares: the budget, the batch and the optimizer settings."""

    steps: int = 1500            # optimizer steps per model (fixed D), unless `compute` is given
    batch_size: int = 16         # windows per step
    max_length: int = 64         # tokens per window: 1,024 tokens per step
    learning_rate: float = 2e-3  # the peak, after `warmup_steps`; cosine to a tenth of it
    warmup_steps: int = 100
    val_windows: int | None = None  # held-out windows scored at the end (None: every one)
    seed: int = 123
    compute: float | None = None    # fixed compute C instead: each model gets D = C / (6N) tokens

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.max_length


QUICK = Sweep(steps=60, warmup_steps=6, val_windows=192)


def non_embedding_parameters(model: GPTModel) -> int:
    """N as Kaplan et al. count it: every weight except the token and position embedding tables."""
    tables = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    return model.num_parameters() - tables


def build_model(n_layers: int, emb_dim: int, vocab_size: int, context_length: int, seed: int) -> GPTModel:
    """A gpt-char model (tied head, no biases, no dropout) of the given depth and width."""
    torch.manual_seed(seed)
    cfg = model_config("gpt-char", vocab_size=vocab_size, n_layers=n_layers, emb_dim=emb_dim,
                       n_heads=emb_dim // HEAD_DIM, context_length=context_length)
    return GPTModel(cfg)


def steps_for(model: GPTModel, sweep: Sweep) -> int:
    """The optimizer steps a model gets: `sweep.steps`, or, at fixed compute, C / (6N) tokens' worth."""
    if sweep.compute is None:
        return sweep.steps
    return max(1, round(sweep.compute / (6 * non_embedding_parameters(model)) / sweep.tokens_per_step))


def train_one(size: tuple[int, int], train_ids: list[int], val_ids: list[int], vocab_size: int,
              sweep: Sweep) -> dict:
    """Train one size for its budget with chapter 5's loop; its N, D, compute and held-out loss."""
    n_layers, emb_dim = size
    model = build_model(n_layers, emb_dim, vocab_size, sweep.max_length, sweep.seed)
    steps = steps_for(model, sweep)
    cfg = TrainConfig(num_epochs=10**6, max_steps=steps, batch_size=sweep.batch_size,
                      learning_rate=sweep.learning_rate, weight_decay=0.1, lr_schedule="cosine",
                      warmup_steps=min(sweep.warmup_steps, steps - 1), grad_clip=1.0, beta2=0.99,
                      max_length=sweep.max_length, stride=sweep.max_length, eval_freq=10**9)
    train = create_dataloader(train_ids, sweep.batch_size, sweep.max_length, sweep.max_length, seed=sweep.seed)
    val = create_dataloader(val_ids, sweep.batch_size, sweep.max_length, sweep.max_length, shuffle=False,
                            drop_last=False)
    setup = StepSetup(torch.device("cpu"))
    setup.is_main = False  # a quiet loop: no progress bar, no log lines
    state = TrainState()
    started, cpu_started = time.perf_counter(), time.process_time()
    loaders = Loaders(train, train_eval=val, val=val)  # train_eval: for periodic evaluations, and none comes
    train_loop(model, make_optimizer(model, cfg), loaders, cfg, state, setup)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    model.eval()
    val_batches = None if sweep.val_windows is None else math.ceil(sweep.val_windows / sweep.batch_size)
    loss = calc_loss_loader(val, model, "cpu", num_batches=val_batches)
    n, d = non_embedding_parameters(model), state.tokens_seen
    return dict(n_layers=n_layers, emb_dim=emb_dim, N=n, D=d, C=6 * n * d,
                flops=model.flops_per_token(sweep.max_length) * d, loss=loss, seconds=seconds,
                cpu_seconds=cpu_seconds)


def run_sweep(sizes: list[tuple[int, int]], sweep: Sweep, text: str, report=print) -> list[dict]:
    """Train every size on the first 90% of `text` (characters) and score it on the last 10%."""
    tokenizer = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text, train_ratio=0.9)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    rows = []
    for size in sizes:
        rows.append(train_one(size, train_ids, val_ids, tokenizer.vocab_size, sweep))
        row = rows[-1]
        report(f"  {row['n_layers']} x {row['emb_dim']:<4} N {row['N']:>9,}  D {row['D']:>10,}  "
               f"loss {row['loss']:.4f}  ({row['seconds']:.1f} s, processor {row['cpu_seconds']:.1f} s)")
    return rows


# ---------------------------------------------------------------------------------------
# Fitting L(N) = a N^-alpha + c
# ---------------------------------------------------------------------------------------

def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y ~ intercept + slope x, from the normal equations written out."""
    x_mean, y_mean = x.mean(), y.mean()
    slope = ((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum()
    return y_mean - slope * x_mean, slope


def fit_power_law(n: np.ndarray, loss: np.ndarray) -> dict:
    """L = a N^-alpha by least squares on log L = log a - alpha log N (a straight line in log-log)."""
    log_a, slope = fit_line(np.log(n), np.log(loss))
    return dict(a=float(np.exp(log_a)), alpha=float(-slope), c=0.0)


def _offset_fit_at(alpha: float, n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """For a fixed alpha, L = a x + c with x = N^-alpha is a line: its least-squares (a, c) and squared error."""
    x = n ** -alpha
    c, a = fit_line(x, loss)
    return a, c, float(((a * x + c - loss) ** 2).sum())


def fit_power_law_with_offset(n: np.ndarray, loss: np.ndarray, alpha_max: float = 2.0) -> dict:
    """L = a N^-alpha + c by least squares on L itself: for each alpha the best (a, c) is a line
    fit, so only alpha is searched, on a grid and then by golden-section search around the best."""
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    grid = np.linspace(1e-3, alpha_max, 2000)
    errors = [_offset_fit_at(alpha, n, loss)[2] for alpha in grid]
    best = int(np.argmin(errors))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # shrinks the bracket by 0.618 each time: far below 1e-9 after 100
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if _offset_fit_at(left, n, loss)[2] < _offset_fit_at(right, n, loss)[2]:
            high = right
        else:
            low = left
    alpha = (low + high) / 2
    a, c, error = _offset_fit_at(alpha, n, loss)
    return dict(a=float(a), alpha=float(alpha), c=float(c), squared_error=error, at_edge=best in (0, len(grid) - 1))


def predict(fit: dict, n: np.ndarray) -> np.ndarray:
    return fit["a"] * np.asarray(n, dtype=np.float64) ** -fit["alpha"] + fit["c"]


# ---------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------

def print_table(rows: list[dict], report=print) -> None:
    report("| n_layers x emb_dim | N (non-embedding) | D (tokens) | 6ND (FLOPs) | model FLOPs | held-out loss "
           "| time (processor) |")
    report("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        report(f"| {r['n_layers']} x {r['emb_dim']} | {r['N']:,} | {r['D']:,} | {r['C']:.3g} | {r['flops']:.3g} | "
               f"{r['loss']:.4f} | {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s) |")


def describe_fits(rows: list[dict]) -> tuple[dict, dict, list[str]]:
    """Both fits of the rows and the lines that state them."""
    n, loss = np.array([r["N"] for r in rows], float), np.array([r["loss"] for r in rows], float)
    plain, offset = fit_power_law(n, loss), fit_power_law_with_offset(n, loss)
    lines = [f"L = a N^-alpha:     a = {plain['a']:.4g}, alpha = {plain['alpha']:.4f}, "
             f"RMS error {np.sqrt(np.mean((predict(plain, n) - loss) ** 2)):.4f}",
             f"L = a N^-alpha + c: a = {offset['a']:.4g}, alpha = {offset['alpha']:.4f}, c = {offset['c']:.4f}, "
             f"RMS error {np.sqrt(offset['squared_error'] / len(n)):.4f}"]
    if offset["at_edge"] or offset["c"] < 0:
        lines.append("  (the offset fit is not pinned down: alpha at the end of its range, or c below zero)")
    if len(rows) > 3:
        lines.append(leave_one_out(n, loss))
    return plain, offset, lines


def leave_one_out(n: np.ndarray, loss: np.ndarray) -> str:
    """How far each fit moves when any one point is left out: how much it leans on single runs."""
    plain = [fit_power_law(np.delete(n, i), np.delete(loss, i)) for i in range(len(n))]
    offset = [fit_power_law_with_offset(np.delete(n, i), np.delete(loss, i)) for i in range(len(n))]

    def spread(fits: list[dict], key: str) -> str:
        return f"{key} {min(f[key] for f in fits):.4f} to {max(f[key] for f in fits):.4f}"

    return (f"leaving out one point at a time: {spread(plain, 'alpha')} without c; "
            f"with c, {spread(offset, 'alpha')} and {spread(offset, 'c')}")


def plot_scaling(rows: list[dict], plain: dict, offset: dict, title: str):
    """Held-out loss against N on log-log axes, with both fits; returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    n, loss = np.array([r["N"] for r in rows], float), np.array([r["loss"] for r in rows], float)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(n, loss, "o", color="black", label="measured")
    ax.plot(grid, predict(plain, grid), "--", label=f"$a N^{{-\\alpha}}$, $\\alpha$ = {plain['alpha']:.3f}")
    ax.plot(grid, predict(offset, grid), "-",
            label=f"$a N^{{-\\alpha}} + c$, $\\alpha$ = {offset['alpha']:.3f}, c = {offset['c']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%.1f"))  # 2.5, not 2.5 x 10^0
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("held-out loss (nats per character)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 sizes x 60 steps, 192 held-out windows")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default 1500)")
    parser.add_argument("--compute", type=float, default=None, help="fixed compute C: D = C / (6N) per model")
    parser.add_argument("--data", default=None, help="a text file instead of Tiny Shakespeare")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=str(Path(tempfile.gettempdir()) / "bench-scaling.png"),
                        help="where the figure goes; the numbers go beside it as .json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sweep, sizes = (QUICK, QUICK_SIZES) if args.quick else (Sweep(), SIZES)
    if args.steps is not None or args.compute is not None:
        sweep = replace(sweep, steps=args.steps or sweep.steps, compute=args.compute)
    text = read_text(args.data or corpus_path("tinyshakespeare"))
    print(f"cpu: {cpu_description()}")
    tokens = sweep.steps * sweep.tokens_per_step
    budget = (f"C = {sweep.compute:.3g} FLOPs each (D = C / 6N)" if sweep.compute else
              f"{sweep.steps} steps x {sweep.tokens_per_step:,} tokens = {tokens:,} tokens each")
    print(f"data: {args.data or 'Tiny Shakespeare'}, {len(text):,} characters (one token each; 90% train, "
          f"last 10% held out, {sweep.val_windows or 'all'} windows scored) | {budget}, "
          f"batch {sweep.batch_size} x {sweep.max_length}, lr {sweep.learning_rate} (warm-up, cosine), "
          f"seed {sweep.seed}\n")
    started = time.perf_counter()
    rows = run_sweep(sizes, sweep, text)
    print()
    print_table(rows)
    plain, offset, lines = describe_fits(rows)
    print("\n" + "\n".join(lines))
    fig = plot_scaling(rows, plain, offset, f"{args.data or 'Tiny Shakespeare'} (characters), "
                                            f"{budget.split(' (')[0]}")
    fig.savefig(args.plot, dpi=110)
    numbers = Path(args.plot).with_suffix(".json")
    numbers.write_text(json.dumps(dict(sweep=asdict(sweep), rows=rows, plain=plain, offset=offset), indent=1))
    print(f"\nplot: {args.plot} | numbers: {numbers} | total {time.perf_counter() - started:.0f} s, "
          f"processor {time.process_time():.0f} s")


if __name__ == "__main__":
    main()
