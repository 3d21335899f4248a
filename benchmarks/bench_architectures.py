"""GPT-2-style vs Llama-style vs mixture of experts, at matched width and depth (chapter 10).

Each preset is trained by `pretrain`, the code `python main.py` runs, with the same seed, the
same number of steps, batch size, window length and learning-rate schedule, on the same text:
the first --chars characters of Tiny Shakespeare, one token per character. Only the
architecture differs:

- gpt-mini:   LayerNorm, learned positions, GELU MLP (4 x 128 wide), 4 heads with their own K/V, biases;
- llama-tiny: RMSNorm, RoPE, SwiGLU (8/3 x 128 = 344 wide), 4 query heads sharing 2 K/V heads, no biases;
- moe-tiny:   llama-tiny with 4 SwiGLU experts per block, each token routed to its top 2.

All three have 128-wide, 4-layer, 4-head blocks. The table gives the parameters (and, for
the mixture, those a token actually runs through), the final validation loss (every window of
the validation split), the training tokens per second, and that speed relative to gpt-mini.
The plot shows validation loss against step for every model.

    python benchmarks/bench_architectures.py                 # 1 thread, 500 steps (about 5 minutes)
    python benchmarks/bench_architectures.py --quick         # chapter 10's notebook run, about half a minute
    python benchmarks/bench_architectures.py --steps 50      # a quick look
    python benchmarks/bench_architectures.py --models gpt-mini llama-tiny --threads 4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import model_config
from minigpt.settings import resolve_run_config  # noqa: E402
from minigpt.data import corpus_path, read_text  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402
from minigpt.scale import cpu_description  # noqa: E402
from minigpt.task_pretrain import pretrain  # noqa: E402

MODELS = ("gpt-mini", "llama-tiny", "moe-tiny")
# --quick: the short comparison of chapter 10's notebook (60 steps of 8 windows on 40,000 characters),
# whose losses the chapter quotes and tests/test_chapter_numbers.py compares with this script's output.
QUICK = dict(steps=60, batch_size=8, chars=40_000, eval_freq=10,
             plot=str(Path(tempfile.gettempdir()) / "bench-architectures-quick.png"))  # not the handbook's figure


def active_parameters(cfg) -> int:
    """Parameters one token runs through (a mixture leaves n_experts - top_k experts idle)."""
    with torch.device("meta"):
        return GPTModel(cfg).num_active_parameters()


def run_one(preset: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    settings = dict(
        QUICK_MODE=False, CUSTOM_MODE=True, MODEL=preset, TOKENIZER="char", SEED=args.seed, LOG_EVERY=10**6,
        custom_params=dict(num_epochs=100, max_steps=args.steps, batch_size=args.batch_size,
                           learning_rate=args.lr, weight_decay=0.1, lr_schedule="cosine",
                           warmup_steps=max(1, args.steps // 10), grad_clip=1.0, eval_freq=args.eval_freq,
                           eval_iter=5, max_length=args.max_length, stride=args.max_length,
                           sampling="random", start_context="ROMEO:",
                           model_overrides=dict(context_length=128, drop_rate=0.0)))
    run = resolve_run_config(settings, {"data": str(data), "out": str(out / preset)})
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # no progress bars
        _, tokenizer, _, run_dir = pretrain(run)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = model_config(preset, vocab_size=tokenizer.vocab_size, context_length=128, drop_rate=0.0)
    with torch.device("meta"):
        flops = GPTModel(cfg).flops_per_token(args.max_length)
    return dict(model=preset, params=metrics["num_parameters"], active=active_parameters(cfg), flops=flops,
                val=metrics["final_val_loss"], tok_s=metrics["tokens_per_sec"], steps=metrics["eval_steps"],
                val_curve=metrics["val_losses"], total_steps=metrics["steps"])


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        # The periodic estimates (a few batches each), then the final loss on every validation window.
        points = [(s, v) for s, v in zip(r["steps"], r["val_curve"]) if s < r["total_steps"]]
        points.append((r["total_steps"], r["val"]))
        ax.plot(*zip(*points), marker=".", label=f"{r['model']} (final {r['val']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title(title, fontsize=10)
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
                        help="chapter 10's short run: 60 steps of 8 windows on 40,000 characters (seconds)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per training window (at most 128)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-freq", type=int, default=25)
    parser.add_argument("--chars", type=int, default=200_000,
                        help="train on the first this many characters of Tiny Shakespeare (0: all)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default=str(ROOT / "chapters" / "figures" / "ch10-architectures.png"))
    args = parse_args(parser)
    torch.set_num_threads(args.threads)
    print(f"{cpu_description()} | "
          f"{args.steps} steps of "
          f"{args.batch_size} x {args.max_length} characters, lr {args.lr} (cosine), seed {args.seed}")

    with tempfile.TemporaryDirectory(prefix="bench-arch-") as tmp:
        tmp = Path(tmp)
        text = read_text(corpus_path("tinyshakespeare"))
        if args.chars:
            text = text[:args.chars]
        data = tmp / "shakespeare.txt"
        data.write_text(text, encoding="utf-8")
        print(f"data: Tiny Shakespeare, {len(text):,} characters (90% train, 10% validation)\n")
        results = []
        for preset in args.models:
            results.append(run_one(preset, data, tmp / "runs", args))
            r = results[-1]
            print(f"  {preset:<11} done: validation loss {r['val']:.3f}, {r['tok_s']:,.0f} tokens/s", flush=True)

    base = next((r["tok_s"] for r in results if r["model"] == "gpt-mini"), results[0]["tok_s"])
    print()
    header = f"{'model':<11} {'parameters':>11} {'active/token':>13} {'train GFLOP/token':>18} " \
             f"{'val loss':>9} {'tokens/s':>9} {'speed vs gpt-mini':>18}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<11} {r['params']:>11,} {r['active']:>13,} {r['flops'] / 1e9:>18.4f} "
              f"{r['val']:>9.3f} {r['tok_s']:>9,.0f} {r['tok_s'] / base:>17.2f}x")
    path = Path(args.plot)
    plot(results, path, f"Tiny Shakespeare (characters), {args.steps} steps of {args.batch_size} x "
                        f"{args.max_length}, seed {args.seed}")
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
