"""The training-memory estimate against the measured peak (chapter 9, issue "sizes that fit").

For each configuration a fresh process builds the model and AdamW, takes three training steps
(`minigpt.train.train_step`, the step `python main.py` runs) and reports its peak memory above
where it started: the CUDA allocator's peak on a GPU, the process's resident-memory high-water
mark on a CPU under Linux (it counts the pages the allocator touched, so it reads a little
above the tensors' bytes and moves by several percent between runs). The table compares it
with `minigpt.memory.estimate_training_memory`, computed before anything runs: the ratio is
the figure to read. A fresh process per row keeps one row's freed memory out of the next.

Then `--batch-size auto` is timed: how long `minigpt.scale.fit_micro_batch` takes to find the
largest micro-batch under a cap, against the time of one training step at that size.

    python benchmarks/bench_memory.py                   # CPU, 1 thread (about a minute)
    python benchmarks/bench_memory.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import TrainConfig, model_config  # noqa: E402
from minigpt.memory import MIB, can_measure_peak, estimate_training_memory, measure_peak  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402
from minigpt.scale import Distributed, ScaledSetup, fit_micro_batch  # noqa: E402
from minigpt.train import make_optimizer, train_step  # noqa: E402

# (label, preset, overrides, micro-batch, tokens per sequence)
CONFIGS = [
    ("gpt-mini, GPT-2 vocabulary", "gpt-mini", {}, 8, 128),
    ("gpt-mini, 512 tokens", "gpt-mini", dict(vocab_size=512), 32, 128),
    ("gpt-mini, dropout 0.1", "gpt-mini", dict(drop_rate=0.1), 4, 128),
    ("llama-tiny", "llama-tiny", {}, 8, 128),
    ("moe-tiny", "moe-tiny", {}, 8, 128),
    ("gpt2-small, 4 layers", "gpt2-small", dict(n_layers=4, context_length=256), 4, 256),
    ("gpt2-small", "gpt2-small", dict(context_length=256), 4, 256),
]


def config_of(preset: str, overrides: dict):
    return model_config(preset, **{"drop_rate": 0.0, **overrides})


def measure_one(index: int, device: torch.device, precision: str, accumulation: int) -> dict:
    """Run in a child process: the peak of three training steps, and the estimate."""
    label, preset, overrides, micro, tokens = CONFIGS[index]
    cfg = config_of(preset, overrides)
    torch.manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (micro, tokens), device=device) for _ in range(accumulation)]
    setup = ScaledSetup(device, precision=precision)
    box = {}

    def train() -> None:
        model = GPTModel(cfg).to(device)
        optimizer = make_optimizer(model, TrainConfig())
        for _ in range(3):
            train_step(model, optimizer, [(ids, ids) for ids in batches], setup)
        box["model"] = model

    peak = measure_peak(train, device)
    estimate = estimate_training_memory(box["model"], micro, tokens, precision, accumulating=accumulation > 1)
    return {"peak": peak, "estimate": estimate.total, "states": estimate.states,
            "activations": estimate.activations + estimate.loss_buffers + estimate.backward_buffers}


def time_auto(device: torch.device, precision: str, cap_sequences: int) -> dict:
    """fit_micro_batch on gpt-mini (512 tokens) for a batch of 64, under a cap that holds about
    `cap_sequences` sequences; then one training step of the whole batch at the chosen size."""
    cfg = config_of("gpt-mini", dict(vocab_size=512))
    model = GPTModel(cfg).to(device)

    def batch(size: int):
        ids = torch.randint(0, 512, (size, 128), device=device)
        return ids, ids

    estimate = estimate_training_memory(model, cap_sequences, 128, precision, accumulating=True)
    cap = estimate.total - estimate.weights
    train = TrainConfig(batch_size=64, max_length=128, micro_batch_size="auto")
    start = time.perf_counter()
    settled, note = fit_micro_batch(model, train, Distributed(), device, precision, batch, 128, limit=cap)
    search = time.perf_counter() - start
    optimizer = make_optimizer(model, settled)
    micro = settled.micro_batch_size
    start = time.perf_counter()
    train_step(model, optimizer, [batch(micro) for _ in range(64 // micro)], ScaledSetup(device, precision=precision))
    step = time.perf_counter() - start
    return {"note": note, "search_s": search, "step_s": step, "cap": cap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (1: no accumulation)")
    parser.add_argument("--configs", type=int, nargs="*", help="rows to run (indices into CONFIGS)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child is not None:
        print(json.dumps(measure_one(args.child, device, args.precision, args.accumulation)))
        return
    if not can_measure_peak(device):
        sys.exit(f"peak memory cannot be measured on {device} here (CUDA, or a CPU under Linux).")

    print(f"device {device}, precision {args.precision}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{args.accumulation} micro-batch(es) per step\n")
    header = f"{'configuration':28} {'batch':>9} {'states':>9} {'per batch':>10} {'estimate':>10} {'measured':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    ratios = []
    for index in args.configs if args.configs is not None else range(len(CONFIGS)):
        label, _, _, micro, tokens = CONFIGS[index]
        child = subprocess.run([sys.executable, __file__, "--child", str(index), "--device", args.device,
                                "--precision", args.precision, "--threads", str(args.threads),
                                "--accumulation", str(args.accumulation)],
                               capture_output=True, text=True, check=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        ratio = row["estimate"] / row["peak"]
        ratios.append(ratio)
        print(f"{label:28} {f'{micro} x {tokens}':>9} {row['states'] / MIB:>8,.0f}M {row['activations'] / MIB:>9,.0f}M "
              f"{row['estimate'] / MIB:>9,.0f}M {row['peak'] / MIB:>9,.0f}M {ratio:>6.2f}")
    print(f"\nestimate / measured: {min(ratios):.2f} to {max(ratios):.2f} (MiB = 2^20 bytes; measured: "
          f"{'CUDA allocator peak' if device.type == 'cuda' else 'process RSS high-water mark'} above the start)")

    auto = time_auto(device, args.precision, cap_sequences=12)
    print(f"\n--batch-size auto, gpt-mini (512 tokens), batch 64 x 128 tokens, cap {auto['cap'] / MIB:,.0f} MiB:")
    print(f"  {auto['note']}")
    print(f"  search {auto['search_s']:.2f} s; one training step of the batch at that size {auto['step_s']:.2f} s "
          f"(the search costs {auto['search_s'] / auto['step_s']:.1f} steps)")


if __name__ == "__main__":
    main()
