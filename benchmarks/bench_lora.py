"""What fine-tuning costs, by what it trains: every weight, the last block, or LoRA adapters.

The same language model (GPT-2 small by default, random weights: the cost does not depend
on their values) takes training steps on the same random batch under each setting of
`minigpt.finetune.choose_trainable`, as `--task sft` would run them. For each setting the
script reports the trainable weights, the memory of what training adds to the weights
(gradients and AdamW's two moments, summed over the tensors actually allocated after a
step), and the median time of a whole step (forward, backward, AdamW). The settings take
turns step by step in one process, so a busy neighbour slows all alike.

    python benchmarks/bench_lora.py                         # GPT-2 small, 2 x 128 tokens, 1 thread
    python benchmarks/bench_lora.py --model gpt-mini --steps 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import FinetuneConfig, TrainConfig, model_config  # noqa: E402
from minigpt.finetune import choose_trainable  # noqa: E402
from minigpt.lora import count_parameters  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402
from minigpt.train import calc_loss_batch, make_optimizer  # noqa: E402

SETTINGS = {
    "all weights": FinetuneConfig(trainable="all"),
    "last block + norm + head": FinetuneConfig(trainable="last_blocks", last_blocks=1),
    "LoRA r=8 (qkv, out_proj, ff)": FinetuneConfig(trainable="lora", lora_rank=8),
    "LoRA r=8 (qkv only)": FinetuneConfig(trainable="lora", lora_rank=8, lora_targets=("qkv",)),
}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # GPT-2's own shape: tied head, as `--pretrained gpt2` loads it.
    base = GPTModel(model_config(args.model, tie_weights=True, drop_rate=0.0))
    weights_mib = tensor_bytes(base.parameters()) / 2**20
    inputs = torch.randint(0, base.cfg.vocab_size, (args.batch_size, args.max_length))
    targets = torch.randint(0, base.cfg.vocab_size, (args.batch_size, args.max_length))
    cfg = TrainConfig(learning_rate=1e-4)
    runs = {}
    for name, setting in SETTINGS.items():
        model = choose_trainable(copy.deepcopy(base), setting, new_head=False)
        runs[name] = {"model": model, "optimizer": make_optimizer(model, cfg), "times": []}

    def step(run) -> None:
        run["optimizer"].zero_grad(set_to_none=True)
        calc_loss_batch(inputs, targets, run["model"], "cpu").backward()
        run["optimizer"].step()

    for run in runs.values():  # the first step allocates the gradients and AdamW's moments
        step(run)
    for i in range(args.steps):
        order = list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]
        for run in order:
            start = time.perf_counter()
            step(run)
            run["times"].append(time.perf_counter() - start)

    print(f"minigpt fine-tuning cost | {args.model} (tied head, random weights, {weights_mib:,.0f} MiB of "
          f"fp32 weights) | batch {args.batch_size} x {args.max_length} tokens | torch {torch.__version__} | "
          f"{args.threads} thread(s) | median of {args.steps} steps, settings alternating")
    print()
    print("| what trains | trainable weights | share | gradients + AdamW state | step time | speed-up over all weights |")
    print("|---|---|---|---|---|---|")
    reference = statistics.median(runs["all weights"]["times"])
    for name, run in runs.items():
        model, optimizer = run["model"], run["optimizer"]
        trainable, total = count_parameters(model)
        grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        moments = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
        median = statistics.median(run["times"])
        print(f"| {name} | {trainable:,} | {100 * trainable / total:.2f}% | {(grads + moments) / 2**20:,.1f} MiB | "
              f"{median * 1000:,.0f} ms | {reference / median:.2f}× |")


if __name__ == "__main__":
    main()
