"""Pretraining (chapter 5): the loss, its evaluation, the training loop, checkpoints that
resume exactly, and `pretrain`, the whole pipeline `python main.py` runs.

The loss is the cross-entropy of the next token: for every position the model scores the
whole vocabulary, and we pay -log p(correct next token), averaged over all positions.
A model that knows nothing pays ln(vocab_size) (10.82 nats for GPT-2's 50,257 tokens);
perplexity = exp(loss) reads as "as unsure as a uniform choice among this many tokens".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from minigpt.config import ConfigError, RunConfig, TrainConfig
from minigpt.data import VERDICT_PATH, create_dataloader, load_text, split_text
from minigpt.generation import generate_text, text_to_token_ids
from minigpt.model import GPTModel
from minigpt.plot import plot_losses
from minigpt.tokenizer import BPETokenizer, get_tokenizer, tokenizer_from_spec

CHECKPOINT_NAME = "checkpoint.pt"
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
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


@torch.no_grad()
def calc_loss_loader(data_loader: DataLoader, model: torch.nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Mean loss per token over the first `num_batches` batches (all of them if None)."""
    total_loss, total_tokens = 0.0, 0
    for i, (inputs, targets) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        loss = calc_loss_batch(inputs, targets, model, device)
        total_loss += loss.item() * targets.numel()  # weight by tokens: a short last batch counts less
        total_tokens += targets.numel()
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
    """AdamW, decaying only the matrices: biases and norm gains stay free of weight decay."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)


def learning_rate_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warm-up, then constant
    or a cosine decay to 10% of the peak at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    min_lr = 0.1 * cfg.learning_rate
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (cfg.learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything that changes while training and must survive a stop and a resume."""

    epoch: int = 0            # epochs completed
    step_in_epoch: int = 0    # batches done in the current epoch
    global_step: int = 0      # optimizer steps done
    tokens_seen: int = 0      # training tokens consumed
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
    train: DataLoader        # shuffled, the batches the optimizer sees
    train_eval: DataLoader   # the same windows in fixed order, to measure the train loss
    val: DataLoader


class StopRequest:
    """Ctrl-C during training asks the loop to finish its step, save and stop.

    A second Ctrl-C interrupts at once, as usual. Outside the main thread (where Python
    cannot install signal handlers) this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C behaves as usual
        tqdm.write("\nCtrl-C: stopping after this step and saving a resumable checkpoint "
                   "(press Ctrl-C again to quit at once).")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)


def train_loop(model: GPTModel, optimizer: torch.optim.Optimizer, loaders: Loaders,
               device: torch.device, cfg: TrainConfig, state: TrainState, total_steps: int,
               tokenizer, log_every: int = 10, stop: StopRequest | None = None,
               on_epoch_end: Callable[[], None] | None = None) -> bool:
    """Train from `state` until `total_steps` or the last epoch; True if it got there.

    The loop can stop after any step (Ctrl-C) and continue later from the saved state:
    the data order depends only on (seed, epoch), and the learning rate only on the step.
    `on_epoch_end` runs after every epoch but the last (pretrain saves a checkpoint there).
    """
    stop = stop or StopRequest()
    model.train()
    sampler = loaders.train.sampler
    loop_start = time.perf_counter()
    elapsed_before = state.elapsed_s
    last_log_step, last_log_time = state.global_step, state.train_time_s
    while state.epoch < cfg.num_epochs and state.global_step < total_steps:
        sampler.set_epoch(state.epoch, start=state.step_in_epoch * cfg.batch_size)
        steps_this_epoch = state.step_in_epoch + len(loaders.train)
        bar = tqdm(loaders.train, total=steps_this_epoch, initial=state.step_in_epoch,
                   desc=f"epoch {state.epoch + 1}/{cfg.num_epochs}", unit="step", leave=False,
                   dynamic_ncols=True)
        for inputs, targets in bar:
            step_start = time.perf_counter()
            lr = learning_rate_at(state.global_step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = calc_loss_batch(inputs, targets, model, device)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"the loss became {loss.item()} at step {state.global_step + 1} (learning rate "
                    f"{lr:.2e}); training diverged. Start a new run with a lower learning_rate "
                    f"(now {cfg.learning_rate}) or with grad_clip set (e.g. 1.0).")
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            batch_loss = loss.item()  # waits for the step to finish, so the timing is honest
            state.train_time_s += time.perf_counter() - step_start
            state.global_step += 1
            state.step_in_epoch += 1
            state.tokens_seen += inputs.numel()
            state.batch_losses.append(batch_loss)
            bar.set_postfix(loss=f"{batch_loss:.3f}")

            evaluate_now = state.global_step % cfg.eval_freq == 0
            if evaluate_now:
                train_loss, val_loss = evaluate_model(model, loaders.train_eval, loaders.val,
                                                      device, cfg.eval_iter)
                state.eval_steps.append(state.global_step)
                state.eval_tokens_seen.append(state.tokens_seen)
                state.train_losses.append(train_loss)
                state.val_losses.append(val_loss)
            if evaluate_now or state.global_step % log_every == 0:
                steps = state.global_step - last_log_step
                seconds = state.train_time_s - last_log_time
                recent = state.batch_losses[-steps:] if steps else [batch_loss]
                line = (f"epoch {state.epoch + 1} step {state.global_step:>6,}  "
                        f"batch loss {sum(recent) / len(recent):.3f}  lr {lr:.2e}  "
                        f"{steps * inputs.numel() / max(seconds, 1e-9):,.0f} tok/s")
                if evaluate_now:
                    line += f"  | train loss {train_loss:.3f}  val loss {val_loss:.3f}"
                tqdm.write(line)
                last_log_step, last_log_time = state.global_step, state.train_time_s
            if stop.requested or state.global_step >= total_steps:
                break
        bar.close()
        if state.step_in_epoch == steps_this_epoch:  # the epoch ran to its end
            state.epoch += 1
            state.step_in_epoch = 0
            sample = generate_text(model, tokenizer, cfg.start_context, max_new_tokens=50)
            state.samples.append({"epoch": state.epoch, "step": state.global_step, "text": sample})
            tqdm.write(f"sample after epoch {state.epoch}: {sample!r}")
            state.elapsed_s = elapsed_before + time.perf_counter() - loop_start
            more_to_come = state.epoch < cfg.num_epochs and state.global_step < total_steps
            if on_epoch_end is not None and more_to_come:
                on_epoch_end()
        if stop.requested:
            break
    state.elapsed_s = elapsed_before + time.perf_counter() - loop_start
    return state.epoch >= cfg.num_epochs or state.global_step >= total_steps


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, model: GPTModel, optimizer: torch.optim.Optimizer,
                    state: TrainState, run: RunConfig, extra: dict[str, Any] | None = None) -> Path:
    """Write everything needed to rebuild the model and to continue training exactly.

    Written to a temporary file and renamed, so an interruption never leaves a broken file.
    """
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "run": run.to_dict(),
        "tokenizer_spec": (extra or {}).get("tokenizer_spec"),
        "data_sha256": (extra or {}).get("data_sha256"),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


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
    """The trained model, its tokenizer and the checkpoint's run settings, ready to generate."""
    checkpoint = load_checkpoint(path)
    run = RunConfig.from_dict(checkpoint["run"])
    model = GPTModel(run.model)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return model, tokenizer_from_spec(checkpoint["tokenizer_spec"]), checkpoint["run"]


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


def pretrain(run: RunConfig, stop: StopRequest | None = None) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    """Train a GPT as `run` says, writing the run directory; returns (model, tokenizer, metrics, dir)."""
    checkpoint = load_checkpoint(run.resume) if run.resume else None
    device = pick_device(run.device)
    run_dir = choose_run_dir(run)
    torch.manual_seed(run.seed)

    text = load_text(run.data)
    data_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if checkpoint is not None and checkpoint["data_sha256"] != data_sha256:
        raise ConfigError(f"the training text differs from the one the run in {run_dir} started "
                          "with; resume with the same --data, or start a new run.")
    train_text, val_text = split_text(text, train_ratio=0.9)
    tokenizer_start = time.perf_counter()
    if checkpoint is not None:
        tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
    else:
        # A trained BPE learns from the training split only, so validation text stays unseen;
        # a character vocabulary needs every character of both splits to encode them.
        try:
            tokenizer = get_tokenizer(run.tokenizer, text=train_text if run.tokenizer == "train" else text,
                                      vocab_size=run.bpe_vocab_size)
        except ConfigError as err:
            if run.tokenizer != "train":
                raise
            raise ConfigError(f"training a BPE of BPE_VOCAB_SIZE (or --vocab-size) = {run.bpe_vocab_size} "
                              f"tokens on the training split: {err}") from None
    tokenizer_note = describe_tokenizer(tokenizer, run, time.perf_counter() - tokenizer_start,
                                        resumed=checkpoint is not None)
    run = replace(run, model=replace(run.model, vocab_size=tokenizer.vocab_size))
    cfg = run.train
    try:  # the per-epoch sample must not fail after an epoch of training: check its prompt now
        text_to_token_ids(cfg.start_context, tokenizer)
    except ConfigError as err:
        raise ConfigError(f"start_context {cfg.start_context!r} cannot be encoded: {err} "
                          "Or set custom_params['start_context'] to text from the corpus.") from None

    # "<|endoftext|>" written in the corpus separates documents: encode it as its token.
    train_ids = tokenizer.encode(train_text, allowed_special="all")
    val_ids = tokenizer.encode(val_text, allowed_special="all")
    shape = dict(batch_size=cfg.batch_size, max_length=cfg.max_length, stride=cfg.stride,
                 num_workers=cfg.num_workers, seed=run.seed)
    loaders = Loaders(
        train=create_dataloader(train_ids, shuffle=True, drop_last=True, name="the training split (90%)", **shape),
        train_eval=create_dataloader(train_ids, shuffle=False, drop_last=False, name="the training split", **shape),
        val=create_dataloader(val_ids, shuffle=False, drop_last=False, name="the validation split (10%)", **shape))
    steps_per_epoch = len(loaders.train)
    total_steps = steps_per_epoch * cfg.num_epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    model = GPTModel(run.model).to(device)
    optimizer = make_optimizer(model, cfg)
    state = TrainState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = TrainState(**checkpoint["state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        if state.epoch >= cfg.num_epochs or state.global_step >= total_steps:
            raise ConfigError(f"the run in {run_dir} already finished {state.global_step} steps "
                              f"({state.epoch} epochs); raise --epochs (or --max-steps, if it set "
                              "one) to train it further.")

    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, BPETokenizer) and tokenizer.source != "gpt2":
        tokenizer.save(run_dir / TOKENIZER_NAME)  # readable, and reusable: TOKENIZER = "<run>/tokenizer.bpe"
    print_header(run, device, model, tokenizer, tokenizer_note, text, train_ids, val_ids,
                 steps_per_epoch, total_steps, run_dir, state)
    extra = {"tokenizer_spec": tokenizer.spec(), "data_sha256": data_sha256}

    def save(completed: bool, final: tuple[float, float] | None = None) -> dict[str, Any]:
        save_checkpoint(run_dir / CHECKPOINT_NAME, model, optimizer, state, run, extra)
        metrics = make_metrics(state, model, device, completed, final)
        write_run_files(run_dir, run, metrics, extra, len(train_ids), len(val_ids))
        return metrics

    with (stop or StopRequest()) as stop:
        completed = train_loop(model, optimizer, loaders, device, cfg, state, total_steps, tokenizer,
                               log_every=run.log_every, stop=stop,
                               on_epoch_end=lambda: save(completed=False))
    final = None
    if completed:  # measure the finished model on every window of both splits
        final = evaluate_model(model, loaders.train_eval, loaders.val, device, eval_iter=None)
    metrics = save(completed, final)
    print_summary(metrics, run_dir, completed)
    return model, tokenizer, metrics, run_dir


def make_metrics(state: TrainState, model: GPTModel, device: torch.device, completed: bool,
                 final: tuple[float, float] | None) -> dict[str, Any]:
    """The numbers a run reports: final and best losses, perplexity, speed, and histories."""
    if final is not None:
        final_train, final_val = final
    else:  # stopped early: the last periodic evaluation is the latest measurement
        final_train = state.train_losses[-1] if state.train_losses else None
        final_val = state.val_losses[-1] if state.val_losses else None
    val_points = state.val_losses + ([final_val] if final_val is not None else [])
    return {
        "completed": completed,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "best_val_loss": min(val_points) if val_points else None,
        "perplexity": math.exp(final_val) if final_val is not None else None,
        "tokens_per_sec": state.tokens_seen / state.train_time_s if state.train_time_s else None,
        "elapsed_s": state.elapsed_s,
        "train_time_s": state.train_time_s,
        "total_tokens": state.tokens_seen,
        "steps": state.global_step,
        "epochs_completed": state.epoch,
        "num_parameters": model.num_parameters(),
        "device": str(device),
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
    config = {**run.to_dict(), "data_path": str(Path(run.data).resolve()) if run.data else str(VERDICT_PATH),
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


def print_header(run: RunConfig, device: torch.device, model: GPTModel, tokenizer, tokenizer_note: str,
                 text: str, train_ids: list[int], val_ids: list[int], steps_per_epoch: int,
                 total_steps: int, run_dir: Path, state: TrainState) -> None:
    cfg, m = run.train, run.model
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    schedule = cfg.lr_schedule + (f", {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else "")
    rows = [
        ("device", f"{device}{threads}, torch {torch.__version__}"),
        ("model", f"{run.model_name}: {m.n_layers} layers, {m.n_heads} heads, emb_dim {m.emb_dim}, "
                  f"context {m.context_length}, vocab {m.vocab_size:,}, dropout {m.drop_rate}, "
                  f"qkv_bias {m.qkv_bias}, tied head {m.tie_weights}"),
        ("parameters", f"{model.num_parameters():,} ({model.num_parameters(exclude_output_head=True):,} "
                       f"without the output head); {model.parameter_memory_bytes() / 2**20:,.1f} MiB in fp32"),
        ("tokenizer", tokenizer_note),
        ("data", f"{Path(run.data).name if run.data else VERDICT_PATH.name}: {len(text):,} characters, "
                 f"{len(train_ids) + len(val_ids):,} tokens ({tokenizer.name}); "
                 f"train {len(train_ids):,} / validation {len(val_ids):,} tokens"),
        ("batches", f"{cfg.batch_size} x {cfg.max_length} tokens, stride {cfg.stride}; "
                    f"{steps_per_epoch} steps per epoch"),
        ("training", f"{cfg.num_epochs} epoch(s), {total_steps} steps; AdamW lr {cfg.learning_rate:g} "
                     f"({schedule}), weight decay {cfg.weight_decay}, grad clip {cfg.grad_clip}"),
        ("evaluation", f"every {cfg.eval_freq} steps on {cfg.eval_iter} batches per split; "
                       f"sample from {cfg.start_context!r} each epoch"),
        ("seed", str(run.seed)),
        ("run directory", str(run_dir) + (f" (resuming at step {state.global_step})" if state.global_step else "")),
    ]
    print(f"\nminigpt | {run.task} | {run.mode} mode")
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(flush=True)


def print_summary(metrics: dict[str, Any], run_dir: Path, completed: bool) -> None:
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    status = "finished" if completed else "stopped early (resume with --resume " + str(run_dir) + ")"
    print(f"\ntraining {status}")
    print(f"  final train loss   {fmt(metrics['final_train_loss'])}")
    print(f"  final val loss     {fmt(metrics['final_val_loss'])}  (best {fmt(metrics['best_val_loss'])})")
    print(f"  val perplexity     {fmt(metrics['perplexity'], ',.1f')}")
    print(f"  tokens seen        {metrics['total_tokens']:,} in {metrics['steps']:,} steps")
    print(f"  throughput         {fmt(metrics['tokens_per_sec'], ',.0f')} tokens/s (training steps only)")
    print(f"  wall time          {metrics['elapsed_s']:.1f} s")
    files = ["checkpoint.pt", "config.json", "metrics.json", "training_losses.png"]
    if (run_dir / TOKENIZER_NAME).is_file():
        files.append(TOKENIZER_NAME)
    print(f"  wrote              {run_dir}/: {', '.join(files)}")
