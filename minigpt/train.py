"""Pretraining (chapter 5): the loss, its evaluation, the training loop, checkpoints that
resume exactly, and `pretrain`, the whole pipeline `python main.py` runs.

The loss is the cross-entropy of the next token: for every position the model scores the
whole vocabulary, and we pay -log p(correct next token), averaged over all positions.
A model that knows nothing pays ln(vocab_size) (10.82 nats for GPT-2's 50,257 tokens);
perplexity = exp(loss) reads as "as unsure as a uniform choice among this many tokens".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from minigpt.config import (MODEL_PRESETS, TOKENIZERS, ConfigError, GPTConfig, RunConfig, TrainConfig, did_you_mean,
                            model_config)
from minigpt.data import (IGNORE_INDEX, TokenFile, corpus_characters, corpus_files, corpus_path, corpus_sample,
                          create_dataloader, is_large_corpus, read_text, read_token_files, split_text,
                          token_folder, write_token_files)
from minigpt.generation import generate_text, text_to_token_ids
from minigpt.memory import (MIB, Trial, can_measure_peak, check_fits, estimate_training_memory,
                            find_micro_batch_size, free_memory_bytes, process_memory_bytes, step_trial)
from minigpt.model import GPTModel
from minigpt.plot import plot_losses
from minigpt.tokenizer import BPETokenizer, get_tokenizer, tokenizer_from_spec

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the weights at the lowest validation loss of the periodic evaluations
TOKENIZER_NAME = "tokenizer.bpe"
CHECKPOINT_FORMAT = "minigpt-checkpoint-v1"


# ---------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------

def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch; inputs and targets are (B, T)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, V)
    # cross_entropy wants (N, V) scores and (N,) classes: fold batch and time together.
    loss = F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    if model.training:  # a mixture of experts trains its router with load-balancing terms too
        aux = getattr(unwrap(model), "aux_loss", None)
        if aux is not None:
            loss = loss + aux
    return loss


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP's and torch.compile's wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@torch.no_grad()
def calc_loss_loader(data_loader: DataLoader, model: torch.nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Mean loss per token over the first `num_batches` batches (all of them if None).

    Targets of IGNORE_INDEX (padding, masked prompts: chapter 7) are not predictions and do not count.
    """
    total_loss, total_tokens = 0.0, 0
    for i, (inputs, targets) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        loss = calc_loss_batch(inputs, targets, model, device)
        scored = int((targets != IGNORE_INDEX).sum())  # weight by tokens: a short last batch counts less
        total_loss += loss.item() * scored
        total_tokens += scored
    if total_tokens == 0:
        raise ValueError("the data loader yielded no batches to evaluate.")
    return total_loss / total_tokens


def evaluate_model(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                   device: torch.device | str, eval_iter: int | None) -> tuple[float, float]:
    """Train and validation loss with dropout off, over `eval_iter` batches of each."""
    was_training = model.training
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train(was_training)
    return train_loss, val_loss


# ---------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule
# ---------------------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, decaying only the matrices: biases and norm gains stay free of weight decay.

    The fused implementation updates every tensor in one kernel per step instead of a dozen
    small ones per tensor: the same arithmetic, 4-7x faster on a CPU (chapter 9).
    """
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused_adamw_available(params))


def fused_adamw_available(params: list[torch.Tensor]) -> bool:
    """Fused AdamW needs floating-point weights on a device that has its kernel (CPU, CUDA, MPS)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda", "mps")
                                for p in params)


def learning_rate_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warm-up, then constant
    or a cosine decay to `min_lr` (default 10% of the peak) at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    min_lr = 0.1 * cfg.learning_rate if cfg.min_lr is None else cfg.min_lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (cfg.learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------
# Speed and scale (chapter 9): mixed precision, compile, several processes
# ---------------------------------------------------------------------------------------

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" becomes bf16 on CUDA GPUs that have it (Ampere and later), fp16 on older ones,
    and fp32 on CPUs and Apple GPUs, where half precision rarely pays."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bf16" if bf16_gpu else "fp16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not bf16_gpu:
        raise ConfigError("precision 'bf16': this GPU has no bfloat16 (it came with Ampere); set "
                          "precision to 'fp16' (trained with a gradient scaler) or 'fp32'.")
    return name


def precision_reason(requested: str, device: torch.device) -> str:
    """Why "auto" chose fp32 on an Apple GPU, for the header (empty elsewhere)."""
    if requested != "auto" or device.type != "mps":
        return ""
    return (" (auto on Apple's MPS: mixed precision there is recent in PyTorch and covers fewer operations "
            "than on CUDA, so minigpt trains in fp32; --precision fp16 or bf16 tries it)")


def autocast(precision: str, device: torch.device):
    """Run the forward pass in mixed precision: matrix products in bf16/fp16, while softmax,
    norms and the loss stay in fp32 (PyTorch's autocast keeps its list). fp32: no change."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def compile_model(model: torch.nn.Module, wanted: bool, device: torch.device) -> tuple[torch.nn.Module, str]:
    """`torch.compile(model)` where it works, else the model as it is; and a note saying which."""
    if not wanted:
        return model, "off"
    if sys.platform == "win32":
        return model, "off (torch.compile is not supported on Windows; training runs eagerly)"
    if device.type == "mps":
        return model, "off (torch.compile does not support Apple's MPS yet; training runs eagerly)"
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return model, "off (torch.compile on a CPU needs a C compiler, and none is on PATH)"
    return torch.compile(model), "on"


@dataclass(frozen=True)
class Distributed:
    """Which process this is when `torchrun` starts several (rank 0 of 1 otherwise)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def start_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group `torchrun` set up (its RANK / LOCAL_RANK / WORLD_SIZE variables).

    NCCL links GPUs, one per process; gloo links CPU processes. Without torchrun: one process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    if device.type == "mps":
        raise ConfigError("torchrun with several processes does not work on Apple's MPS; "
                          "add --device cpu, or run one process (python main.py).")
    info = Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world_size)
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started {world_size} processes per machine but this one has "
                              f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node={torch.cuda.device_count()}.")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    # A generous timeout: rank 0 may tokenize a large corpus while the others wait.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return info, device


def process_batch_size(cfg: TrainConfig, world: Distributed) -> int:
    """Windows of each optimizer step that one process computes: the batch split evenly."""
    if cfg.batch_size % world.world_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) does not split evenly between {world.world_size} "
                          f"processes; make it a multiple of {world.world_size}.")
    return cfg.batch_size // world.world_size


def micro_batch_size(cfg: TrainConfig, world: Distributed) -> int:
    """Windows per forward/backward in each process: the setting, or the batch split evenly."""
    if cfg.micro_batch_size == "auto":
        raise ValueError("micro_batch_size 'auto' must be settled first (fit_micro_batch).")
    if cfg.micro_batch_size is not None:
        return cfg.micro_batch_size
    return process_batch_size(cfg, world)


def accumulation_steps(cfg: TrainConfig, world: Distributed) -> int:
    """Micro-batches each process adds up per optimizer step."""
    return cfg.batch_size // (micro_batch_size(cfg, world) * world.world_size)


AUTO_HEADROOM = 0.9  # --batch-size auto leaves a tenth of the free memory for what a trial step does not show


def fit_micro_batch(model: torch.nn.Module, cfg: TrainConfig, world: Distributed, device: torch.device,
                    precision: str, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                    num_tokens: int, limit: int | None = None) -> tuple[TrainConfig, str]:
    """Make sure training fits the device before it starts; returns the settings and a note.

    With a micro-batch size (or none, the whole batch), the estimate of chapter 9 is checked
    against the free memory, and a run that cannot fit stops here with the estimate and what
    to change. With micro_batch_size "auto", the largest divisor of the per-process batch whose
    forward and backward pass (on `make_batch(size)`, with AdamW's moments set aside) fits under
    `limit` (default: 90% of the free memory) is measured by binary search; the batch per step is
    kept by accumulating micro-batches. The trials draw no random numbers the run will see.
    """
    if cfg.micro_batch_size != "auto":
        micro = micro_batch_size(cfg, world)
        estimate = estimate_training_memory(model, micro, num_tokens, precision,
                                            accumulating=micro < cfg.batch_size // world.world_size)
        free = check_fits(estimate, device, cfg.batch_size)
        room = f"; {free / MIB:,.0f} MiB free" if free is not None else ""
        held = process_memory_bytes() if device.type == "cpu" else None
        if held is not None:  # so that the summary's peak, the whole process's, can be read against it
            room += f"; the process holds {(held - estimate.weights) / MIB:,.0f} MiB besides (Python, PyTorch, data)"
        return cfg, (f"about {estimate.total / MIB:,.0f} MiB estimated: states {estimate.states / MIB:,.0f}, "
                     f"{estimate.per_sequence / MIB:,.1f} per sequence of {num_tokens} tokens{room}")
    per_process = process_batch_size(cfg, world)
    free, _ = free_memory_bytes(device)
    if limit is None and free is not None:
        limit = int(AUTO_HEADROOM * free)
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    how = "measured"
    if device.type == "mps" or can_measure_peak(device):
        def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return calc_loss_batch(inputs, targets, model, device)

        try_size = step_trial(model, make_batch, loss_fn, device, lambda: autocast(precision, device),
                              limit, per_process, reserve=8 * trainable)
    else:  # no way to read a peak here (a CPU off Linux): the estimate decides
        how = "estimated (peak memory cannot be measured on this system)"

        def try_size(size: int) -> Trial:
            need = estimate_training_memory(model, size, num_tokens, precision, accumulating=size < per_process)
            need = need.total - need.weights
            return Trial(size, need, limit is None or need <= limit)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        micro, trials = find_micro_batch_size(per_process, try_size)
    if world.active:  # every process must accumulate the same number of micro-batches
        chosen = torch.tensor(micro, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(chosen, op=dist.ReduceOp.MIN)
        micro = int(chosen.item())
    shown = ", ".join(f"{t.micro_batch} {'fits' if t.fits else 'no'}"
                      + (f" ({t.peak / MIB:,.0f} MiB)" if t.peak is not None else "" if t.fits else " (out of memory)")
                      for t in trials)
    cap = f" under {limit / MIB:,.0f} MiB" if limit is not None else ""
    note = (f"auto: micro-batch {micro} of {per_process} ({per_process // micro} accumulation step"
            f"{'s' if per_process // micro > 1 else ''}), {how}{cap}: {shown}")
    return replace(cfg, micro_batch_size=micro), note


def agree(loss: torch.Tensor, stop: bool, world: Distributed, tokens: int = 0) -> tuple[float, bool, int]:
    """The step's loss averaged over processes, whether any process was asked to stop (all
    must stop after the same step, or the others would wait forever for it), and the tokens
    all processes read in the step."""
    if not world.active:
        return loss.item(), stop, tokens
    # float64: a token count past 2**24 would lose its last digits in float32.
    values = torch.stack([loss.detach().double(), torch.tensor(float(stop), dtype=torch.float64, device=loss.device),
                          torch.tensor(float(tokens), dtype=torch.float64, device=loss.device)])
    dist.all_reduce(values)
    return values[0].item() / world.world_size, values[1].item() > 0, int(values[2].item())


# Dense bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, for the MFU estimate.
# Matched by substring in this order (so "H100 PCIe" before "H100"); other GPUs give no MFU.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                   ("L40S", 362.1), ("V100", 125.0))


def peak_tflops(device: torch.device, cfg: TrainConfig) -> float | None:
    """The device's peak for MFU: `peak_tflops` if set, else a known GPU's bf16 peak; None if unknown."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops
    return None


def peak_memory_mib(device: torch.device) -> tuple[float | None, str]:
    """The most memory training held: CUDA's allocator peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA tensors, peak"
    try:
        import resource
    except ImportError:  # Windows
        return None, "not measured on this system"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything that changes while training and must survive a stop and a resume."""

    epoch: int = 0            # epochs completed
    step_in_epoch: int = 0    # optimizer steps done in the current epoch
    global_step: int = 0      # optimizer steps done
    tokens_seen: int = 0      # training tokens consumed (all processes together)
    train_time_s: float = 0.0 # wall time inside training steps (excludes evaluation)
    elapsed_s: float = 0.0    # wall time of the whole loop
    eval_steps: list[int] = field(default_factory=list)
    eval_tokens_seen: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Loaders:
    train: DataLoader        # shuffled (or random windows): the batches the optimizer sees
    train_eval: DataLoader   # windows of the training split in fixed order, to measure the train loss
    val: DataLoader


@dataclass
class StepSetup:
    """How a step is computed; none of it changes what is computed (up to rounding)."""

    device: torch.device
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only: scales the loss so small gradients survive
    world: Distributed = field(default_factory=Distributed)
    peak_tflops: float | None = None
    flops_per_token: float = 0.0

    def tflops_per_device(self, tokens_per_sec: float) -> float:
        """Useful compute per device: FLOPs per token x tokens per second, shared by the processes."""
        return self.flops_per_token * tokens_per_sec / self.world.world_size / 1e12


class StopRequest:
    """Ctrl-C (or SIGTERM) during training asks the loop to finish its step, save and stop.

    A second Ctrl-C interrupts at once, as usual. SIGTERM is what `torchrun` and job
    schedulers send before they kill a process, so it saves too. Outside the main thread
    (where Python cannot install signal handlers) this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, self._previous[signum])  # a second signal behaves as usual
        what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        tqdm.write(f"\n{what}: stopping after this step and saving a resumable checkpoint "
                   f"({what} again quits at once).")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous = {}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[tuple[torch.Tensor, torch.Tensor]], setup: StepSetup,
               grad_clip: float | None = None) -> torch.Tensor:
    """One optimizer step over one batch given as micro-batches; returns the batch's mean loss.

    Gradient accumulation: the gradients of k micro-batches, each loss divided by k, add up
    to the gradient of their mean, which is the gradient of the whole batch (every
    micro-batch has the same number of tokens). Under DDP the processes average their
    gradients during the last backward; the earlier ones skip that exchange (`no_sync`).
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=setup.device)
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        exchange = contextlib.nullcontext() if last or not setup.world.active else model.no_sync()
        with exchange:
            with autocast(setup.precision, setup.device):
                loss = calc_loss_batch(inputs, targets, model, setup.device) / len(micro_batches)
            (setup.scaler.scale(loss) if setup.scaler else loss).backward()
        total += loss.detach()
    if setup.scaler:
        setup.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if setup.scaler:
        setup.scaler.step(optimizer)  # skipped if a gradient overflowed; the scale then shrinks
        setup.scaler.update()
    else:
        optimizer.step()
    return total


def train_loop(model: GPTModel, optimizer: torch.optim.Optimizer, loaders: Loaders,
               device: torch.device, cfg: TrainConfig, state: TrainState, total_steps: int,
               tokenizer, log_every: int = 10, stop: StopRequest | None = None,
               on_epoch_end: Callable[[], None] | None = None, setup: StepSetup | None = None,
               train_model: torch.nn.Module | None = None, eval_batches: int | None = None,
               epoch_note: Callable[[], dict[str, Any]] | None = None,
               on_best: Callable[[], None] | None = None,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> bool:
    """Train from `state` until `total_steps` or the last epoch; True if it got there.

    The loop can stop after any step (Ctrl-C) and continue later from the saved state:
    the data order depends only on (seed, epoch), and the learning rate only on the step.
    `on_epoch_end` runs after every epoch but the last (pretrain saves a checkpoint there).
    `train_model` is what the steps run (the model compiled and/or wrapped for DDP; by
    default `model` itself); evaluation and samples use `model`'s weights, which are the same.
    Evaluations read `eval_batches` batches of each split (default `cfg.eval_iter`); after one
    that gives the lowest validation loss so far, `on_best()` runs (runs keep those weights).
    After each epoch, `epoch_note()` says how the model does ({"text": ..., any numbers}); by
    default it is a sample continuing `cfg.start_context`. Tokens are counted as read,
    padding included (fine-tuning batches are padded to their longest sequence).
    `on_event(event)` receives what each log line and sample shows, as a dict (the studio's
    live chart): {"type": "step", step, epoch, batch_loss, lr, tokens_per_sec, tokens_seen,
    and train_loss and val_loss after an evaluation} and {"type": "sample", epoch, step, text}.
    """
    stop = stop or StopRequest()
    setup = setup or StepSetup(device)
    train_model = train_model or model
    world = setup.world
    model.train()
    sampler = loaders.train.sampler
    accumulation = accumulation_steps(cfg, world)
    loop_start = time.perf_counter()
    elapsed_before = state.elapsed_s
    last_log_step, last_log_time, last_log_tokens = state.global_step, state.train_time_s, state.tokens_seen
    stopping = False
    while state.epoch < cfg.num_epochs and state.global_step < total_steps:
        sampler.set_epoch(state.epoch, start=state.step_in_epoch * cfg.batch_size)
        steps_this_epoch = sampler.steps_per_epoch
        micro_batches = iter(loaders.train)
        bar = tqdm(total=steps_this_epoch, initial=state.step_in_epoch, disable=not world.is_main,
                   desc=f"epoch {state.epoch + 1}/{cfg.num_epochs}", unit="step", leave=False,
                   dynamic_ncols=True)
        while state.step_in_epoch < steps_this_epoch:
            step_start = time.perf_counter()
            lr = learning_rate_at(state.global_step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [next(micro_batches) for _ in range(accumulation)]
            loss = train_step(train_model, optimizer, batch, setup, cfg.grad_clip)
            # .item() waits for the step to finish, so the timing is honest.
            batch_loss, stopping, step_tokens = agree(loss, stop.requested, world,
                                                      sum(inputs.numel() for inputs, _ in batch))
            if not math.isfinite(batch_loss):
                raise ConfigError(
                    f"the loss became {batch_loss} at step {state.global_step + 1} (learning rate "
                    f"{lr:.2e}); training diverged. Start a new run with a lower learning_rate "
                    f"(now {cfg.learning_rate}) or with grad_clip set (e.g. 1.0).")
            state.train_time_s += time.perf_counter() - step_start
            state.global_step += 1
            state.step_in_epoch += 1
            state.tokens_seen += step_tokens
            state.batch_losses.append(batch_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.3f}")

            evaluate_now = state.global_step % cfg.eval_freq == 0
            if evaluate_now:
                with autocast(setup.precision, device):
                    train_loss, val_loss = evaluate_model(model, loaders.train_eval, loaders.val,
                                                          device, eval_batches or cfg.eval_iter)
                state.eval_steps.append(state.global_step)
                state.eval_tokens_seen.append(state.tokens_seen)
                improved = not state.val_losses or val_loss < min(state.val_losses)
                state.train_losses.append(train_loss)
                state.val_losses.append(val_loss)
                if improved and on_best is not None:
                    on_best()
            if (evaluate_now or state.global_step % log_every == 0) and world.is_main:
                steps = state.global_step - last_log_step
                seconds = max(state.train_time_s - last_log_time, 1e-9)
                tokens_per_sec = (state.tokens_seen - last_log_tokens) / seconds
                recent = state.batch_losses[-steps:] if steps else [batch_loss]
                line = (f"epoch {state.epoch + 1} step {state.global_step:>6,}  "
                        f"batch loss {sum(recent) / len(recent):.3f}  lr {lr:.2e}  "
                        f"{tokens_per_sec:,.0f} tok/s")
                if setup.peak_tflops:
                    tflops = setup.tflops_per_device(tokens_per_sec)
                    line += f"  MFU {100 * tflops / setup.peak_tflops:.1f}%"
                depth = getattr(model, "depth", None)
                if depth is not None:  # adaptive depth: blocks per token in the last training batch
                    line += f"  depth {depth.mean().item():.2f}/{model.cfg.n_layers}"
                if evaluate_now:
                    line += f"  | train loss {train_loss:.3f}  val loss {val_loss:.3f}"
                tqdm.write(line)
                if on_event is not None:
                    event = {"type": "step", "step": state.global_step, "epoch": state.epoch + 1,
                             "batch_loss": sum(recent) / len(recent), "lr": lr, "tokens_per_sec": tokens_per_sec,
                             "tokens_seen": state.tokens_seen}
                    on_event(event | ({"train_loss": train_loss, "val_loss": val_loss} if evaluate_now else {}))
                last_log_step, last_log_time, last_log_tokens = state.global_step, state.train_time_s, state.tokens_seen
            if stopping or state.global_step >= total_steps:
                break
        bar.close()
        if state.step_in_epoch == steps_this_epoch:  # the epoch ran to its end
            state.epoch += 1
            state.step_in_epoch = 0
            if epoch_note is None:
                note = {"text": generate_text(model, tokenizer, cfg.start_context, max_new_tokens=50)}
                line = f"sample after epoch {state.epoch}: {note['text']!r}"
            else:
                note = epoch_note()
                line = f"after epoch {state.epoch}: {note['text']}"
            state.samples.append({"epoch": state.epoch, "step": state.global_step, **note})
            if world.is_main:
                tqdm.write(line)
                if on_event is not None:
                    on_event({"type": "sample", "epoch": state.epoch, "step": state.global_step,
                              "text": note["text"]})
            state.elapsed_s = elapsed_before + time.perf_counter() - loop_start
            more_to_come = state.epoch < cfg.num_epochs and state.global_step < total_steps
            if on_epoch_end is not None and more_to_come:
                on_epoch_end()
        if stopping:
            break
    state.elapsed_s = elapsed_before + time.perf_counter() - loop_start
    return state.epoch >= cfg.num_epochs or state.global_step >= total_steps


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, model: GPTModel, optimizer: torch.optim.Optimizer,
                    state: TrainState, run: RunConfig, extra: dict[str, Any] | None = None,
                    rng: dict[str, Any] | None = None, scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write everything needed to rebuild the model and to continue training exactly.

    Written to a temporary file and renamed, so an interruption never leaves a broken file.
    `rng` defaults to this process's random state (see `rng_states` for several processes).
    `extra` holds what else rebuilding needs: the tokenizer's spec, the data's fingerprint, ...
    """
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "run": run.to_dict(),
        "tokenizer_spec": None,
        "data_sha256": None,
        **(extra or {}),  # e.g. a classifier's class names (chapter 7)
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "rng": rng or rng_states(Distributed()),
        "scaler": scaler.state_dict() if scaler else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def save_weights(path: str | Path, model: GPTModel, run: RunConfig, extra: dict[str, Any] | None = None) -> Path:
    """A checkpoint of the weights alone (no optimizer, no random state): what `load_model` needs to
    generate, evaluate or fine-tune from. A run keeps its best weights this way, as best.pt."""
    path = Path(path)
    checkpoint = {"format": CHECKPOINT_FORMAT, "run": run.to_dict(), "tokenizer_spec": None, "data_sha256": None,
                  **(extra or {}), "model": model.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def rng_states(world: Distributed) -> dict[str, Any]:
    """The random state of every process (dropout draws from it), gathered on all of them."""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not world.active:
        return {**mine, "ranks": [mine]}
    everyone: list[Any] = [None] * world.world_size
    dist.all_gather_object(everyone, mine)
    return {**everyone[0], "ranks": everyone}


def restore_rng(rng: dict[str, Any], world: Distributed) -> None:
    """Put back this process's random state from a checkpoint (its own rank's, when saved)."""
    ranks = rng.get("ranks") or [rng]
    mine = ranks[world.rank] if len(ranks) == world.world_size else None
    if mine is None:  # another number of processes: dropout streams start afresh, all else is exact
        if world.is_main:
            tqdm.write(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
                       f"{world.world_size}; the data order and weights continue exactly, dropout's "
                       "random draws do not.")
        return
    torch.set_rng_state(mine["torch"])
    if torch.cuda.is_available() and mine["cuda"]:
        torch.cuda.set_rng_state_all(mine["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file, or the one inside a run directory, safely (tensors and plain data only)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; point --resume / --checkpoint at a run "
                          "directory that holds checkpoint.pt (e.g. runs/pretrain-quick).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"could not read the checkpoint {path}: it is corrupt or not a minigpt "
                          f"checkpoint ({type(err).__name__}: {err}). Use another run directory, "
                          "or delete it and train again.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a minigpt checkpoint (format "
                          f"{checkpoint.get('format') if isinstance(checkpoint, dict) else '?'!r}).")
    return checkpoint


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPTModel, Any, dict[str, Any]]:
    """The trained model, its tokenizer and the checkpoint's run settings, ready to generate.

    A fine-tuned run (chapter 7) comes back as it was trained (with its classification head),
    its LoRA adapters merged into the weights. The run settings then also hold "labels".
    """
    checkpoint = load_checkpoint(path)
    run = RunConfig.from_dict(checkpoint["run"])
    if run.finetune is not None:
        from minigpt.finetune import build_model, merge_and_unload

        model = build_model(run, checkpoint.get("labels"))
        model.load_state_dict(checkpoint["model"])
        model = merge_and_unload(model)
        saved = {**checkpoint["run"], "labels": checkpoint.get("labels")}
    else:
        model = GPTModel(run.model)
        if run.task == "reward":  # a reward model (chapter 8): one score per position
            from minigpt.rlhf import add_reward_head

            add_reward_head(model)
        model.load_state_dict(checkpoint["model"])
        saved = checkpoint["run"]
    model.to(device).eval()
    return model, tokenizer_from_spec(checkpoint["tokenizer_spec"]), saved


# ---------------------------------------------------------------------------------------
# The pipeline behind `python main.py --task pretrain`
# ---------------------------------------------------------------------------------------

def pick_device(name: str | None) -> torch.device:
    """The device asked for, or the best one available: CUDA, then Apple's MPS, then CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE is 'cuda' but PyTorch sees no CUDA GPU; set DEVICE = None "
                          "(pick automatically) or 'cpu', or install a CUDA build of PyTorch.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE is 'mps' but Apple's Metal backend is not available here; "
                          "set DEVICE = None (pick automatically) or 'cpu'.")
    return torch.device(name)


def choose_run_dir(run: RunConfig) -> Path:
    """Where this run writes. A new run never overwrites an earlier one."""
    if run.resume:
        path = Path(run.resume)
        return path.parent if path.is_file() else path
    if run.out:
        out = Path(run.out)
        if (out / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out}, "
                              "or choose another --out directory.")
        return out
    base = Path("runs") / f"{run.task}-{run.mode}"
    out, n = base, 2
    while (out / CHECKPOINT_NAME).exists():  # keep earlier default runs: -2, -3, ...
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


@dataclass
class Corpus:
    """The training data, tokenized: ids in memory for a small text, token files for a large one."""

    tokenizer: Any
    train_ids: list[int] | TokenFile
    val_ids: list[int] | TokenFile
    fingerprint: str        # identifies the data, so a resumed run can check it is the same
    description: str        # the header's "data" line
    tokenizer_note: str     # the header's "tokenizer" line
    on_disk: bool           # token files (random windows by default) rather than a list


def prepare_corpus(run: RunConfig, checkpoint: dict[str, Any] | None, world: Distributed) -> Corpus:
    """Read and tokenize `run.data`, building the tokenizer first unless a resumed run brings its own."""
    path = corpus_path(run.data)
    if is_large_corpus(path):
        return _prepare_token_files(run, path, checkpoint, world)
    text = read_text(path)
    fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
    train_text, val_text = split_text(text, train_ratio=0.9)
    started = time.perf_counter()
    if checkpoint is not None:
        tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
    else:
        # A trained BPE learns from the training split only, so validation text stays unseen;
        # a character vocabulary needs every character of both splits to encode them.
        tokenizer = _build_tokenizer(run, train_text if run.tokenizer == "train" else text)
    note = describe_tokenizer(tokenizer, run, time.perf_counter() - started, resumed=checkpoint is not None)
    # "<|endoftext|>" written in the corpus separates documents: encode it as its token.
    train_ids = tokenizer.encode(train_text, allowed_special="all")
    val_ids = tokenizer.encode(val_text, allowed_special="all")
    description = (f"{path.name}: {len(text):,} characters, {len(train_ids) + len(val_ids):,} tokens "
                   f"({tokenizer.name}); train {len(train_ids):,} / validation {len(val_ids):,} tokens")
    return Corpus(tokenizer, train_ids, val_ids, fingerprint, description, note, on_disk=False)


# A BPE trained for a large corpus learns from its first this many characters.
BPE_SAMPLE_CHARS = 10_000_000
# The final evaluation of a token-file corpus reads this many batches (of batch_size windows) of each split.
FINAL_EVAL_BATCHES = 200


def _prepare_token_files(run: RunConfig, path: Path, checkpoint: dict[str, Any] | None,
                         world: Distributed) -> Corpus:
    """Tokenize a large corpus once into token files (rank 0 writes, the others wait), or reuse them."""
    files = corpus_files(path)
    request = run.tokenizer if run.tokenizer in TOKENIZERS else str(Path(run.tokenizer).resolve())
    folder = token_folder(files, f"{request}-{run.bpe_vocab_size}" if request == "train" else request)
    started = time.perf_counter()
    reused = read_token_files(folder) is not None
    if world.is_main and not reused:
        if checkpoint is not None:
            tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
        elif run.tokenizer == "char":
            tokenizer = _build_tokenizer(run, corpus_characters(files))
        else:
            tokenizer = _build_tokenizer(run, corpus_sample(files, BPE_SAMPLE_CHARS))
        write_token_files(files, tokenizer, folder)
    if world.active:
        dist.barrier()
    train_ids, val_ids, meta = read_token_files(folder)
    tokenizer = tokenizer_from_spec(meta["tokenizer_spec"])
    seconds = time.perf_counter() - started
    note = describe_tokenizer(tokenizer, run, 0.0, resumed=checkpoint is not None)
    if run.tokenizer == "train" and checkpoint is None:
        note += f" (learned from the corpus's first {BPE_SAMPLE_CHARS:,} characters)"
    listing = [(str(f.resolve()), f.stat().st_size) for f in files]
    fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    how = f"reused from {folder}" if reused else f"written to {folder} in {seconds:.1f} s"
    description = (f"{path.name}: {len(files):,} file(s), {meta['bytes'] / 2**20:,.1f} MiB, "
                   f"{meta['train_tokens'] + meta['val_tokens']:,} tokens ({tokenizer.name}); train "
                   f"{meta['train_tokens']:,} / validation {meta['val_tokens']:,} tokens; token files {how}")
    return Corpus(tokenizer, train_ids, val_ids, fingerprint, description, note, on_disk=True)


def _build_tokenizer(run: RunConfig, text: str):
    try:
        return get_tokenizer(run.tokenizer, text=text, vocab_size=run.bpe_vocab_size)
    except ConfigError as err:
        if run.tokenizer != "train":
            raise
        raise ConfigError(f"training a BPE of BPE_VOCAB_SIZE (or --vocab-size) = {run.bpe_vocab_size} "
                          f"tokens on the training split: {err}") from None


def pretrain(run: RunConfig, stop: StopRequest | None = None,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    """Train a GPT as `run` says, writing the run directory; returns (model, tokenizer, metrics, dir).

    Started by `torchrun --nproc_per_node=N`, it is one of N data-parallel processes: each
    trains on its share of every batch, and only rank 0 prints and writes files.
    """
    checkpoint = load_checkpoint(run.resume) if run.resume else None
    world, device = start_distributed(pick_device(run.device))
    try:
        return _pretrain(run, checkpoint, world, device, stop, on_event)
    finally:
        if world.active:
            dist.destroy_process_group()


def _pretrain(run: RunConfig, checkpoint: dict[str, Any] | None, world: Distributed, device: torch.device,
              stop: StopRequest | None, on_event: Callable[[dict[str, Any]], None] | None = None
              ) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    run_dir = choose_run_dir(run)
    torch.manual_seed(run.seed)
    corpus = prepare_corpus(run, checkpoint, world)
    if checkpoint is not None and checkpoint["data_sha256"] != corpus.fingerprint:
        raise ConfigError(f"the training text differs from the one the run in {run_dir} started "
                          "with; resume with the same --data, or start a new run.")
    tokenizer = corpus.tokenizer
    run = replace(run, model=replace(run.model, vocab_size=tokenizer.vocab_size))
    cfg = run.train
    try:  # the per-epoch sample must not fail after an epoch of training: check its prompt now
        text_to_token_ids(cfg.start_context, tokenizer)
    except ConfigError as err:
        raise ConfigError(f"start_context {cfg.start_context!r} cannot be encoded: {err} "
                          "Or set custom_params['start_context'] to text from the corpus.") from None

    model = GPTModel(run.model).to(device)
    optimizer = make_optimizer(model, cfg)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainState()

    def random_windows_of(size: int) -> tuple[torch.Tensor, torch.Tensor]:  # a micro-batch's shape, for the memory trials
        ids = torch.randint(tokenizer.vocab_size, (size, cfg.max_length), device=device)
        return ids, ids

    cfg, memory_note = fit_micro_batch(model, cfg, world, device, precision, random_windows_of, cfg.max_length)
    run = replace(run, train=cfg)

    random_windows = cfg.sampling == "random" or (cfg.sampling == "auto" and corpus.on_disk)
    shape = dict(max_length=cfg.max_length, stride=cfg.stride, num_workers=cfg.num_workers, seed=run.seed)
    micro = micro_batch_size(cfg, world)
    # Evaluations read eval_iter batches of batch_size windows, in micro-batches (less memory).
    per_batch = cfg.batch_size // micro
    eval_batches = cfg.eval_iter * per_batch
    evaluation = dict(batch_size=micro, shuffle=False, drop_last=False, **shape)
    loaders = Loaders(
        train=create_dataloader(corpus.train_ids, batch_size=cfg.batch_size, micro_batch_size=micro,
                                rank=world.rank, world_size=world.world_size, random_windows=random_windows,
                                shuffle=True, drop_last=True, name="the training split (90%)", **shape),
        train_eval=create_dataloader(corpus.train_ids, name="the training split", **evaluation),
        val=create_dataloader(corpus.val_ids, name="the validation split (10%)", **evaluation))
    # A token file may hold billions of tokens: the final evaluation then reads a fixed sample.
    final_eval_batches = max(cfg.eval_iter, FINAL_EVAL_BATCHES) * per_batch if corpus.on_disk else None
    steps_per_epoch = loaders.train.sampler.steps_per_epoch
    total_steps = steps_per_epoch * cfg.num_epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = TrainState(**checkpoint["state"])
        restore_rng(checkpoint["rng"], world)
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if state.epoch >= cfg.num_epochs or state.global_step >= total_steps:
            raise ConfigError(f"the run in {run_dir} already finished {state.global_step} steps "
                              f"({state.epoch} epochs); raise --epochs (or --max-steps, if it set "
                              "one) to train it further.")
    elif world.active:
        torch.manual_seed(run.seed + world.rank)  # each process its own dropout draws
    if device.type == "cuda":
        # TF32: fp32 matrix products on tensor cores with a 10-bit mantissa, several times faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fast_model, compile_note = compile_model(model, cfg.compile, device)
    train_model = fast_model
    if world.active:
        train_model = torch.nn.parallel.DistributedDataParallel(
            fast_model, device_ids=[device.index] if device.type == "cuda" else None)
    setup = StepSetup(device, precision, scaler, world, peak_tflops(device, cfg),
                      model.flops_per_token(cfg.max_length))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(tokenizer, BPETokenizer) and tokenizer.source != "gpt2":
            tokenizer.save(run_dir / TOKENIZER_NAME)  # readable, and reusable: TOKENIZER = "<run>/tokenizer.bpe"
        print_header(run, device, model, tokenizer, corpus, steps_per_epoch, total_steps, run_dir, state,
                     setup, compile_note, fused=optimizer.defaults.get("fused", False),
                     random_windows=random_windows, final_eval_batches=final_eval_batches,
                     memory_note=memory_note)
        if on_event is not None:
            on_event({"type": "start", "run_dir": str(run_dir), "total_steps": total_steps,
                      "steps_per_epoch": steps_per_epoch, "step": state.global_step,
                      "parameters": model.num_parameters(), "memory": memory_note})
    extra = {"tokenizer_spec": tokenizer.spec(), "data_sha256": corpus.fingerprint}

    def save(completed: bool, final: tuple[float, float] | None = None) -> dict[str, Any]:
        rng = rng_states(world)  # every process takes part in gathering the random states
        metrics = make_metrics(state, model, device, completed, final, run, setup, compile_note)
        if world.is_main:
            save_checkpoint(run_dir / CHECKPOINT_NAME, model, optimizer, state, run, extra, rng, scaler)
            write_run_files(run_dir, run, metrics, extra, len(corpus.train_ids), len(corpus.val_ids))
        return metrics

    def save_best() -> None:
        if world.is_main:
            save_weights(run_dir / BEST_NAME, model, run, extra)

    with (stop or StopRequest()) as stop:
        completed = train_loop(model, optimizer, loaders, device, cfg, state, total_steps, tokenizer,
                               log_every=run.log_every, stop=stop, on_epoch_end=lambda: save(completed=False),
                               setup=setup, train_model=train_model, eval_batches=eval_batches,
                               on_best=save_best, on_event=on_event if world.is_main else None)
    final = None
    if completed:  # measure the finished model on every window of both splits (a sample of a token file's)
        with autocast(precision, device):
            final = evaluate_model(model, loaders.train_eval, loaders.val, device, final_eval_batches)
    metrics = save(completed, final)
    if world.is_main:
        print_summary(metrics, run_dir, completed)
    return model, tokenizer, metrics, run_dir


def train_model(texts: list[str] | None = None, data: str | None = None, model: str = "gpt-mini",
                epochs: int = 1, batch_size: int = 8, learning_rate: float = 4e-4, out: str | None = None,
                device: str | None = None, tokenizer: str = "gpt2", seed: int = 123,
                **overrides: Any) -> tuple[GPTModel, Any, dict[str, Any]]:
    """Pretrain from a script or a notebook: `pretrain`, with the loop, run directory and
    validation split `python main.py` uses; returns (model, tokenizer, metrics).

    `texts` are strings to train on (joined by blank lines and written to texts.txt beside the
    run), or `data` names a file or a corpus ("the-verdict", "tinyshakespeare"). `model` is a
    preset; `overrides` set any GPTConfig field (emb_dim=64, attn_tau=True ...) or TrainConfig
    field (max_length=32, max_steps=100 ...) by name. `tokenizer` is "gpt2", "char", "train"
    (a BPE learned from the text: add bpe_vocab_size=...) or a saved BPE file; all of them work
    on bytes or characters, so any language, mixed ones included, round-trips.
    """
    if (texts is None) == (data is None):
        raise ConfigError("give train_model either texts=[...] (strings) or data=\"file.txt\", not both or neither.")
    if model not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {model!r}; pick one of {', '.join(MODEL_PRESETS)}."
                          f"{did_you_mean(model, list(MODEL_PRESETS))}")
    bpe_vocab_size = overrides.pop("bpe_vocab_size", 1024)
    model_fields, train_fields = set(GPTConfig.__dataclass_fields__) - {"vocab_size"}, set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - model_fields - train_fields)
    if unknown:
        raise ConfigError(f"train_model has no setting {unknown[0]!r}: give a GPTConfig or TrainConfig field."
                          f"{did_you_mean(unknown[0], sorted(model_fields | train_fields))}")
    cfg = model_config(model, **{k: v for k, v in overrides.items() if k in model_fields})
    train = {k: v for k, v in overrides.items() if k in train_fields}
    train.setdefault("max_length", min(cfg.context_length, 128))
    train.setdefault("stride", train["max_length"])
    run = RunConfig(task="pretrain", mode="custom", model_name=model, model=cfg,
                    train=TrainConfig(num_epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, **train),
                    tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size, data=data, out=out, device=device, seed=seed)
    if run.train.max_length > cfg.context_length:
        raise ConfigError(f"max_length ({run.train.max_length}) is longer than the model's context_length "
                          f"({cfg.context_length}); lower max_length or raise context_length.")
    run_dir = choose_run_dir(run)
    if texts is not None:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not "".join(texts).strip():
            raise ConfigError("texts must be a list of non-empty strings, e.g. texts=[\"first document\", ...].")
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "texts.txt"
        path.write_text("\n\n".join(texts), encoding="utf-8")
        run = replace(run, data=str(path))
    model_out, tokenizer_out, metrics, _ = pretrain(replace(run, out=str(run_dir)))
    return model_out, tokenizer_out, metrics


def make_metrics(state: TrainState, model: GPTModel, device: torch.device, completed: bool,
                 final: tuple[float, float] | None, run: RunConfig | None = None,
                 setup: StepSetup | None = None, compile_note: str = "off") -> dict[str, Any]:
    """The numbers a run reports: final and best losses, perplexity, speed, memory, and histories."""
    setup = setup or StepSetup(device)
    if final is not None:
        final_train, final_val = final
    else:  # stopped early: the last periodic evaluation is the latest measurement
        final_train = state.train_losses[-1] if state.train_losses else None
        final_val = state.val_losses[-1] if state.val_losses else None
    val_points = state.val_losses + ([final_val] if final_val is not None else [])
    tokens_per_sec = state.tokens_seen / state.train_time_s if state.train_time_s else None
    tflops = setup.tflops_per_device(tokens_per_sec) if tokens_per_sec and setup.flops_per_token else None
    memory, memory_kind = peak_memory_mib(device)
    return {
        "completed": completed,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "best_val_loss": min(val_points) if val_points else None,
        "perplexity": math.exp(final_val) if final_val is not None else None,
        "tokens_per_sec": tokens_per_sec,
        "tflops_per_device": tflops,
        "mfu": tflops / setup.peak_tflops if tflops and setup.peak_tflops else None,
        "peak_tflops": setup.peak_tflops,
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "elapsed_s": state.elapsed_s,
        "train_time_s": state.train_time_s,
        "total_tokens": state.tokens_seen,
        "steps": state.global_step,
        "epochs_completed": state.epoch,
        "num_parameters": model.num_parameters(),
        "device": str(device),
        "processes": setup.world.world_size,
        "precision": setup.precision,
        "compile": compile_note,
        "accumulation_steps": accumulation_steps(run.train, setup.world) if run else 1,
        "eval_steps": state.eval_steps,
        "tokens_seen": state.eval_tokens_seen,
        "train_losses": state.train_losses,
        "val_losses": state.val_losses,
        "batch_losses": state.batch_losses,
        "samples": state.samples,
    }


def write_run_files(run_dir: Path, run: RunConfig, metrics: dict[str, Any], extra: dict[str, Any],
                    train_tokens: int, val_tokens: int) -> None:
    """config.json (enough to rebuild and rerun), metrics.json, and the loss plot."""
    config = {**run.to_dict(), "data_path": str(corpus_path(run.data).resolve()),
              **extra, "train_tokens": train_tokens, "val_tokens": val_tokens,
              "torch_version": torch.__version__}
    if "saved" in config["tokenizer_spec"]:  # a BPE's merges: in the checkpoint and tokenizer.bpe
        config["tokenizer_spec"] = {"name": "bpe", "file": TOKENIZER_NAME}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    if metrics["batch_losses"]:
        final = None
        if metrics["completed"]:
            final = (metrics["steps"], metrics["final_train_loss"], metrics["final_val_loss"])
        plot_losses(metrics["eval_steps"], metrics["train_losses"], metrics["val_losses"],
                    run_dir / "training_losses.png", batch_losses=metrics["batch_losses"],
                    tokens_per_step=run.train.batch_size * run.train.max_length, final=final,
                    title=f"{run.task}, {run.mode} mode ({run.model_name})")


# ---------------------------------------------------------------------------------------
# What the console shows
# ---------------------------------------------------------------------------------------

def describe_tokenizer(tokenizer, run: RunConfig, seconds: float, resumed: bool) -> str:
    """One line for the header: which tokenizer, its size, and where it came from."""
    size = f"{tokenizer.vocab_size:,} tokens"
    if resumed:
        return f"{tokenizer.name}, {size} (the run's own, from its checkpoint)"
    if tokenizer.name == "gpt2":
        return f"gpt2 (GPT-2's BPE through tiktoken), {size}"
    if tokenizer.name == "char":
        return f"char (the text's distinct characters), {size}"
    if tokenizer.source == "gpt2":
        return f"bpe (minigpt's BPE with GPT-2's vocabulary), {size}"
    where = "trained on the training split" if run.tokenizer == "train" else f"loaded from {run.tokenizer}"
    return (f"bpe {where} in {seconds:.2f} s: {size} ({len(tokenizer.merges):,} merges), "
            f"saved as {TOKENIZER_NAME}")


def print_header(run: RunConfig, device: torch.device, model: GPTModel, tokenizer, corpus: Corpus,
                 steps_per_epoch: int, total_steps: int, run_dir: Path, state: TrainState, setup: StepSetup,
                 compile_note: str, fused: bool, random_windows: bool, final_eval_batches: int | None,
                 memory_note: str = "") -> None:
    cfg, m = run.train, run.model
    threads = f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})" \
        if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    processes = (f"; {setup.world.world_size} processes (torchrun, DDP over "
                 f"{'nccl' if device.type == 'cuda' else 'gloo'})" if setup.world.active else "")
    schedule = cfg.lr_schedule + (f", {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else "")
    if cfg.lr_schedule == "cosine":
        schedule += f", down to {0.1 * cfg.learning_rate if cfg.min_lr is None else cfg.min_lr:g}"
    micro = micro_batch_size(cfg, setup.world)
    accumulation = accumulation_steps(cfg, setup.world)
    split = "" if accumulation == 1 and not setup.world.active else (
        f" = {micro} per micro-batch x {accumulation} accumulation step(s) x "
        f"{setup.world.world_size} process(es)")
    windows = "random windows" if random_windows else f"sliding windows, stride {cfg.stride}"
    mfu = f"; MFU against {setup.peak_tflops:g} TFLOP/s" if setup.peak_tflops else ""
    rows = [
        ("device", f"{device}{threads}, torch {torch.__version__}{processes}"),
        ("speed", f"precision {setup.precision}{precision_reason(cfg.precision, device)}, compile {compile_note}, fused AdamW {'yes' if fused else 'no'}"
                  f"{', TF32 matmuls' if device.type == 'cuda' else ''}; "
                  f"{setup.flops_per_token / 1e6:,.1f} MFLOPs per token{mfu}"),
        ("model", f"{run.model_name}: {m.n_layers} layers, {m.n_heads} heads, emb_dim {m.emb_dim}, "
                  f"context {m.context_length}, vocab {m.vocab_size:,}, dropout {m.drop_rate}, "
                  f"qkv_bias {m.qkv_bias}, tied head {m.tie_weights}"
                  f"{'' if m.bias else ', no other biases'}{', exact GELU' if m.activation == 'gelu' else ''}"
                  f"{'; ' + m.architecture() if m.architecture() else ''}"),
        ("parameters", f"{model.num_parameters():,} ({model.num_parameters(exclude_output_head=True):,} "
                       f"without the output head); {model.parameter_memory_bytes() / 2**20:,.1f} MiB in fp32"),
        ("tokenizer", corpus.tokenizer_note),
        ("data", corpus.description),
        ("batches", f"{cfg.batch_size} x {cfg.max_length} tokens per step{split}; {windows}; "
                    f"{steps_per_epoch:,} steps per epoch"),
        ("training", f"{cfg.num_epochs} epoch{'s' if cfg.num_epochs > 1 else ''}, {total_steps:,} steps; "
                     f"AdamW lr {cfg.learning_rate:g} ({schedule}), betas ({cfg.beta1}, {cfg.beta2}), "
                     f"weight decay {cfg.weight_decay}, grad clip {cfg.grad_clip}"),
        ("memory", memory_note),
        ("evaluation", f"every {cfg.eval_freq} steps on {cfg.eval_iter} batches per split, at the end on "
                       f"{'every window' if final_eval_batches is None else f'{final_eval_batches * micro:,} windows'}; "
                       f"sample from {cfg.start_context!r} each epoch"),
        ("seed", str(run.seed)),
        ("run directory", str(run_dir) + (f" (resuming at step {state.global_step})" if state.global_step else "")),
    ]
    print_rows(f"minigpt | {run.task} | {run.mode} mode", rows)


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """A run's header: a title, then one aligned "key  value" line per row."""
    print(f"\n{title}")
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(flush=True)


def print_summary(metrics: dict[str, Any], run_dir: Path, completed: bool, files: list[str] | None = None) -> None:
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    status = "finished" if completed else "stopped early (resume with --resume " + str(run_dir) + ")"
    compute = ""
    if metrics["tflops_per_device"]:
        compute = f"; {metrics['tflops_per_device']:.3g} TFLOP/s per device"
        if metrics["mfu"]:
            compute += f", MFU {100 * metrics['mfu']:.1f}% of {metrics['peak_tflops']:g}"
    print(f"\ntraining {status}")
    print(f"  final train loss   {fmt(metrics['final_train_loss'])}")
    print(f"  final val loss     {fmt(metrics['final_val_loss'])}  (best {fmt(metrics['best_val_loss'])})")
    if metrics["perplexity"] is not None:
        print(f"  val perplexity     {fmt(metrics['perplexity'], ',.1f')}")
    print(f"  tokens seen        {metrics['total_tokens']:,} in {metrics['steps']:,} steps")
    print(f"  throughput         {fmt(metrics['tokens_per_sec'], ',.0f')} tokens/s (training steps only){compute}")
    print(f"  peak memory        {fmt(metrics['peak_memory_mib'], ',.0f')} MiB ({metrics['peak_memory_kind']})")
    print(f"  wall time          {metrics['elapsed_s']:.1f} s")
    files = files or ["checkpoint.pt", "config.json", "metrics.json", "training_losses.png"]
    if (run_dir / BEST_NAME).is_file() and BEST_NAME not in files:
        files.append(BEST_NAME)
    if (run_dir / TOKENIZER_NAME).is_file():
        files.append(TOKENIZER_NAME)
    print(f"  wrote              {run_dir}/: {', '.join(files)}")
