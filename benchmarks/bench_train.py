"""Training speed and peak memory: production attention vs the explicit teaching attention.

For the quick-mode model and for GPT-2 124M at context 256 (full mode's batch shape), time
full training steps (forward, backward, AdamW update) with the model's `MultiHeadAttention`
(fused Q/K/V + scaled_dot_product_attention) and with `ExplicitMultiHeadAttention` (the
chapter-3 code: separate projections, a materialised (T, T) mask and softmax) swapped
into every block. Each measurement runs in its own process so peak memory is its own.

    python benchmarks/bench_train.py                 # both configs, 1 thread
    python benchmarks/bench_train.py --threads 2 --configs quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (model preset, model overrides, batch size, tokens per window)
CONFIGS = {
    "quick": ("gpt-mini", dict(context_length=128, drop_rate=0.0), 2, 64),
    "124m-ctx256": ("gpt2-small", dict(context_length=256, drop_rate=0.1), 2, 256),
}
ATTENTIONS = ("production", "teaching")


def measure(config: str, attention: str, steps: int, warmup: int, device_name: str | None) -> dict:
    """Run in a worker process: time `steps` training steps after `warmup` untimed ones."""
    import torch

    from minigpt.attention import ExplicitMultiHeadAttention
    from minigpt.config import TrainConfig, model_config
    from minigpt.model import GPTModel
    from minigpt.train import calc_loss_batch, make_optimizer, pick_device

    device = pick_device(device_name)
    preset, overrides, batch_size, max_length = CONFIGS[config]
    cfg = model_config(preset, **overrides)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = GPTModel(cfg)
    if attention == "teaching":
        for block in model.trf_blocks:
            block.att = ExplicitMultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length,
                                                   cfg.drop_rate, cfg.n_heads, cfg.qkv_bias)
    model.to(device).train()
    optimizer = make_optimizer(model, TrainConfig(learning_rate=4e-4, weight_decay=0.1))
    inputs = torch.randint(0, cfg.vocab_size, (batch_size, max_length), device=device)
    targets = torch.randint(0, cfg.vocab_size, (batch_size, max_length), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = calc_loss_batch(inputs, targets, model, device)
        loss.backward()
        optimizer.step()
        loss.item()  # wait for the device

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "CUDA peak allocated"
    else:  # peak resident memory of this process beyond what torch's import already took
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
        memory_kind = "peak RSS above baseline"
    return dict(config=config, attention=attention, device=str(device), threads=torch.get_num_threads(),
                params=model.num_parameters(), tokens_per_sec=steps * inputs.numel() / seconds,
                step_ms=1000 * seconds / steps, peak_mib=peak_mib, memory_kind=memory_kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (printed; default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 quick, 3 for 124M)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "ATTENTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    if args.worker:
        config, attention = args.worker
        print(json.dumps(measure(config, attention, args.steps, args.warmup, args.device)))
        return

    configs = args.configs.split(",")
    for name in configs:
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), warm-up {args.warmup} steps; "
          "each row is its own process")
    rows = []
    for name in configs:
        steps = args.steps or (20 if name == "quick" else 3)
        for attention in ATTENTIONS:
            command = [sys.executable, __file__, "--worker", name, attention, "--steps", str(steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
            if args.device:
                command += ["--device", args.device]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                               env=env).stdout.strip().splitlines()[-1])
            result["steps"] = steps
            rows.append(result)

    print(f"\n{'config':<12} {'attention':<11} {'params':>12} {'device':>6} {'steps':>5} "
          f"{'ms/step':>9} {'tokens/s':>10} {'speed-up':>8} {'peak MiB':>9} {'memory ratio':>12}")
    for row in rows:
        teaching = next(r for r in rows if r["config"] == row["config"] and r["attention"] == "teaching")
        print(f"{row['config']:<12} {row['attention']:<11} {row['params']:>12,} {row['device']:>6} "
              f"{row['steps']:>5} {row['step_ms']:>9.1f} {row['tokens_per_sec']:>10,.0f} "
              f"{row['tokens_per_sec'] / teaching['tokens_per_sec']:>7.2f}x {row['peak_mib']:>9,.0f} "
              f"{row['peak_mib'] / teaching['peak_mib']:>11.2f}x")
    print(f"\nspeed-up and memory ratio are relative to the teaching attention in the same run; "
          f"memory is {rows[0]['memory_kind']}.")


if __name__ == "__main__":
    main()
