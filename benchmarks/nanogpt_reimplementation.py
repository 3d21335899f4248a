"""The fallback of bench_vs_nanogpt.py when no nanoGPT checkout is given: a re-implementation of
nanoGPT, written here from nanoGPT's description, racing minigpt in one process.

This is not nanoGPT. It is its model (pre-norm blocks without biases, exact GELU, fused Q/K/V
with PyTorch's attention kernel, tied head, N(0, 0.02) init with the scaled residual
projections) and its training step and schedule (AdamW fused only on CUDA, as nanoGPT does),
at the configuration of nanoGPT's README CPU run. minigpt trains through `pretrain` at the same
configuration (the `gpt-char` preset). Both are scored on every 64-token window of the
validation split and on nanoGPT-style 20-batch estimates; then the training steps alternate in
blocks of iterations in one process (medians), with a third entry: the re-implementation with
the fused AdamW minigpt uses. For the real race: bench_vs_nanogpt.py --nanogpt DIR.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.data import corpus_path, create_dataloader, read_text, split_text
from minigpt.model import GPTModel
from minigpt.settings import resolve_run_config
from minigpt.task_pretrain import pretrain
from minigpt.tokenizer import CharTokenizer
from minigpt.train import StepSetup, learning_rate_at, make_optimizer, train_step

# nanoGPT's README command for a CPU: config/train_shakespeare_char.py with these overrides.
NANOGPT_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, learning_rate=1e-3,
                   dropout=0.0, max_iters=2000, warmup_iters=100, min_lr=1e-4, weight_decay=0.1,
                   beta1=0.9, beta2=0.99, grad_clip=1.0)
ROUNDS, BLOCK = 10, 50  # interleaved timing: blocks per entry, iterations per block


# ---------------------------------------------------------------------------------------
# The re-implementation of nanoGPT's model and training step
# ---------------------------------------------------------------------------------------

class NanoLayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT trains without biases by default)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = NanoLayerNorm(n_embd, bias)
        self.attn = NanoAttention(n_embd, n_head, bias)
        self.ln_2 = NanoLayerNorm(n_embd, bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 bias: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(NanoBlock(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = NanoLayerNorm(n_embd, bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nano_optimizer(model: nn.Module, fused: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": NANOGPT_CPU["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=NANOGPT_CPU["learning_rate"],
                             betas=(NANOGPT_CPU["beta1"], NANOGPT_CPU["beta2"]), fused=fused)


def nano_lr(it: int, max_iters: int) -> float:
    """nanoGPT's schedule: linear warm-up, cosine down to min_lr at lr_decay_iters (= max_iters)."""
    lr, warmup, min_lr = NANOGPT_CPU["learning_rate"], NANOGPT_CPU["warmup_iters"], NANOGPT_CPU["min_lr"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > max_iters:
        return min_lr
    ratio = (it - warmup) / (max_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def random_batch(data: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: batch_size windows at random starts, and the same shifted by one."""
    block = NANOGPT_CPU["block_size"]
    ix = torch.randint(len(data) - block, (NANOGPT_CPU["batch_size"],), generator=generator)
    return (torch.stack([data[i:i + block] for i in ix]), torch.stack([data[i + 1:i + 1 + block] for i in ix]))


class NanoRun:
    """nanoGPT's training loop, one iteration at a time: a random batch, forward, backward,
    clip, step (and loss.item() every iteration, as its CPU command logs every iteration)."""

    def __init__(self, train_ids: torch.Tensor, vocab_size: int, max_iters: int, fused: bool, seed: int = 1337):
        torch.manual_seed(seed)
        c = NANOGPT_CPU
        self.model = NanoGPT(vocab_size, c["block_size"], c["n_layer"], c["n_head"], c["n_embd"])
        self.optimizer = nano_optimizer(self.model, fused)
        self.data, self.max_iters, self.it = train_ids, max_iters, 0
        self.generator = torch.Generator().manual_seed(seed)

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = nano_lr(self.it, self.max_iters)
        x, y = random_batch(self.data, self.generator)
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), NANOGPT_CPU["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.it += 1
        return loss.item()


# ---------------------------------------------------------------------------------------
# minigpt at the same configuration
# ---------------------------------------------------------------------------------------

def minigpt_settings(iters: int, out: Path, seed: int = 1337) -> tuple[dict, dict]:
    c = NANOGPT_CPU
    settings = dict(
        QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-char", TOKENIZER="char", SEED=seed, LOG_EVERY=10**9,
        custom_params=dict(
            num_epochs=100, max_steps=iters, batch_size=c["batch_size"], learning_rate=c["learning_rate"],
            weight_decay=c["weight_decay"], beta1=c["beta1"], beta2=c["beta2"], grad_clip=c["grad_clip"],
            lr_schedule="cosine", warmup_steps=c["warmup_iters"], min_lr=c["min_lr"], sampling="random",
            max_length=c["block_size"], stride=c["block_size"], eval_freq=10**9, eval_iter=20,
            start_context="ROMEO:", precision="fp32",
            model_overrides=dict(context_length=c["block_size"], drop_rate=c["dropout"])))  # gpt-char: nanoGPT's model
    return settings, {"data": "tinyshakespeare", "out": str(out), "device": "cpu"}


class MinigptSteps:
    """minigpt's own training step (`train_step` over its DataLoader's batches), for the
    interleaved timing: what `train_loop` runs each iteration."""

    def __init__(self, train_ids: list[int], vocab_size: int, iters: int, seed: int = 1337):
        settings, _ = minigpt_settings(iters, Path("unused"))
        run = resolve_run_config(settings, {"data": "tinyshakespeare"})
        self.cfg = run.train
        torch.manual_seed(seed)
        self.model = GPTModel(replace(run.model, vocab_size=vocab_size)).train()
        self.optimizer = make_optimizer(self.model, self.cfg)
        loader = create_dataloader(train_ids, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                                   stride=self.cfg.stride, random_windows=True, seed=seed)
        self.loader, self.batches, self.setup = loader, iter(loader), StepSetup(torch.device("cpu"))
        self.iters, self.step_index = iters, 0

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(self.step_index, self.cfg, self.iters)
        try:
            batch = [next(self.batches)]
        except StopIteration:  # the next epoch, in its own order (as train_loop does)
            self.loader.sampler.set_epoch(self.loader.sampler.epoch + 1)
            self.batches = iter(self.loader)
            batch = [next(self.batches)]
        self.step_index += 1
        return train_step(self.model, self.optimizer, batch, self.setup, self.cfg.grad_clip).loss.item()


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

def scores(model: nn.Module, val_ids: list[int]) -> dict[str, float]:
    """The validation loss on every 64-token window and on nanoGPT's 20 fixed batches, scored as the
    race with the real nanoGPT scores them (bench_vs_nanogpt.py), with dropout off."""
    from bench_vs_nanogpt import every_window_loss, fixed_batches_loss

    ids = torch.tensor(val_ids)
    model.eval()
    result = dict(val=every_window_loss(model, ids), estimate=fixed_batches_loss(model, ids))
    model.train()
    return result


def interleaved_ms(runners: dict, rounds: int, block: int) -> dict[str, list[float]]:
    """ms/iteration of each runner over `rounds` blocks of `block` iterations, taking turns."""
    times = {name: [] for name in runners}
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            start = time.perf_counter()
            for _ in range(block):
                runners[name].step()
            times[name].append(1000 * (time.perf_counter() - start) / block)
    return times


def summary(runs: list[dict]) -> dict:
    """Means over seeds (one seed: that run)."""
    return {key: statistics.mean(r[key] for r in runs) for key in runs[0]}


def fallback_race(args) -> None:
    """The race against the re-implementation: losses over `args.seeds`, then the interleaved step times."""
    torch.set_num_threads(args.threads)

    text = read_text(corpus_path("tinyshakespeare"))
    tokenizer = CharTokenizer.from_text(text)  # nanoGPT's prepare.py: the sorted set of characters
    train_text, val_text = split_text(text, 0.9)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s); Tiny Shakespeare: "
          f"{len(text):,} characters, vocabulary {tokenizer.vocab_size}, train {len(train_ids):,} / "
          f"validation {len(val_ids):,} tokens; {args.iters} iterations of 12 x 64 tokens")

    results = {"minigpt": [], "nanoGPT re-implementation": []}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            settings, cli = minigpt_settings(args.iters, Path(tmp) / "run", seed)
            model, _, metrics, _ = pretrain(resolve_run_config(settings, cli))
            results["minigpt"].append(dict(
                **scores(model, val_ids),
                ms=1000 * metrics["train_time_s"] / metrics["steps"], params=model.num_parameters()))
        nano = NanoRun(torch.tensor(train_ids), tokenizer.vocab_size, args.iters, fused=False, seed=seed)
        started = time.perf_counter()
        for _ in range(args.iters):
            nano.step()
        seconds = time.perf_counter() - started
        results["nanoGPT re-implementation"].append(dict(
            **scores(nano.model, val_ids),
            ms=1000 * seconds / args.iters, params=sum(p.numel() for p in nano.model.parameters())))
    print("\nseed by seed (validation loss on every window / nanoGPT's 20-batch estimate):")
    for name, runs in results.items():
        print(f"  {name:<27} " + "  ".join(f"seed {seed}: {r['val']:.4f} / {r['estimate']:.4f}"
                                            for seed, r in zip(args.seeds, runs)))
    mini, nano_result = (summary(results[name]) for name in ("minigpt", "nanoGPT re-implementation"))

    runners = {"minigpt": MinigptSteps(train_ids, tokenizer.vocab_size, args.iters),
               "nanoGPT re-implementation": NanoRun(torch.tensor(train_ids), tokenizer.vocab_size, args.iters, False),
               "nanoGPT re-implementation + fused AdamW": NanoRun(torch.tensor(train_ids), tokenizer.vocab_size,
                                                                   args.iters, True)}
    interleaved_ms(runners, 1, 10)  # warm-up
    times = interleaved_ms(runners, ROUNDS, BLOCK)
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = times["nanoGPT re-implementation"]

    seeds = f" (mean of {len(args.seeds)} seeds)" if len(args.seeds) > 1 else ""
    print(f"\n{'model':<42} {'params':>8} {'val loss':>9} {'20-batch est.':>13} {'ms/iter (run)':>14} "
          f"{'ms/iter (interleaved)':>22} {'nanoGPT / this [range]':>24}")
    rows = [("minigpt", mini), ("nanoGPT re-implementation", nano_result),
            ("nanoGPT re-implementation + fused AdamW", None)]
    for name, result in rows:
        ratios = [r / t for r, t in zip(reference, times[name])]
        ratio = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        if result is None:
            print(f"{name:<42} {'':>8} {'':>9} {'':>13} {'':>14} {medians[name]:>22.1f} {ratio:>24}")
        else:
            print(f"{name:<42} {result['params']:>8,.0f} {result['val']:>9.4f} {result['estimate']:>13.4f} "
                  f"{result['ms']:>14.1f} {medians[name]:>22.1f} {ratio:>24}")
    print(f"\nlosses and run times{seeds}. 'val loss' scores every 64-token window of the "
          f"validation split; '20-batch est.' is nanoGPT's estimate, the same 20 batches for both models. "
          f"Interleaved: {ROUNDS} blocks of {BLOCK} iterations each, taking turns; the ratio is "
          f"per block, median [range].")
