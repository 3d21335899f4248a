"""Pretraining (chapter 5): the loss, its evaluation, the optimizer and its schedule, one
training step, and the loop that repeats it.

The loss is the cross-entropy of the next token: for every position the model scores the
whole vocabulary, and we pay -log p(correct next token), averaged over all positions.
A model that knows nothing pays ln(vocab_size) (10.82 nats for GPT-2's 50,257 tokens);
perplexity = exp(loss) reads as "as unsure as a uniform choice among this many tokens".

A step here runs on one device in fp32. Chapter 9 (`minigpt.scale`) makes the same step
faster, in mixed precision and over several processes, by filling in `StepSetup`'s hooks;
`minigpt.task_pretrain` is the pipeline that runs all of it over a corpus and writes a run
directory (`python main.py`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from minigpt.config import ConfigError, TrainConfig
from minigpt.data import IGNORE_INDEX
from minigpt.model import LanguageModel, ModelOutput

# ---------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------


def loss_and_output(input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module,
                    device: torch.device | str, labels: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, ModelOutput]:
    """The batch's mean next-token cross-entropy and the forward pass's output.

    While training, the model's own terms are added to the loss: a mixture of experts' load
    balancing (chapter 10) and the halting units' ponder cost (chapter 11); and for a studio
    graph, its other losses, each weighted: more next-token heads, and a class per sequence
    (`labels`, (B,)) for its classification heads.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    output = forward_with_details(model, input_batch)  # logits (B, T, V)
    # cross_entropy wants (N, V) scores and (N,) classes: fold batch and time together.
    loss = F.cross_entropy(output.logits.flatten(0, 1), target_batch.flatten())
    if model.training and (output.heads or output.weight != 1.0):  # a studio graph's losses: their weighted sum
        loss = output.weight * loss + sum(weight * F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
                                          for weight, logits in output.heads)
    if model.training and output.classes and labels is not None:
        labels = labels.to(device)
        loss = loss + sum(weight * F.cross_entropy(scores, labels) for weight, scores in output.classes)
    if model.training and output.aux_loss is not None:
        loss = loss + output.aux_loss
    return loss, output


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's and torch.compile's wrappers (chapter 9)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def forward_with_details(model: torch.nn.Module, input_batch: torch.Tensor) -> ModelOutput:
    """The forward pass with what the loss adds: a `LanguageModel` (a `GPTModel` or a studio graph,
    wrapped or not) reports it when asked (`details=True`); any other module that maps ids to
    logits gives its logits alone."""
    if isinstance(unwrap(model), LanguageModel):
        return model(input_batch, details=True)  # through the wrapper, so that DDP sees the forward
    return ModelOutput(model(input_batch))


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch; inputs and targets are (B, T)."""
    return loss_and_output(input_batch, target_batch, model, device)[0]


@torch.no_grad()
def calc_loss_loader(data_loader: DataLoader, model: torch.nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Mean loss per token over the first `num_batches` batches (all of them if None).

    Targets of IGNORE_INDEX (padding, masked prompts: chapter 7) are not predictions and do not count.
    """
    total_loss, total_tokens = 0.0, 0
    for i, (inputs, targets, *_) in enumerate(data_loader):  # (a class per sequence, if given, is not scored here)
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

def make_optimizer(model: torch.nn.Module | Iterable[torch.nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights, decaying only the matrices: biases and norm gains stay
    free of weight decay. Give several models (a policy and its value model) to train them together.

    The fused implementation updates every tensor in one kernel per step instead of a dozen
    small ones per tensor: the same arithmetic, 3-5x faster on a CPU than PyTorch's default
    there (benchmarks/bench_optimizer.py).
    """
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    params = list({id(p): p for m in models for p in m.parameters() if p.requires_grad}.values())
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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps the run takes: every epoch's, or `max_steps` if that comes first."""
    total = steps_per_epoch * cfg.num_epochs
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


# ---------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------

@dataclass
class StepSetup:
    """How a step is computed: here on one device, in fp32, in one process.

    Chapter 9's `minigpt.scale.ScaledSetup` overrides the hooks below for mixed precision (a
    gradient scaler for fp16), torch.compile and several processes; none of it changes what a
    step computes, up to rounding.
    """

    device: torch.device
    runner: torch.nn.Module | None = None  # what the steps call (chapter 9: compiled, wrapped for DDP); None: the model
    is_main = True                         # the process that prints and writes (chapter 9: rank 0 of several)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around forward passes (chapter 9: matrix products in bf16 or fp16)."""
        return contextlib.nullcontext()

    def exchange(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward (chapter 9: processes average gradients at the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # chapter 9: fp16 scales the loss first, so that small gradients survive

    def update(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
               grad_clip: float | None) -> None:
        """Clip the gradient's global norm (if asked) and take the optimizer step."""
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()

    def agree(self, loss: torch.Tensor, stop: bool, tokens: int) -> tuple[float, bool, int]:
        """The step's loss, whether to stop, and the tokens read (chapter 9: over every process).
        `.item()` waits for the step to finish, so the step's timing is honest."""
        return loss.item(), stop, tokens

    def speed_note(self, tokens_per_sec: float) -> str:
        return ""  # chapter 9: the model FLOPs utilisation


@dataclass
class StepResult:
    loss: torch.Tensor                 # the batch's mean loss (a 0-d tensor, detached)
    depth: torch.Tensor | None = None  # adaptive depth (chapter 11): mean blocks per token in the batch


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[tuple[torch.Tensor, torch.Tensor]], setup: StepSetup,
               grad_clip: float | None = None) -> StepResult:
    """One optimizer step over one batch given as micro-batches; returns the batch's mean loss
    (and, for a model with adaptive depth, the blocks its tokens ran).

    Gradient accumulation: the gradients of k micro-batches, each loss divided by k, add up
    to the gradient of their mean, which is the gradient of the whole batch (every
    micro-batch has the same number of tokens).
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=setup.device)
    depths = []
    for i, (inputs, targets, *labels) in enumerate(micro_batches):  # labels: a class per sequence, if any
        with setup.exchange(model, last=i == len(micro_batches) - 1):
            with setup.autocast():
                loss, output = loss_and_output(inputs, targets, model, setup.device, *labels)
                loss = loss / len(micro_batches)
            if output.depth is not None:
                depths.append(output.depth.detach().mean())
            del output  # the logits (B, T, V): the backward pass needs only the loss's graph
            setup.backward(loss)
        total += loss.detach()
    setup.update(optimizer, model.parameters(), grad_clip)
    return StepResult(total, torch.stack(depths).mean() if depths else None)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

class Diverged(ConfigError):
    """The loss stopped being a number (nan, inf): training cannot go on from these weights."""


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
    train: DataLoader        # shuffled (or random windows): the batches the optimizer sees, in micro-batches
    train_eval: DataLoader   # windows of the training split in fixed order, to measure the train loss
    val: DataLoader
    accumulation: int = 1    # micro-batches of `train` per optimizer step (in each process)
    eval_batches: int | None = None  # batches of each split a periodic evaluation reads (None: eval_iter)


@dataclass
class LoopEvents:
    """What the loop tells the code around it, and asks it; every hook is optional."""

    should_stop: Callable[[], bool] = lambda: False            # asked after every step (Ctrl-C)
    epoch_end: Callable[[], None] | None = None                # after every epoch but the last (save a checkpoint)
    best: Callable[[], None] | None = None                     # after an evaluation with the lowest validation loss
    epoch_note: Callable[[int], tuple[str, dict[str, Any]]] | None = None  # after epoch n: (line, numbers with "text")
    on_event: Callable[[dict[str, Any]], None] | None = None   # each log line and note as a dict (a live chart)


def train_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loaders: Loaders, cfg: TrainConfig,
               state: TrainState, setup: StepSetup, events: LoopEvents | None = None, log_every: int = 10) -> bool:
    """Train from `state` until the planned steps or the last epoch; True if it got there.

    The loop can stop after any step (`events.should_stop`, Ctrl-C) and continue later from the
    saved state: the data order depends only on (seed, epoch), the learning rate only on the step.
    Steps run `setup.runner` (the model compiled and/or wrapped, chapter 9; by default `model`);
    evaluations and notes use `model`, whose weights are the same. Every `cfg.eval_freq` steps
    the train and validation losses are measured; every `log_every` steps a line is printed.
    Tokens are counted as read, padding included (fine-tuning pads to the longest in a batch).
    """
    events = events or LoopEvents()
    total_steps = planned_steps(cfg, loaders.train.sampler.steps_per_epoch)
    log = _Log(state, setup, events, log_every)
    model.train()
    while state.epoch < cfg.num_epochs and state.global_step < total_steps:
        loaders.train.sampler.set_epoch(state.epoch, start=state.step_in_epoch * cfg.batch_size)
        steps_this_epoch = loaders.train.sampler.steps_per_epoch
        micro_batches = iter(loaders.train)
        bar = tqdm(total=steps_this_epoch, initial=state.step_in_epoch, disable=not setup.is_main,
                   desc=f"epoch {state.epoch + 1}/{cfg.num_epochs}", unit="step", leave=False, dynamic_ncols=True)
        stopping = False
        while state.step_in_epoch < steps_this_epoch and not stopping:
            started = time.perf_counter()  # a step's time includes reading its batch
            lr = learning_rate_at(state.global_step, cfg, total_steps)
            set_learning_rate(optimizer, lr)
            batch = [next(micro_batches) for _ in range(loaders.accumulation)]
            result, stopping = _step(model, optimizer, batch, cfg, state, setup, events.should_stop(), started)
            bar.update(1)
            bar.set_postfix(loss=f"{state.batch_losses[-1]:.3f}", refresh=False)  # drawn at the bar's own pace
            losses = _evaluate_if_due(model, loaders, cfg, state, setup, events)
            log.step(state.epoch + 1, lr, result.depth, model, losses, force=losses is not None)
            stopping = stopping or state.global_step >= total_steps
        bar.close()
        if state.step_in_epoch == steps_this_epoch:  # the epoch ran to its end
            _end_epoch(cfg, state, setup, events, log, more_to_come=state.global_step < total_steps)
        if stopping:
            break
    log.clock()
    return state.epoch >= cfg.num_epochs or state.global_step >= total_steps


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: list, cfg: TrainConfig,
          state: TrainState, setup: StepSetup, stop: bool, started: float) -> tuple[StepResult, bool]:
    """One training step (begun at `started`), counted into `state`; and whether any process was asked to stop."""
    runner = setup.runner if setup.runner is not None else model
    result = train_step(runner, optimizer, batch, setup, cfg.grad_clip)
    batch_loss, stopping, tokens = setup.agree(result.loss, stop, sum(inputs.numel() for inputs, *_ in batch))
    if not math.isfinite(batch_loss):
        raise Diverged(
            f"the loss became {batch_loss} at step {state.global_step + 1} (learning rate "
            f"{optimizer.param_groups[0]['lr']:.2e}); training diverged. Start a new run with a lower "
            f"learning_rate (now {cfg.learning_rate}) or with grad_clip set (e.g. 1.0).")
    state.train_time_s += time.perf_counter() - started
    state.global_step += 1
    state.step_in_epoch += 1
    state.tokens_seen += tokens
    state.batch_losses.append(batch_loss)
    return result, stopping


def _evaluate_if_due(model: torch.nn.Module, loaders: Loaders, cfg: TrainConfig, state: TrainState,
                     setup: StepSetup, events: LoopEvents) -> tuple[float, float] | None:
    """Every `eval_freq` steps: the train and validation losses, recorded; the best weights kept."""
    if state.global_step % cfg.eval_freq:
        return None
    with setup.autocast():
        train_loss, val_loss = evaluate_model(model, loaders.train_eval, loaders.val, setup.device,
                                              loaders.eval_batches or cfg.eval_iter)
    improved = not state.val_losses or val_loss < min(state.val_losses)
    state.eval_steps.append(state.global_step)
    state.eval_tokens_seen.append(state.tokens_seen)
    state.train_losses.append(train_loss)
    state.val_losses.append(val_loss)
    if improved and events.best is not None:
        events.best()
    return train_loss, val_loss


def _end_epoch(cfg: TrainConfig, state: TrainState, setup: StepSetup, events: LoopEvents, log: "_Log",
               more_to_come: bool) -> None:
    """Count the epoch, show how the model does (`events.epoch_note`), and let the caller save."""
    state.epoch += 1
    state.step_in_epoch = 0
    if events.epoch_note is not None:
        line, note = events.epoch_note(state.epoch)
        state.samples.append({"epoch": state.epoch, "step": state.global_step, **note})
        if setup.is_main:
            tqdm.write(line)
            if events.on_event is not None:
                events.on_event({"type": "sample", "epoch": state.epoch, "step": state.global_step,
                                 "text": note["text"]})
    log.clock()  # the checkpoint saved at the epoch's end records the wall time so far
    if events.epoch_end is not None and more_to_come and state.epoch < cfg.num_epochs:
        events.epoch_end()


class _Log:
    """The loop's periodic line: the mean loss of the recent batches, the learning rate and the speed."""

    def __init__(self, state: TrainState, setup: StepSetup, events: LoopEvents, every: int) -> None:
        self.state, self.setup, self.events, self.every = state, setup, events, every
        self.started, self.elapsed_before = time.perf_counter(), state.elapsed_s
        self.last_step, self.last_time, self.last_tokens = state.global_step, state.train_time_s, state.tokens_seen

    def clock(self) -> None:
        self.state.elapsed_s = self.elapsed_before + time.perf_counter() - self.started

    def step(self, epoch: int, lr: float, depth: torch.Tensor | None, model: torch.nn.Module,
             losses: tuple[float, float] | None, force: bool) -> None:
        state = self.state
        if not (force or state.global_step % self.every == 0) or not self.setup.is_main:
            return
        steps = state.global_step - self.last_step
        tokens_per_sec = (state.tokens_seen - self.last_tokens) / max(state.train_time_s - self.last_time, 1e-9)
        recent = state.batch_losses[-steps:] if steps else state.batch_losses[-1:]
        batch_loss = sum(recent) / len(recent)
        line = (f"epoch {epoch} step {state.global_step:>6,}  batch loss {batch_loss:.3f}  lr {lr:.2e}  "
                f"{tokens_per_sec:,.0f} tok/s{self.setup.speed_note(tokens_per_sec)}")
        if depth is not None:  # adaptive depth: blocks per token in the last training batch
            line += f"  depth {depth.item():.2f}/{model.cfg.n_layers}"
        if losses is not None:
            line += f"  | train loss {losses[0]:.3f}  val loss {losses[1]:.3f}"
        tqdm.write(line)
        if self.events.on_event is not None:
            event = {"type": "step", "step": state.global_step, "epoch": epoch, "batch_loss": batch_loss, "lr": lr,
                     "tokens_per_sec": tokens_per_sec, "tokens_seen": state.tokens_seen}
            self.events.on_event(event | ({"train_loss": losses[0], "val_loss": losses[1]} if losses else {}))
        self.last_step, self.last_time, self.last_tokens = state.global_step, state.train_time_s, state.tokens_seen
