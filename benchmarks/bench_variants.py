"""Chapter 11's research variants against their baseline, at a matched budget and over several seeds.

Each model is trained by `pretrain`, the code `python main.py` runs, with the same number of
steps, batch size, window length, learning-rate schedule and text (the first --chars characters
of Tiny Shakespeare, one token per character, 90% train / 10% validation), once per seed
(seeds 123, 124, ...). Only the architecture differs:

- llama-tiny:   the baseline: RMSNorm, RoPE, SwiGLU (344 wide), 4 query heads sharing 2 K/V heads;
- +tau:         llama-tiny with a learned temperature per head and token (attn_tau) only;
- +rank16:      llama-tiny with queries and keys of rank 16 instead of 32 per head (attn_rank) only;
- moe-tiny:     llama-tiny with 4 SwiGLU experts per block (344 wide each), top-2 routing;
- tau-tiny:     tau-gated rank-16 attention over 4 experts of width 128, top-1, plus a shared expert;
- halting-tiny: tau-tiny with a halting unit after each block (adaptive computation time).

The budgets are matched in steps, tokens and schedule, not in parameters: the presets differ in
size (on the default text: llama-tiny 742,016; tau-tiny 1,151,632 stored but 561,808 run per
token, as its top-1 router leaves 3 of 4 experts idle; moe-tiny holds even more). The table
prints both counts, so read a difference in loss together with them.

For each model the table gives the parameters, the active parameters per token, the final
validation loss (every window of the validation split) as mean +- sample standard deviation
over the seeds, its difference from the baseline with the noise of that difference
(sqrt(s_a^2/n + s_b^2/n), the standard error of a difference of two means) and, below the
table, Welch's t-test of it (a difference with p >= 0.05 is marked "(noise)"), the training
tokens per second (mean over seeds) and, for halting-tiny, the mean number of blocks a
validation token ran (`evaluate_text`'s mean_depth). The plot shows the validation curves,
the mean over seeds with a band of +- one standard deviation.

    python benchmarks/bench_variants.py                     # 1 thread, 250 steps, 3 seeds (about 12 minutes)
    python benchmarks/bench_variants.py --quick             # every row in about half a minute (chapter 11 quotes it)
    python benchmarks/bench_variants.py --steps 50 --seeds 1  # a quick look
    python benchmarks/bench_variants.py --models llama-tiny tau-tiny --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import model_config
from minigpt.settings import resolve_run_config  # noqa: E402
from minigpt.data import corpus_path, read_text, split_text  # noqa: E402
from minigpt.evaluate import evaluate_text, welch_t_test  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402
from minigpt.scale import cpu_description  # noqa: E402
from minigpt.task_pretrain import pretrain  # noqa: E402

BASELINE = "llama-tiny"
# Row name -> (preset, GPTConfig fields changed). The two ablations switch on one idea each.
MODELS = {
    "llama-tiny": ("llama-tiny", {}),
    "+tau": ("llama-tiny", {"attn_tau": True}),
    "+rank16": ("llama-tiny", {"attn_rank": 16}),
    "moe-tiny": ("moe-tiny", {}),
    "tau-tiny": ("tau-tiny", {}),
    "halting-tiny": ("halting-tiny", {}),
}
# --quick: every row, 2 seeds, 20 steps of 4 windows of 64 characters of the first 10,000: too short to rank
# the variants, long enough that a changed number shows. Chapter 11 quotes its losses and
# tests/test_chapter_numbers.py compares them with this script's output.
QUICK = dict(steps=20, seeds=2, batch_size=4, max_length=64, chars=10_000, eval_freq=20)


def run_one(name: str, seed: int, data: Path, val_text: str, out: Path, args: argparse.Namespace) -> dict:
    preset, switches = MODELS[name]
    overrides = dict(context_length=128, drop_rate=0.0, **switches)
    settings = dict(
        QUICK_MODE=False, CUSTOM_MODE=True, MODEL=preset, TOKENIZER="char", SEED=seed, LOG_EVERY=10**6,
        custom_params=dict(num_epochs=100, max_steps=args.steps, batch_size=args.batch_size,
                           learning_rate=args.lr, weight_decay=0.1, lr_schedule="cosine",
                           warmup_steps=max(1, args.steps // 10), grad_clip=1.0, eval_freq=args.eval_freq,
                           eval_iter=5, max_length=args.max_length, stride=args.max_length,
                           sampling="random", start_context="ROMEO:", model_overrides=overrides))
    run = resolve_run_config(settings, {"data": str(data), "out": str(out / f"{name}-{seed}")})
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # no progress bars
        model, tokenizer, _, run_dir = pretrain(run)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = model_config(preset, vocab_size=tokenizer.vocab_size, **overrides)
    with torch.device("meta"):
        meta = GPTModel(cfg)
        active, flops = meta.num_active_parameters(), meta.flops_per_token(args.max_length)
    depth = None
    if cfg.halting:  # the blocks a validation token runs, from the trained model
        with torch.no_grad():
            depth = evaluate_text(model, tokenizer, val_text, max_length=args.max_length,
                                  batch_size=32)["mean_depth"]
    return dict(name=name, seed=seed, params=metrics["num_parameters"], active=active, flops=flops,
                val=metrics["final_val_loss"], tok_s=metrics["tokens_per_sec"], steps=metrics["eval_steps"],
                val_curve=metrics["val_losses"], total_steps=metrics["steps"], depth=depth,
                n_layers=cfg.n_layers)


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def welch_against(row: dict, base: dict) -> dict | None:
    """Welch's t-test of a row's final losses against the baseline's (chapter 12, section 12.7); None
    when a side has fewer than two seeds or both have no spread, so no test is possible."""
    if row["n"] < 2 or base["n"] < 2:
        return None
    try:
        return welch_t_test(row["vals"], base["vals"])
    except ValueError:
        return None


def summarise(runs: list[dict]) -> dict:
    vals = [r["val"] for r in runs]
    depths = [r["depth"] for r in runs if r["depth"] is not None]
    return dict(name=runs[0]["name"], params=runs[0]["params"], active=runs[0]["active"], flops=runs[0]["flops"],
                n=len(runs), mean=statistics.fmean(vals), std=std(vals), vals=vals,
                tok_s=statistics.fmean(r["tok_s"] for r in runs),
                depth=statistics.fmean(depths) if depths else None, n_layers=runs[0]["n_layers"])


def plot(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, runs in groups.items():
        # The periodic estimates (a few batches each), then the final loss on every validation window.
        curves = []
        for r in runs:
            points = [(s, v) for s, v in zip(r["steps"], r["val_curve"]) if s < r["total_steps"]]
            points.append((r["total_steps"], r["val"]))
            curves.append(points)
        steps = np.array([s for s, _ in curves[0]])
        values = np.array([[v for _, v in c] for c in curves])
        mean = values.mean(axis=0)
        line, = ax.plot(steps, mean, marker=".", label=f"{name} (final {mean[-1]:.3f})")
        if len(runs) > 1:
            spread = values.std(axis=0, ddof=1)
            ax.fill_between(steps, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.2))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The flags; --quick changes the defaults to QUICK's, and flags given beside it still win."""
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    return parser.parse_args()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every row in about half a minute: 2 seeds of 20 steps of 4 x 64 characters of 10,000")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3, help="runs per model, seeds --seed, --seed + 1, ...")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training window (at most 128)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-freq", type=int, default=25)
    parser.add_argument("--chars", type=int, default=200_000,
                        help="train on the first this many characters of Tiny Shakespeare (0: all)")
    parser.add_argument("--data", default=None, help="a text file to train on instead of Tiny Shakespeare")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=str(Path(tempfile.gettempdir()) / "bench-variants.png"))
    args = parse_args(parser)
    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"{cpu_description()} | "
          f"{args.steps} steps of "
          f"{args.batch_size} x {args.max_length} characters, lr {args.lr} (cosine), seeds {seeds}")

    groups: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        tmp = Path(tmp)
        text = read_text(args.data or corpus_path("tinyshakespeare"))
        if args.chars:
            text = text[:args.chars]
        data = tmp / "text.txt"
        data.write_text(text, encoding="utf-8")
        _, val_text = split_text(text, train_ratio=0.9)
        source = args.data or "Tiny Shakespeare"
        print(f"data: {source}, {len(text):,} characters (90% train, 10% validation)\n")
        for name in args.models:
            for seed in seeds:
                r = run_one(name, seed, data, val_text, tmp / "runs", args)
                groups.setdefault(name, []).append(r)
                depth = f", mean depth {r['depth']:.2f}/{r['n_layers']}" if r["depth"] is not None else ""
                print(f"  {name:<12} seed {seed}: validation loss {r['val']:.4f}, "
                      f"{r['tok_s']:,.0f} tokens/s{depth}", flush=True)

    rows = [summarise(runs) for runs in groups.values()]
    base = next((row for row in rows if row["name"] == BASELINE), rows[0])
    print(f"\nFinal validation loss, mean +- sample std over {len(seeds)} seeds; difference from "
          f"{base['name']} +- its standard error.\n")
    print("| model | parameters | active/token | GFLOP/token | val loss | vs baseline | tokens/s | mean depth |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row is base:
            diff = "-"
        else:
            noise = (row["std"] ** 2 / row["n"] + base["std"] ** 2 / base["n"]) ** 0.5
            diff = f"{row['mean'] - base['mean']:+.3f} +- {noise:.3f}"
            test = welch_against(row, base)
            if test is not None and test["p"] >= 0.05:
                diff += " (noise)"
        depth = f"{row['depth']:.2f}/{row['n_layers']}" if row["depth"] is not None else "-"
        print(f"| {row['name']} | {row['params']:,} | {row['active']:,} | {row['flops'] / 1e9:.4f} | "
              f"{row['mean']:.3f} +- {row['std']:.3f} | {diff} | {row['tok_s']:,.0f} | {depth} |")
    print("\n(noise): Welch's t-test does not show the difference (two-sided p >= 0.05), so these seeds do not "
          "tell the model from the baseline.")
    for row in rows:
        test = None if row is base else welch_against(row, base)
        if test is not None:
            print(f"  {row['name']:<12} vs {base['name']}: t = {test['t']:.2f}, Welch df = {test['df']:.2f}, "
                  f"p = {test['p']:.3f}")
    path = Path(args.plot)
    plot(groups, path, f"{source} (characters), {args.steps} steps of {args.batch_size} x "
                       f"{args.max_length}, mean of {len(seeds)} seeds (band: +- 1 std)")
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
