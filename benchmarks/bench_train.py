"""Training speed and peak memory: production attention vs the explicit teaching attention.

For the quick-mode model and for GPT-2 124M at context 256 (full mode's batch shape), time
full training steps (forward, backward, AdamW update) with the model's `MultiHeadAttention`
(fused Q/K/V + scaled_dot_product_attention) and with `ExplicitMultiHeadAttention` (the
chapter-3 code: separate projections, a materialised (T, T) mask and softmax) in every block.

Speed: one process builds both models and alternates their steps, so a busy neighbour slows
both alike; the table reports median step times. Memory: a separate process per model, so
each peak is its own. A second table times the attention layer alone (forward + backward),
where the two implementations differ, without the rest of the step diluting it.

    python benchmarks/bench_train.py                 # both configs, 1 thread
    python benchmarks/bench_train.py --threads 2 --configs quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def build(config: str, attention: str, device):
    """A model with the chosen attention in every block, its optimizer, and one fixed batch."""
    import torch

    from minigpt.attention import ExplicitMultiHeadAttention
    from minigpt.config import TrainConfig, model_config
    from minigpt.model import GPTModel
    from minigpt.train import make_optimizer

    preset, overrides, batch_size, max_length = CONFIGS[config]
    cfg = model_config(preset, **overrides)
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
    return model, optimizer, inputs, targets


def train_step(model, optimizer, inputs, targets, device) -> None:
    from minigpt.train import calc_loss_batch

    optimizer.zero_grad(set_to_none=True)
    loss = calc_loss_batch(inputs, targets, model, device)
    loss.backward()
    optimizer.step()
    loss.item()  # wait for the device


def measure_speed(config: str, steps: int, warmup: int, device) -> dict:
    """Median step time of each attention, their steps interleaved in one process."""
    setups = {attention: build(config, attention, device) for attention in ATTENTIONS}
    times = {attention: [] for attention in ATTENTIONS}
    for i in range(warmup + steps):
        for attention in ATTENTIONS if i % 2 == 0 else reversed(ATTENTIONS):
            start = time.perf_counter()
            train_step(*setups[attention], device)
            if i >= warmup:
                times[attention].append(time.perf_counter() - start)
    return {attention: dict(params=setups[attention][0].num_parameters(),
                            step_ms=1000 * statistics.median(times[attention]))
            for attention in ATTENTIONS}


def measure_memory(config: str, attention: str, device) -> float:
    """Peak memory (MiB) of two training steps: CUDA's allocator peak, or on a CPU the
    process's peak resident memory beyond what it held before the model was built."""
    import torch

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    setup = build(config, attention, device)
    for _ in range(2):  # the second step has AdamW's moments allocated
        train_step(*setup, device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024


def measure_attention_only(config: str, repeats: int, device) -> dict:
    """Forward + backward of one attention layer at the config's shape, interleaved."""
    import torch

    from minigpt.attention import ExplicitMultiHeadAttention, MultiHeadAttention
    from minigpt.config import model_config

    preset, overrides, batch_size, max_length = CONFIGS[config]
    cfg = model_config(preset, **overrides)
    layers = {"production": MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.drop_rate),
              "teaching": ExplicitMultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length,
                                                     cfg.drop_rate, cfg.n_heads)}
    x = torch.randn(batch_size, max_length, cfg.emb_dim, device=device, requires_grad=True)
    times = {name: [] for name in layers}
    for i in range(repeats + 3):
        for name, layer in layers.items():
            layer.to(device).train()
            start = time.perf_counter()
            layer(x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def run_worker(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(ARGS.threads)}
    command = [sys.executable, __file__, "--threads", str(ARGS.threads), "--warmup", str(ARGS.warmup)]
    if ARGS.device:
        command += ["--device", ARGS.device]
    result = subprocess.run(command + ["--worker", *args], check=True, capture_output=True, text=True, env=env)
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (printed; default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default: 40 quick, 5 for 124M)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="processes per speed measurement (default 3)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()

    import torch

    from minigpt.runs import pick_device

    torch.set_num_threads(ARGS.threads)
    device = pick_device(ARGS.device)
    if ARGS.worker:  # a child process: measure one thing, print it as JSON
        kind, config, *rest = ARGS.worker
        if kind == "speed":
            print(json.dumps(measure_speed(config, int(rest[0]), ARGS.warmup, device)))
        elif kind == "memory":
            print(json.dumps(measure_memory(config, rest[0], device)))
        else:
            print(json.dumps(measure_attention_only(config, int(rest[0]), device)))
        return

    configs = ARGS.configs.split(",")
    for name in configs:
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    print(f"torch {torch.__version__}, device {device}, {ARGS.threads} thread(s), warm-up {ARGS.warmup} steps")

    print(f"\nwhole training steps (forward + backward + AdamW): the two models' steps interleaved in "
          f"one process, repeated in {ARGS.repeats} processes; speed-up is the median over processes [range]")
    print(f"{'config':<12} {'attention':<11} {'params':>12} {'steps':>5} {'median ms/step':>14} "
          f"{'tokens/s':>9} {'speed-up [range]':>19} {'peak MiB':>9} {'memory':>7}")
    for name in configs:
        steps = ARGS.steps or (40 if name == "quick" else 5)
        runs = [json.loads(run_worker(["speed", name, str(steps)])) for _ in range(ARGS.repeats)]
        memory = {attention: json.loads(run_worker(["memory", name, attention])) for attention in ATTENTIONS}
        tokens_per_step = CONFIGS[name][2] * CONFIGS[name][3]
        for attention in ATTENTIONS:
            step_ms = statistics.median(run[attention]["step_ms"] for run in runs)
            ratios = [run["teaching"]["step_ms"] / run[attention]["step_ms"] for run in runs]
            spread = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
            print(f"{name:<12} {attention:<11} {runs[0][attention]['params']:>12,} {steps:>5} {step_ms:>14.1f} "
                  f"{tokens_per_step / (step_ms / 1000):>9,.0f} "
                  f"{spread:>19} {memory[attention]:>9,.0f} {memory[attention] / memory['teaching']:>6.2f}x")

    print("\none attention layer alone (forward + backward), the two interleaved")
    print(f"{'config':<12} {'production ms':>13} {'teaching ms':>11} {'speed-up':>8}")
    for name in configs:
        layer = json.loads(run_worker(["attention", name, "50" if name == "quick" else "20"]))
        print(f"{name:<12} {layer['production']:>13.2f} {layer['teaching']:>11.2f} "
              f"{layer['teaching'] / layer['production']:>7.2f}x")
    memory_kind = "CUDA allocator peak" if device.type == "cuda" else "peak RSS above the process's baseline"
    print(f"\nspeed-up and memory are relative to the teaching attention; memory is {memory_kind}.")


if __name__ == "__main__":
    main()
