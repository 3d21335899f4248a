"""Training at scale (chapter 9): the same step, faster and wider.

- Mixed precision: matrix products in bf16 (or fp16, with a gradient scaler) under autocast.
- `torch.compile`: the model's graph fused into fewer, larger kernels.
- Several processes (`torchrun`, DistributedDataParallel): each computes its share of every
  batch, and the gradients are averaged before the optimizer steps.
- Micro-batches: a batch too large for the device, computed in parts whose gradients add up.
- Model FLOPs utilisation (MFU): the useful compute per second against the device's peak.

`ScaledSetup` fills in chapter 5's `StepSetup` hooks with all of it, so `train_step` and
`train_loop` run unchanged; `fit_micro_batch` makes sure a run fits the device before it starts.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from minigpt.config import ConfigError, GPTConfig, TrainConfig
from minigpt.memory import (MIB, Trial, can_measure_peak, check_fits, estimate_training_memory,
                            find_micro_batch_size, free_memory_bytes, process_memory_bytes, step_trial)
from minigpt.model import GPTModel
from minigpt.train import StepSetup, calc_loss_batch

# ---------------------------------------------------------------------------------------
# The machine a number was measured on
# ---------------------------------------------------------------------------------------

def cpu_features() -> dict[str, object]:
    """The CPU and libraries a measurement ran on. The vector instructions (AVX-512, AVX2) and the
    kernels PyTorch picked for them change how float sums round, so a seeded result can differ in
    its last digits from one CPU to another: benchmarks print this beside their numbers."""
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                break
    return dict(cpu=name, machine=platform.machine(), avx512f="avx512f" in flags, avx2="avx2" in flags,
                aten_capability=torch.backends.cpu.get_cpu_capability(), mkl_cbwr=os.environ.get("MKL_CBWR", "auto"),
                torch=torch.__version__, threads=torch.get_num_threads())


def cpu_description(features: dict[str, object] | None = None) -> str:
    """One line for a benchmark's header, e.g. "Intel Xeon (x86_64; avx512f yes, avx2 yes; ATen kernels
    AVX512; MKL_CBWR auto) | torch 2.13.0+cpu | threads 1"."""
    f = features or cpu_features()
    yes = {True: "yes", False: "no"}
    return (f"{f['cpu']} ({f['machine']}; avx512f {yes[f['avx512f']]}, avx2 {yes[f['avx2']]}; "
            f"ATen kernels {f['aten_capability']}; MKL_CBWR {f['mkl_cbwr']}) | torch {f['torch']} | threads {f['threads']}")


# ---------------------------------------------------------------------------------------
# Mixed precision and compilation
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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
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


def allow_tf32(device: torch.device) -> None:
    """TF32 on CUDA: fp32 matrix products on tensor cores with a 10-bit mantissa, several times faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# Speed: MFU and peak memory
# ---------------------------------------------------------------------------------------

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
# The step, scaled
# ---------------------------------------------------------------------------------------

@dataclass
class ScaledSetup(StepSetup):
    """Chapter 5's step in mixed precision, compiled and over several processes (see the module's
    docstring); none of it changes what a step computes, up to rounding."""

    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only: scales the loss so small gradients survive
    world: Distributed = field(default_factory=Distributed)
    peak_tflops: float | None = None
    flops_per_token: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def exchange(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        # Under DDP the processes average their gradients during the last micro-batch's backward;
        # the earlier ones skip that exchange.
        return contextlib.nullcontext() if last or not self.world.active else model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
               grad_clip: float | None) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        if self.scaler:
            self.scaler.step(optimizer)  # skipped if a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            optimizer.step()

    def agree(self, loss: torch.Tensor, stop: bool, tokens: int) -> tuple[float, bool, int]:
        return agree(loss, stop, self.world, tokens)

    def tflops_per_device(self, tokens_per_sec: float) -> float:
        """Useful compute per device: FLOPs per token x tokens per second, shared by the processes."""
        return self.flops_per_token * tokens_per_sec / self.world.world_size / 1e12

    def speed_note(self, tokens_per_sec: float) -> str:
        if not self.peak_tflops:
            return ""
        return f"  MFU {100 * self.tflops_per_device(tokens_per_sec) / self.peak_tflops:.1f}%"


def scaled_setup(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                 world: Distributed = Distributed()) -> tuple[ScaledSetup, str]:
    """The setup a run trains with, from its settings: precision (a scaler for fp16), the compiled
    and (several processes) DDP-wrapped model the steps call, MFU; and the compile note."""
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    allow_tf32(device)
    runner, compile_note = compile_model(model, cfg.compile, device)
    if world.active:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    setup = ScaledSetup(device, runner, precision, scaler, world, peak_tflops(device, cfg),
                        model.flops_per_token(cfg.max_length))
    return setup, compile_note


# ---------------------------------------------------------------------------------------
# Does it fit? (section 9.10)
# ---------------------------------------------------------------------------------------

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
        return cfg, _check_estimate(model, cfg, world, device, precision, num_tokens)
    per_process = process_batch_size(cfg, world)
    free, _ = free_memory_bytes(device)
    if limit is None and free is not None:
        limit = int(AUTO_HEADROOM * free)
    if device.type == "mps" or can_measure_peak(device):
        trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)

        def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return calc_loss_batch(inputs, targets, model, device)

        try_size = step_trial(model, make_batch, loss_fn, device, lambda: autocast(precision, device),
                              limit, per_process, reserve=8 * trainable)
        how = "measured"
    else:  # no way to read a peak here (a CPU off Linux): the estimate decides
        how = "estimated (peak memory cannot be measured on this system)"

        def try_size(size: int) -> Trial:
            need = estimate_training_memory(model, size, num_tokens, precision, accumulating=size < per_process)
            return Trial(size, need.total - need.weights, limit is None or need.total - need.weights <= limit)

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


def check_before_building(model: GPTConfig | torch.nn.Module, cfg: TrainConfig, world: Distributed,
                          device: torch.device, precision: str, num_tokens: int) -> None:
    """Refuse a model that cannot train on `device` before any of its weights is allocated.

    The estimate reads the shapes of the model built on the meta device (no memory: give its
    GPTConfig, or the model already built there), for the micro-batch the run asks for (one
    sequence under "auto", which measures the rest later).
    """
    if isinstance(model, GPTConfig):
        with torch.device("meta"):
            model = GPTModel(model)
    micro = 1 if cfg.micro_batch_size == "auto" else micro_batch_size(cfg, world)
    estimate = estimate_training_memory(model, micro, num_tokens, precision, device_type=device.type,
                                        accumulating=micro < cfg.batch_size // world.world_size)
    check_fits(estimate, device, cfg.batch_size, weights_allocated=False)


def _check_estimate(model: torch.nn.Module, cfg: TrainConfig, world: Distributed, device: torch.device,
                    precision: str, num_tokens: int) -> str:
    """The estimate against the free memory (a ConfigError if it cannot fit), as the header's note."""
    micro = micro_batch_size(cfg, world)
    estimate = estimate_training_memory(model, micro, num_tokens, precision,
                                        accumulating=micro < cfg.batch_size // world.world_size)
    free = check_fits(estimate, device, cfg.batch_size)
    room = f"; {free / MIB:,.0f} MiB free" if free is not None else ""
    held = process_memory_bytes() if device.type == "cpu" else None
    if held is not None:  # so that the summary's peak, the whole process's, can be read against it
        room += f"; the process holds {(held - estimate.weights) / MIB:,.0f} MiB besides (Python, PyTorch, data)"
    return (f"about {estimate.total / MIB:,.0f} MiB estimated: states {estimate.states / MIB:,.0f}, "
            f"{estimate.per_sequence / MIB:,.1f} per sequence of {num_tokens} tokens{room}")
