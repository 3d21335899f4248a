"""What every run needs, whatever its task: a device, a run directory of its own, Ctrl-C that
saves, checkpoints that resume exactly (weights, optimizer, random state), the models a run
starts from (`load_model`, `starting_point`), its metrics and files, and what the console shows
before and after.

The task pipelines (`minigpt.task_*`) are built from these pieces; the chapter modules below
know nothing of runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minigpt.config import ALIGN_TASKS, PRETRAINED_NAMES, ConfigError, RunConfig, TrainConfig
from minigpt.finetune import build_model, merge_and_unload
from minigpt.generation import Ensemble
from minigpt.model import GPTModel
from minigpt.rlhf import add_reward_head
from minigpt.scale import Distributed, ScaledSetup, accumulation_steps, peak_memory_mib, precision_reason
from minigpt.tokenizer import get_tokenizer, tokenizer_from_spec
from minigpt.train import TrainState

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the weights at the lowest validation loss of the periodic evaluations
TOKENIZER_NAME = "tokenizer.bpe"
CHECKPOINT_FORMAT = "minigpt-checkpoint-v1"


# ---------------------------------------------------------------------------------------
# Where a run happens
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


def refuse_several_processes(task: str) -> None:
    """Fine-tuning and alignment run in one process; torchrun is for pretraining."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{task} runs in one process (torchrun is for pretraining); start it with "
                          f"python main.py --task {task}.")


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


# ---------------------------------------------------------------------------------------
# Checkpoints and random state
# ---------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: Any, run: RunConfig, extra: dict[str, Any] | None = None,
                    rng: dict[str, Any] | None = None, scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write everything needed to rebuild the model and to continue training exactly.

    Written to a temporary file and renamed, so an interruption never leaves a broken file.
    `state` is the loop's dataclass (`TrainState`, or alignment's `AlignState`); `rng` defaults to
    this process's random state (see `rng_states` for several processes). `extra` holds what else
    rebuilding needs: the tokenizer's spec, the data's fingerprint, a classifier's class names ...
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "run": run.to_dict(),
        "tokenizer_spec": None,
        "data_sha256": None,
        **(extra or {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "rng": rng or rng_states(Distributed()),
        "scaler": scaler.state_dict() if scaler else None,
    }
    return _save_atomically(checkpoint, Path(path))


def save_weights(path: str | Path, model: torch.nn.Module, run: RunConfig, extra: dict[str, Any] | None = None) -> Path:
    """A checkpoint of the weights alone (no optimizer, no random state): what `load_model` needs to
    generate, evaluate or fine-tune from. A run keeps its best weights this way, as best.pt."""
    checkpoint = {"format": CHECKPOINT_FORMAT, "run": run.to_dict(), "tokenizer_spec": None, "data_sha256": None,
                  **(extra or {}), "model": model.state_dict()}
    return _save_atomically(checkpoint, Path(path))


def _save_atomically(checkpoint: dict[str, Any], path: Path) -> Path:
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
    if torch.cuda.is_available() and mine.get("cuda"):
        torch.cuda.set_rng_state_all(mine["cuda"])


def restore_training(checkpoint: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     setup: ScaledSetup) -> None:
    """Continue where a checkpoint stopped: its weights, optimizer moments, random state and fp16 scale."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_rng(checkpoint["rng"], setup.world)
    if setup.scaler is not None and checkpoint.get("scaler"):
        setup.scaler.load_state_dict(checkpoint["scaler"])


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


# ---------------------------------------------------------------------------------------
# The models a run starts from
# ---------------------------------------------------------------------------------------

def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPTModel, Any, dict[str, Any]]:
    """The trained model, its tokenizer and the checkpoint's run settings, ready to generate.

    A fine-tuned run (chapter 7) comes back as it was trained (with its classification head),
    its LoRA adapters merged into the weights. The run settings then also hold "labels".
    A reward model (chapter 8) comes back with its scalar head.
    """
    checkpoint = load_checkpoint(path)
    run = RunConfig.from_dict(checkpoint["run"])
    saved = checkpoint["run"]
    if run.finetune is not None:
        model = build_model(run, checkpoint.get("labels"))
        model.load_state_dict(checkpoint["model"])
        model = merge_and_unload(model)
        saved = {**saved, "labels": checkpoint.get("labels")}
    else:
        model = GPTModel(run.model)
        if run.task == "reward":  # one score per position
            add_reward_head(model)
        model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return model, tokenizer_from_spec(checkpoint["tokenizer_spec"]), saved


def starting_point(run: RunConfig, device: torch.device) -> tuple[GPTModel | None, Any, str]:
    """The weights fine-tuning or alignment starts from (None: new ones), their tokenizer, and a description."""
    if run.checkpoint:
        model, tokenizer, saved = load_model(run.checkpoint, device)
        if saved.get("task") == "classify":
            raise ConfigError(f"{run.checkpoint} holds a classifier; fine-tune from a pretrained or "
                              "instruction-tuned run, or classify texts with it: --task classify "
                              f"--checkpoint {run.checkpoint} --prompt TEXT.")
        return model, tokenizer, f"the minigpt run {run.checkpoint} ({saved['model_name']})"
    if run.pretrained:
        model = GPTModel.from_pretrained(run.pretrained).to(device)
        where = f"OpenAI's {run.pretrained}" if run.pretrained in PRETRAINED_NAMES else f"the GPT-2 in {run.pretrained}"
        return model, get_tokenizer("gpt2"), f"{where} ({model.num_parameters():,} parameters)"
    return None, None, f"new weights ({run.model_name})"


def load_for_generation(run):
    """The model, its tokenizer, a one-line description, and the instruction template if the
    model was instruction-tuned (None otherwise), from a run directory or a pretrained GPT-2."""
    if run.ensemble:  # several runs decode as one
        return load_ensemble(run)
    device = pick_device(run.device)
    if run.checkpoint:
        model, tokenizer, saved = load_model(run.checkpoint, device)
        if saved["task"] == "classify":
            raise ConfigError(f"{run.checkpoint} holds a classifier, which scores classes, not text; "
                              f"classify with --task classify --checkpoint {run.checkpoint} --prompt TEXT.")
        if saved["task"] == "reward":
            raise ConfigError(f"{run.checkpoint} holds a reward model, which scores answers, not text; "
                              f"use it with --task ppo --reward-model {run.checkpoint}.")
        style = (saved["finetune"]["prompt_style"] if saved["task"] == "sft" else
                 saved["align"]["prompt_style"] if saved["task"] in ALIGN_TASKS else None)
        what = f", instruction-tuned ({style} template)" if style else ""
        return model, tokenizer, f"{run.checkpoint} ({saved['model_name']}, {tokenizer.name} tokenizer{what})", style
    model = GPTModel.from_pretrained(run.pretrained).to(device)
    if model.cfg.vocab_size != 50257:
        raise ConfigError(f"{run.pretrained} has a vocabulary of {model.cfg.vocab_size} tokens, not GPT-2's "
                          "50,257, so GPT-2's tokenizer does not fit it; generate from its minigpt run "
                          "directory with --checkpoint instead.")
    size = f"{model.num_parameters() / 1e6:.0f}M parameters"
    return model, get_tokenizer("gpt2"), f"{run.pretrained} ({size}, gpt2 tokenizer)", None


def load_ensemble(run):
    """load_for_generation for several runs (--checkpoint repeated): an `Ensemble` of their models,
    which must share a tokenizer (compared by its saved spec) and an instruction template."""
    checkpoints = [run.checkpoint, *run.ensemble]
    loaded = [load_for_generation(replace(run, checkpoint=checkpoint, ensemble=[])) for checkpoint in checkpoints]
    _, tokenizer, _, style = loaded[0]
    for checkpoint, (_, other_tokenizer, _, other_style) in zip(checkpoints[1:], loaded[1:]):
        if other_tokenizer.spec() != tokenizer.spec():
            names = (f"both {tokenizer.name}, with different vocabularies" if other_tokenizer.name == tokenizer.name
                     else f"{tokenizer.name} and {other_tokenizer.name}")
            raise ConfigError(f"{checkpoints[0]} and {checkpoint} use different tokenizers ({names}); an "
                              "ensemble averages the scores of the same tokens, so give runs trained with "
                              "the same tokenizer.")
        if other_style != style:
            raise ConfigError(f"{checkpoints[0]} and {checkpoint} expect different prompts (instruction "
                              f"template {style} and {other_style}); ensemble runs that read the same template.")
    ensemble = Ensemble([model for model, *_ in loaded], run.ensemble_weights)
    members = ", ".join(f"{source} x {weight:.3g}" for (_, _, source, _), weight in zip(loaded, ensemble.weights))
    return ensemble, tokenizer, f"ensemble of {len(loaded)}: {members}", style


def check_same_data(checkpoint: dict[str, Any] | None, fingerprint: str, run_dir: Path) -> None:
    """A resumed run must train on the data it started with."""
    if checkpoint is not None and checkpoint["data_sha256"] != fingerprint:
        raise ConfigError(f"the data differs from what the run in {run_dir} started with; resume with the "
                          "same --data, or start a new run.")


def fingerprint(items: Any) -> str:
    """Identifies the data, so that a resumed run can check it trains on the same."""
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------
# Metrics and files
# ---------------------------------------------------------------------------------------

def make_metrics(state: TrainState, model: GPTModel, completed: bool, final: tuple[float, float] | None,
                 run: RunConfig, setup: ScaledSetup, compile_note: str = "off") -> dict[str, Any]:
    """The numbers a run reports: final and best losses, perplexity, speed, memory, and histories."""
    if final is not None:
        final_train, final_val = final
    else:  # stopped early: the last periodic evaluation is the latest measurement
        final_train = state.train_losses[-1] if state.train_losses else None
        final_val = state.val_losses[-1] if state.val_losses else None
    val_points = state.val_losses + ([final_val] if final_val is not None else [])
    tokens_per_sec = state.tokens_seen / state.train_time_s if state.train_time_s else None
    tflops = setup.tflops_per_device(tokens_per_sec) if tokens_per_sec and setup.flops_per_token else None
    memory, memory_kind = peak_memory_mib(setup.device)
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
        "device": str(setup.device),
        "processes": setup.world.world_size,
        "precision": setup.precision,
        "compile": compile_note,
        "accumulation_steps": accumulation_steps(run.train, setup.world),
        "eval_steps": state.eval_steps,
        "tokens_seen": state.eval_tokens_seen,
        "train_losses": state.train_losses,
        "val_losses": state.val_losses,
        "batch_losses": state.batch_losses,
        "samples": state.samples,
    }


def write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def write_config(run_dir: Path, run: RunConfig, extra: dict[str, Any]) -> None:
    """config.json: every setting needed to rebuild the model and rerun, with the tokenizer's spec,
    the data's fingerprint and whatever else the task records (`extra`)."""
    write_json(run_dir / "config.json", {**run.to_dict(), **extra, "torch_version": torch.__version__})


# ---------------------------------------------------------------------------------------
# What the console shows
# ---------------------------------------------------------------------------------------

def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """A run's header: a title, then one aligned "key  value" line per row."""
    print(f"\n{title}")
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(flush=True)


def device_row(setup: ScaledSetup, cfg: TrainConfig) -> str:
    """The header's device line: the device (threads or GPU name), torch, processes, precision."""
    device = setup.device
    threads = torch.get_num_threads()
    where = (f" ({threads} thread{'s' if threads > 1 else ''})" if device.type == "cpu" else
             f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    processes = (f"; {setup.world.world_size} processes (torchrun, DDP over "
                 f"{'nccl' if device.type == 'cuda' else 'gloo'})" if setup.world.active else "")
    return f"{device}{where}, torch {torch.__version__}{processes}"


def speed_row(setup: ScaledSetup, cfg: TrainConfig, compile_note: str, fused: bool) -> str:
    """The header's speed line: precision, compile, fused AdamW, TF32, FLOPs per token and MFU's peak."""
    mfu = f"; MFU against {setup.peak_tflops:g} TFLOP/s" if setup.peak_tflops else ""
    return (f"precision {setup.precision}{precision_reason(cfg.precision, setup.device)}, compile {compile_note}, "
            f"fused AdamW {'yes' if fused else 'no'}{', TF32 matmuls' if setup.device.type == 'cuda' else ''}; "
            f"{setup.flops_per_token / 1e6:,.1f} MFLOPs per token{mfu}")


def optimizer_row(cfg: TrainConfig, total_steps: int, what: str = "epoch") -> str:
    """The header's training line: epochs and steps, AdamW and its schedule, decay and clipping."""
    schedule = cfg.lr_schedule + (f", {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else "")
    if cfg.lr_schedule == "cosine":
        schedule += f", down to {0.1 * cfg.learning_rate if cfg.min_lr is None else cfg.min_lr:g}"
    length = f"{cfg.num_epochs} epoch{'s' if cfg.num_epochs > 1 else ''}, " if what == "epoch" else ""
    return (f"{length}{total_steps:,} {'steps' if what == 'epoch' else what}; AdamW lr {cfg.learning_rate:g} "
            f"({schedule}), betas ({cfg.beta1}, {cfg.beta2}), weight decay {cfg.weight_decay}, "
            f"grad clip {cfg.grad_clip}")


def run_dir_row(run_dir: Path, step: int) -> str:
    return str(run_dir) + (f" (resuming at step {step})" if step else "")


def print_summary(metrics: dict[str, Any], run_dir: Path, completed: bool, files: list[str] | None = None) -> None:
    """The lines after training: losses, perplexity, tokens, speed, memory, time and the files written."""
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


def typed_lines():
    """Lines the user types at a "> " prompt, until an empty line, Ctrl-D or Ctrl-C."""
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line.strip():
            return
        yield line
