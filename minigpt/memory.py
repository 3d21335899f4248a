"""How much memory training takes, whether it fits the device, and the largest micro-batch that does (chapter 9).

Training memory has two parts (chapter 9, sections 9.3 and 9.10):

    states       weights (4 bytes each), gradients (4) and AdamW's two moments (4 + 4) of
                 every trainable weight, and in mixed precision the 2-byte copies of the
                 matrices that autocast makes for the forward pass;
    activations  what the forward pass keeps for the backward pass: bytes per token x tokens
                 in a micro-batch, plus the loss's buffers during the backward pass.

`estimate_training_memory` counts both from the configuration, before anything runs;
`check_fits` turns an estimate that exceeds the device into an error that says what to
change. `find_micro_batch_size` answers the same question by trying: a real forward and
backward pass at each candidate size, binary-searched.
"""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minigpt.config import ConfigError, GPTConfig, divisors

# ---------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------

MIB = 2**20


def activation_bytes_per_token(cfg: GPTConfig, precision: str = "fp32", num_tokens: int | None = None,
                               vocab_size: int | None = None, device_type: str = "cpu") -> int:
    """Bytes the forward pass keeps per token for the backward pass (see `activation_bytes`)."""
    block, rest = activation_bytes(cfg, precision, num_tokens, vocab_size, device_type)
    return cfg.n_layers * block + rest


def activation_bytes(cfg: GPTConfig, precision: str = "fp32", num_tokens: int | None = None,
                     vocab_size: int | None = None, device_type: str = "cpu") -> tuple[int, int]:
    """Bytes the forward pass keeps per token for the backward pass, read off the code: (one
    block's, the rest's: embedding, final norm, head and loss).

    Chapter 9 counts it for the GPT-2 block: in fp32 4 [L (16C + H + 4) + 2C + V + 2] + 16.
    The same counting covers the other switches: matrix products keep their inputs (2-byte
    copies under bf16/fp16 autocast), norms their fp32 input and statistics, the fused
    attention kernel its q, k, v, output and a log-sum-exp per head, the loss its fp32
    log-probabilities (V each) and the ids 16 bytes. Dropout differs by device: on a CPU each
    mask is a number of the tensor's type, and attention's dropout sends the kernel down its
    explicit path, which keeps the T x T weights (`num_tokens`); on CUDA each mask is a byte and
    the fused kernels draw attention's dropout inside (read from PyTorch's kernels; CI has no
    GPU to measure it). Exact, to a few bytes, on a CPU: the tests compare it with
    `saved_tensor_bytes` for nine architectures in fp32 and bf16.
    """
    C, H, V = cfg.emb_dim, cfg.n_heads, vocab_size or cfg.vocab_size
    kv = cfg.kv_heads * (C // H)                 # width of the values (and, at full rank, of the keys)
    q_width, k_width = H * cfg.qk_dim, cfg.kv_heads * cfg.qk_dim  # narrower with low-rank attention
    a = 4 if precision == "fp32" else 2          # bytes of a number a matrix product makes or casts
    norm = 4 * (C + 2) if cfg.norm == "layernorm" else 4 * (2 * C + 1)   # input, mean, 1/std | input, rms, x/rms
    grouped, rope, dropout = cfg.kv_heads != H, cfg.pos_emb == "rope", cfg.drop_rate > 0
    if dropout and device_type != "cuda":
        # With dropout the kernel takes its explicit path: fp32 copies of q, k and v, and per head
        # the T x T weights, the dropout's mask (a float per number on a CPU) and the dropped weights.
        attention = 3 * 4 * C + 12 * H * (num_tokens or cfg.context_length) + a * C
    else:
        # q, k and v are views of the qkv product, which stays whole while any view of it is
        # kept; RoPE rotates q and k into new tensors; grouped heads copy k and v to every head.
        attention = 0 if grouped and rope else a * (q_width + k_width + kv)
        if rope:
            attention += a * q_width + (0 if grouped else a * k_width)
        if grouped:
            attention += a * (q_width + C)
        if cfg.attn_tau:                         # q / tau; tau and the softplus's input; x cast again
            attention += a * q_width + 8 * H + (2 * C if a == 2 else 0)
        attention += a * C + 4 * H               # output (out_proj's input), a log-sum-exp per head
        if cfg.qk_dim != C // H:                 # the fused kernel wants keys as wide as values: the
            T = num_tokens or cfg.context_length # explicit path keeps the T x T weights (fp32 under
            attention += 4 * H * T * (1 if a == 4 else 2) - 4 * H  # autocast, and a cast) and no log-sum-exp
    h = cfg.hidden_dim
    swiglu = 4 * C + a * 4 * h                   # input (cast twice under autocast); gate, SiLU, up, product
    if cfg.ffn == "gelu":
        ffn = a * (C + 2 * h)                    # input; GELU's input and output
    elif cfg.ffn == "swiglu":
        ffn = swiglu
    else:  # router: input, probabilities twice, top-k ids and weights; per routed copy of a token:
        E, k = cfg.n_experts, cfg.moe_top_k      # its index and weight, the expert, the output and the
        ffn = a * C + 8 * E + 12 * k + 4 + k * (12 + swiglu + 2 * a * C + (4 - a) * C)  # weighted output
        if cfg.moe_shared_expert:
            ffn += swiglu - 2 * (a - 2) * C      # in fp32 its input is the router's, not a copy
    block = 2 * norm + a * C + attention + ffn   # + a x C: the qkv product's input
    if cfg.halting:                              # the halting unit's input (cast under autocast), its
        block += (8 - a) // 2 * C + 8            # probability and the state's weight in the sum
    rest = norm + a * C + 4 * V + 16             # final norm, the head's input, log-probabilities, ids
    if dropout:                                  # the masks of the embedding's and the two residual dropouts
        block += 2 * (1 if device_type == "cuda" else a) * C
        rest += (1 if device_type == "cuda" else 4) * C
    return block, rest


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory, in bytes, for one micro-batch of `micro_batch` x `num_tokens` tokens.

    The gradients and the activations are not all held at once. The backward pass frees each
    layer's activations as it makes that layer's gradients, so when it starts only the head's
    gradient exists; after it, all the gradients and none of the activations. Only with gradient
    accumulation do the earlier micro-batches' gradients wait through the next one's passes.
    """

    micro_batch: int
    num_tokens: int
    precision: str
    accumulating: bool    # more than one micro-batch per optimizer step
    weights: int          # every parameter, fp32
    gradients: int        # trainable parameters, fp32
    first_gradient: int   # the output head's, made first in the backward pass (0 if frozen)
    optimizer: int        # AdamW's two moments per trainable parameter, fp32
    weight_copies: int    # bf16/fp16 copies of the matrices autocast makes (0 in fp32)
    activations: int      # saved for the backward pass
    loss_buffers: int     # the loss's gradients, made at the start of the backward pass
    backward_buffers: int # gradients flowing back through a block: about one block's activations

    @property
    def states(self) -> int:
        """What does not depend on the batch."""
        return self.weights + self.gradients + self.optimizer + self.weight_copies

    @property
    def per_sequence(self) -> int:
        return (self.activations + self.loss_buffers + self.backward_buffers) // self.micro_batch

    @property
    def total(self) -> int:
        """The peak: the larger of the start of the backward pass and its end."""
        held = self.gradients if self.accumulating else self.first_gradient
        backward_starts = self.activations + self.loss_buffers + self.backward_buffers + held
        return self.weights + self.optimizer + self.weight_copies + max(backward_starts, self.gradients)

    def rows(self) -> list[tuple[str, str]]:
        """(what, MiB) lines for a table or a message."""
        parts = [("weights (fp32)", self.weights), ("gradients", self.gradients),
                 ("AdamW moments", self.optimizer)]
        if self.weight_copies:
            parts.append((f"{self.precision} copies of the matrices", self.weight_copies))
        parts += [(f"activations ({self.micro_batch} x {self.num_tokens} tokens)", self.activations),
                  ("loss gradients", self.loss_buffers), ("gradients of activations", self.backward_buffers),
                  ("peak (gradients and activations overlap" + ("" if self.accumulating else " in part") + ")",
                   self.total)]
        return [(name, f"{value / MIB:,.1f} MiB") for name, value in parts]


def estimate_training_memory(model: torch.nn.Module, micro_batch: int, num_tokens: int,
                             precision: str = "fp32", accumulating: bool = False,
                             device_type: str | None = None) -> MemoryEstimate:
    """Memory to train `model` on micro-batches of `micro_batch` x `num_tokens` tokens with AdamW.

    Counts the parameters the model has and which of them train (frozen weights have no
    gradient and no optimizer state; LoRA's adapters do); the activations follow
    `activation_bytes`, for `device_type` (default: where the model's weights are). An upper
    bound when the lower layers are frozen.
    """
    params = list({id(p): p for p in model.parameters()}.values())   # a tied weight counts once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    matrices = sum(p.numel() for p in params if p.dim() == 2)
    head = getattr(model.out_head, "base", model.out_head).weight  # under LoRA, the frozen layer it wraps
    vocab = head.shape[0]                                       # a classifier's head: its classes
    tokens = micro_batch * num_tokens
    a = 4 if precision == "fp32" else 2
    device_type = device_type or head.device.type
    block, rest = activation_bytes(model.cfg, precision, num_tokens, vocab, device_type)
    return MemoryEstimate(
        micro_batch=micro_batch, num_tokens=num_tokens, precision=precision, accumulating=accumulating,
        weights=4 * sum(p.numel() for p in params), gradients=4 * trainable,
        first_gradient=4 * head.numel() if head.requires_grad else 0, optimizer=8 * trainable,
        weight_copies=0 if precision == "fp32" else 2 * matrices,
        activations=tokens * (model.cfg.n_layers * block + rest),
        # the gradients of the fp32 log-probabilities and of the logits, then the logits' cast
        loss_buffers=tokens * vocab * (8 + (a if precision != "fp32" else 0)),
        backward_buffers=tokens * block)


# ---------------------------------------------------------------------------------------
# What the device has
# ---------------------------------------------------------------------------------------

def _proc_bytes(path: str, key: str) -> int | None:
    """A "key: N kB" line of a /proc file, in bytes (None off Linux)."""
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def process_memory_bytes() -> int | None:
    """This process's resident memory now (Linux), Python and PyTorch included; None elsewhere."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def free_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """Memory this process could still take on `device`, and what that number is."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)} ({total / 2**30:.1f} GiB in all)"
    if device.type == "mps":
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(),
                "Metal's recommended limit for this process, less what it holds")
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available, "MemAvailable in /proc/meminfo"
    return None, "not known on this system"


def check_fits(estimate: MemoryEstimate, device: torch.device, batch_size: int,
               weights_allocated: bool = True) -> int | None:
    """Raise a ConfigError with the estimate and what to change if training cannot fit on `device`;
    else return the free memory (None where it is not known).

    Once the weights are on the device (`weights_allocated`), they are not asked for again; before
    (a model built on the meta device, to refuse it before allocating it), they are.
    """
    free, what = free_memory_bytes(device)
    held = estimate.weights if weights_allocated else 0
    if free is None or estimate.total - held <= free:
        return free
    rows = estimate.rows()
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"    {name:<{width}}  {value:>14}" for name, value in rows)
    per_sequence = estimate.per_sequence
    room = free - (estimate.states - held)
    if room >= per_sequence and estimate.micro_batch > 1:
        fitting = max(d for d in divisors(batch_size) if d * per_sequence <= room)  # 1 always fits here
        advice = (f"a smaller micro-batch keeps the batch of {batch_size} through gradient accumulation: "
                  f"--micro-batch-size {fitting} (about {(estimate.states + fitting * per_sequence) / MIB:,.0f} "
                  "MiB), or --batch-size auto to measure the largest that fits")
    elif room > 0:
        advice = (f"one sequence of {estimate.num_tokens} tokens does not fit beside the states: shorten the "
                  "context (custom_params['max_length'] and model_overrides['context_length']), use "
                  "--precision bf16 on a GPU that has it, or a smaller model")
    else:
        advice = ("the weights, gradients and AdamW's moments alone do not fit: pick a smaller model"
                  + (", or fine-tune with --trainable lora" if estimate.gradients else ""))
    raise ConfigError(
        f"training needs about {estimate.total / MIB:,.0f} MiB but {device} has {free / MIB:,.0f} MiB "
        f"({what}):\n{table}\n  Change: {advice}.")


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves while `fn()` runs its forward pass (parameters
    in `exclude` left out): the activations, counted exactly."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(storages.values())


def _release_freed_memory() -> None:
    """Hand memory that was freed back to the system, so that the next measurement starts low."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): freed memory stays with the process
            pass


def can_measure_peak(device: torch.device) -> bool:
    """CUDA keeps a peak of its allocator; on a CPU, Linux keeps a resettable peak of the process's memory."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _proc_bytes("/proc/self/status", "VmHWM") is not None


def measure_peak(fn: Callable[[], object], device: torch.device) -> int | None:
    """The most memory `fn()` held above what was in use before it, in bytes.

    CUDA: the allocator's peak. CPU (Linux): the process's resident-memory high-water mark,
    which /proc/self/clear_refs resets; it counts pages the allocator touched, so it reads a
    little above the tensors' bytes. Elsewhere (Apple's MPS, a CPU off Linux): `fn()` runs and
    the answer is None.
    """
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not can_measure_peak(device):
        fn()
        return None
    before = process_memory_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current size
    fn()
    return _proc_bytes("/proc/self/status", "VmHWM") - before


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception is the device running out of memory (CUDA, MPS or the CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


@dataclass(frozen=True)
class Trial:
    micro_batch: int
    peak: int | None      # bytes above the starting point; None: ran out of memory, or not measurable
    fits: bool


def find_micro_batch_size(batch_size: int, try_size: Callable[[int], Trial]) -> tuple[int, list[Trial]]:
    """The largest divisor of `batch_size` for which `try_size` says it fits (binary search).

    Only divisors keep every optimizer step at exactly `batch_size` sequences through
    gradient accumulation. Returns the size and every trial, in the order they ran.
    """
    candidates = divisors(batch_size)
    trials: list[Trial] = []
    low, high = 0, len(candidates) - 1     # answer in candidates[low - 1 .. high]; low = 0: none fits yet
    best = None
    while low <= high:
        middle = (low + high) // 2
        trial = try_size(candidates[middle])
        trials.append(trial)
        if trial.fits:
            best, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    if best is None:
        raise ConfigError(f"not even a micro-batch of 1 fits: {trials[-1]}. Shorten the context, or pick a "
                          "smaller model.")
    return best, trials


def step_trial(model: torch.nn.Module, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
               autocast_context: Callable[[], object], limit: int | None, batch_per_step: int,
               reserve: int = 0) -> Callable[[int], Trial]:
    """A `try_size` for `find_micro_batch_size`: forward and backward passes of a micro-batch.

    `reserve` bytes are set aside first (AdamW's moments, which the first optimizer step will
    create). A micro-batch smaller than `batch_per_step` runs twice, as accumulation does: the
    second pass meets the first one's gradients. The size fits if nothing ran out of memory and
    the peak stays under `limit` (None: only running out of memory decides). The gradients are
    dropped afterwards, so the model is as it was.
    """
    def try_size(micro_batch: int) -> Trial:
        inputs, targets = make_batch(micro_batch)

        def passes() -> None:
            ballast = torch.empty(reserve, dtype=torch.uint8, device=device).fill_(0) if reserve else None
            for _ in range(1 if micro_batch == batch_per_step else 2):
                with autocast_context():
                    loss = loss_fn(inputs, targets)
                loss.backward()
                del loss
            del ballast

        peak, out_of_memory = None, False
        try:
            peak = measure_peak(passes, device)
        except Exception as err:  # noqa: BLE001 - running out of memory is an answer; anything else is not
            if not is_out_of_memory(err):
                raise
            out_of_memory = True
        finally:
            for p in model.parameters():
                p.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fits = not out_of_memory and (peak is None or limit is None or peak <= limit)
        return Trial(micro_batch, peak, fits)

    return try_size
