"""AdamW's update: PyTorch's fused implementation (what `make_optimizer` uses) against what
`torch.optim.AdamW(params)` gives with no flags on a CPU (the single-tensor loop: PyTorch picks
its multi-tensor `foreach` version only for CUDA tensors) and against `foreach=True`, on the
weights of three minigpt models.

The update itself is the same arithmetic (the script checks the weights agree after the
timed steps); the fused kernel reads and writes each tensor once per step instead of once
per elementary operation. The three optimizers take turns, step by step, in one process, so
a busy neighbour slows all alike; the table reports medians.

    python benchmarks/bench_optimizer.py              # 1 thread
    python benchmarks/bench_optimizer.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import model_config  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402

# name -> (preset, overrides)
MODELS = {
    "gpt-char, Shakespeare (0.8M)": ("gpt-char", dict(vocab_size=65)),
    "gpt-mini (13.7M)": ("gpt-mini", {}),
    "gpt2-small (163M)": ("gpt2-small", {}),
}


KINDS = {"default": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}  # AdamW's flags


def adamw(model: GPTModel, kind: str) -> torch.optim.AdamW:
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, **KINDS[kind])


def measure(preset: str, overrides: dict, steps: int) -> dict:
    torch.manual_seed(0)
    models = {kind: GPTModel(model_config(preset, **overrides)) for kind in KINDS}
    for model in models.values():
        model.load_state_dict(models["default"].state_dict())
    optimizers = {kind: adamw(model, kind) for kind, model in models.items()}
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in models["default"].parameters()]
    for model in models.values():
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
    times = {kind: [] for kind in models}
    for step in range(steps + 2):
        for kind in (list(KINDS) if step % 2 == 0 else reversed(KINDS)):
            start = time.perf_counter()
            optimizers[kind].step()
            if step >= 2:  # the first steps allocate the moments
                times[kind].append(time.perf_counter() - start)
    difference = max((a - b).abs().max().item() for other in ("foreach", "fused")
                     for a, b in zip(models["default"].parameters(), models[other].parameters()))
    return {"params": models["fused"].num_parameters(), "difference": difference,
            **{kind: 1000 * statistics.median(t) for kind, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (printed; default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (default 20)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s); AdamW steps alternated, "
          f"median of {args.steps}")
    print("| model | parameters | default (single-tensor) | foreach | fused | fused vs default | "
          "fused vs foreach | max \\|diff\\| |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (preset, overrides) in MODELS.items():
        steps = args.steps if "gpt2" not in preset else max(5, args.steps // 4)
        r = measure(preset, overrides, steps)
        print(f"| {name} | {r['params']:,} | {r['default']:.2f} ms | {r['foreach']:.2f} ms | {r['fused']:.2f} ms | "
              f"{r['default'] / r['fused']:.1f}x | {r['foreach'] / r['fused']:.1f}x | {r['difference']:.1e} |")


if __name__ == "__main__":
    main()
