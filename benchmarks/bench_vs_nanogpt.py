"""A race with the real nanoGPT on its own headline CPU run: Tiny Shakespeare, character by character.

nanoGPT's README trains its Shakespeare character model on a CPU with

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

and minigpt's README gives the same run as one `python main.py` command (MINIGPT_ARGS below:
the `gpt-char` preset is nanoGPT's model, with its tied head, no biases and exact GELU; the same
schedule and evaluations; one difference, measured in chapter 9: minigpt reads the text as it
does by default, every 64-character window once per epoch in a shuffled order, where nanoGPT
draws each batch's windows at random positions, with replacement). This
script runs both commands as users run them, each in a fresh process, on the same text, with
the same seeds and threads, taking turns (nanoGPT first for one seed, minigpt first for the
next), and reports for each:

- the whole process's wall time (start-up, data, training, evaluations, files), and the
  milliseconds per training iteration, evaluations excluded;
- the validation loss of the final weights on every 64-token window of the validation split,
  and on the same 20 fixed batches of 12 random windows (nanoGPT's estimate, drawn once);
- the evaluation work each run did on its own (windows scored while training and at the end).

Get nanoGPT with `git clone https://github.com/karpathy/nanoGPT` (it needs numpy and requests);
the script copies what it runs into a temporary folder and prepares nanoGPT's data there with
nanoGPT's own prepare.py, from minigpt's copy of Tiny Shakespeare (no download). nanoGPT has
no seed setting: its `torch.manual_seed(1337)` is redirected to each seed in turn (1337 itself
runs it untouched).

    python benchmarks/bench_vs_nanogpt.py --nanogpt ~/nanoGPT                  # 3 seeds, 1 thread
    python benchmarks/bench_vs_nanogpt.py --nanogpt ~/nanoGPT --seeds 1337 --iters 300   # a quick look

Without --nanogpt, a re-implementation of nanoGPT written in benchmarks/nanogpt_reimplementation.py
races instead, in one process: a fallback, labelled as such in its table, not the peer itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.data import corpus_path, read_text, split_text  # noqa: E402
from minigpt.runs import load_model  # noqa: E402

BLOCK, BATCH, EVAL_BATCHES = 64, 12, 20
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0"]
# The README's command (README.md, "Shakespeare character by character, as nanoGPT trains it").
MINIGPT_ARGS = ["--data", "tinyshakespeare", "--tokenizer", "char", "--model", "gpt-char", "--context-length", "64",
                "--batch-size", "12", "--lr", "1e-3", "--epochs", "2", "--warmup-steps", "100",
                "--min-lr", "1e-4", "--beta2", "0.99", "--eval-freq", "250", "--eval-iter", "20"]

# Runs nanoGPT's train.py unchanged in this process, its seed redirected, then keeps its final weights.
NANOGPT_WRAPPER = """
import runpy, sys, torch
seed, out = int(sys.argv[1]), sys.argv[2]
manual_seed = torch.manual_seed
torch.manual_seed = lambda value: manual_seed(seed if value == 1337 else value)
sys.argv = ["train.py", *sys.argv[3:]]
run = runpy.run_path("train.py", run_name="__main__")
torch.save({"model_args": run["model_args"], "model": run["raw_model"].state_dict()}, out + "/final.pt")
"""


@dataclass
class Race:
    """One side's run: what it printed, how long it took, and its final weights' losses."""

    wall_s: float
    ms_per_iter: float
    windows_evaluated: int
    val_every_window: float = float("nan")
    val_fixed_batches: float = float("nan")
    own_estimate: float = float("nan")   # the run's own final validation number, as it printed it


# ---------------------------------------------------------------------------------------
# Running each side as its users do
# ---------------------------------------------------------------------------------------

def prepare_nanogpt(checkout: Path, work: Path, text: str) -> None:
    """nanoGPT's files in `work`, and its data made by its own prepare.py from `text`."""
    for name in ("train.py", "model.py", "configurator.py"):
        if not (checkout / name).is_file():
            raise SystemExit(f"error: {checkout} has no {name}; --nanogpt takes a checkout of "
                             "https://github.com/karpathy/nanoGPT")
        shutil.copy(checkout / name, work / name)
    shutil.copytree(checkout / "config", work / "config")
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    shutil.copy(checkout / "data" / "shakespeare_char" / "prepare.py", data / "prepare.py")
    (data / "input.txt").write_text(text, encoding="utf-8")  # prepare.py downloads only when it is missing
    subprocess.run([sys.executable, str(data / "prepare.py")], check=True, cwd=work, stdout=subprocess.DEVNULL)


def run_timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run `command` to the end, its output to `log`; the wall time in seconds."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command[:3])} ... failed; its output is in {log}:\n"
                         + log.read_text(encoding="utf-8")[-2000:])
    return seconds


def run_nanogpt(work: Path, seed: int, iters: int, env: dict[str, str], out: Path) -> tuple[Race, torch.nn.Module]:
    out.mkdir(parents=True)
    args = [*NANOGPT_ARGS, f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={out}"]
    wall = run_timed([sys.executable, "-c", NANOGPT_WRAPPER, str(seed), str(out), *args], work, env, out / "log.txt")
    log = (out / "log.txt").read_text(encoding="utf-8")
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", log)
    eval_steps = {int(step) for step, _ in evals}
    times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log)
             if int(it) not in eval_steps]  # an iteration's time includes the evaluation before it
    race = Race(wall, statistics.mean(times), len(evals) * 2 * EVAL_BATCHES * BATCH, own_estimate=float(evals[-1][1]))
    return race, load_nanogpt_model(work, out / "final.pt")


def load_nanogpt_model(work: Path, path: Path) -> torch.nn.Module:
    """nanoGPT's own GPT class (its model.py), with the weights its run ended with."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", work / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = torch.load(path, map_location="cpu")
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints the parameter count
        model = module.GPT(module.GPTConfig(**saved["model_args"]))
    model.load_state_dict(saved["model"])
    return model.eval()


def run_minigpt(seed: int, iters: int, env: dict[str, str], out: Path) -> tuple[Race, torch.nn.Module, object]:
    command = [sys.executable, str(ROOT / "main.py"), *MINIGPT_ARGS, "--max-steps", str(iters), "--seed", str(seed),
               "--out", str(out)]
    wall = run_timed(command, ROOT, env, out.parent / f"{out.name}.log")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    model, tokenizer, _ = load_model(out / "checkpoint.pt")
    windows = len(metrics["eval_steps"]) * 2 * EVAL_BATCHES * BATCH + final_windows(out.parent / f"{out.name}.log")
    race = Race(wall, 1000 * metrics["train_time_s"] / metrics["steps"], windows,
                own_estimate=metrics["final_val_loss"])
    return race, model, tokenizer


def final_windows(log: Path) -> int:
    """The windows minigpt's final evaluation scored, from its header's evaluation row."""
    row = re.search(r"every validation window \(([\d,]+)\) and ([\d,]+) training windows|"
                    r"every window of both splits \(([\d,]+) validation, ([\d,]+) training\)",
                    log.read_text(encoding="utf-8"))
    return sum(int(number.replace(",", "")) for number in row.groups() if number) if row else 0


# ---------------------------------------------------------------------------------------
# Scoring both the same way
# ---------------------------------------------------------------------------------------

def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits at every position: nanoGPT's forward gives them all only when given targets."""
    if hasattr(model, "transformer"):  # nanoGPT's GPT
        return model(x, torch.zeros_like(x))[0]
    return model(x)


@torch.no_grad()
def every_window_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean loss per token over every non-overlapping 64-token window of `ids`."""
    starts = torch.arange(0, len(ids) - BLOCK, BLOCK)
    total, count = 0.0, 0
    for chunk in starts.split(64):
        x = torch.stack([ids[s:s + BLOCK] for s in chunk])
        y = torch.stack([ids[s + 1:s + 1 + BLOCK] for s in chunk])
        total += F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.no_grad()
def fixed_batches_loss(model: torch.nn.Module, ids: torch.Tensor, seed: int = 1337) -> float:
    """nanoGPT's estimate: the mean loss of 20 batches of 12 random windows, drawn here once for both."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(EVAL_BATCHES):
        ix = torch.randint(len(ids) - BLOCK, (BATCH,), generator=generator)
        x = torch.stack([ids[i:i + BLOCK] for i in ix])
        y = torch.stack([ids[i + 1:i + 1 + BLOCK] for i in ix])
        losses.append(F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def score(race: Race, model: torch.nn.Module, val_ids: torch.Tensor) -> Race:
    race.val_every_window = every_window_loss(model, val_ids)
    race.val_fixed_batches = fixed_batches_loss(model, val_ids)
    return race


# ---------------------------------------------------------------------------------------
# The race
# ---------------------------------------------------------------------------------------

def race(args: argparse.Namespace) -> dict[str, list[Race]]:
    text = read_text(corpus_path("tinyshakespeare"))
    val_text = split_text(text, 0.9)[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT)}
    results: dict[str, list[Race]] = {"nanoGPT": [], "minigpt": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "nanogpt"
        work.mkdir()
        prepare_nanogpt(Path(args.nanogpt).expanduser(), work, text)
        nano_val = torch.from_numpy(np.fromfile(work / "data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64))
        for index, seed in enumerate(args.seeds):
            sides = ["nanoGPT", "minigpt"] if index % 2 == 0 else ["minigpt", "nanoGPT"]
            for side in sides:
                if side == "nanoGPT":
                    result, model = run_nanogpt(work, seed, args.iters, env, Path(tmp) / f"nanogpt-{seed}")
                    results[side].append(score(result, model, nano_val))
                else:
                    result, model, tokenizer = run_minigpt(seed, args.iters, env, Path(tmp) / f"minigpt-{seed}")
                    results[side].append(score(result, model, torch.tensor(tokenizer.encode(val_text))))
                r = results[side][-1]
                print(f"  seed {seed:>5} {side:<8} wall {r.wall_s:6.1f} s  {r.ms_per_iter:5.1f} ms/iter  "
                      f"val {r.val_every_window:.4f} (every window) / {r.val_fixed_batches:.4f} (fixed batches)",
                      flush=True)
    return results


def spread(values: list[float], digits: int) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 \
        else f"{mean:.{digits}f}"


def print_table(results: dict[str, list[Race]], seeds: list[int], iters: int) -> None:
    nano = results["nanoGPT"]
    print(f"\nmean [min-max] over seeds {', '.join(map(str, seeds))}; {iters} iterations of 12 x 64 characters")
    print("| run | wall time, s | ms/iteration | validation loss, every window | on 20 fixed batches | "
          "own final estimate | windows evaluated | nanoGPT wall ÷ this |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        ratios = [n.wall_s / r.wall_s for n, r in zip(nano, runs)]
        print(f"| {name} | {spread([r.wall_s for r in runs], 1)} | {spread([r.ms_per_iter for r in runs], 1)} | "
              f"{spread([r.val_every_window for r in runs], 4)} | {spread([r.val_fixed_batches for r in runs], 4)} | "
              f"{spread([r.own_estimate for r in runs], 4)} | {runs[0].windows_evaluated:,} | "
              f"{spread(ratios, 2)}× |")
    gap = statistics.mean(r.val_every_window for r in results["minigpt"]) - \
        statistics.mean(r.val_every_window for r in nano)
    print(f"\nminigpt's validation loss minus nanoGPT's (every window, mean over seeds): {gap:+.4f}. "
          "Wall time is the whole process; ms/iteration leaves out the evaluations. nanoGPT's own estimate "
          "is its last 20-batch validation number (before its 2,001st step); minigpt's is every window.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", metavar="DIR", help="a checkout of karpathy/nanoGPT (without it: the fallback)")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every run (default 1)")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[1337, 1, 2],
                        help="comma-separated seeds (default 1337,1,2)")
    args = parser.parse_args()
    if args.nanogpt is None:
        from nanogpt_reimplementation import fallback_race
        print("no --nanogpt checkout: racing the in-script re-implementation of nanoGPT (a fallback, "
              "not the peer; git clone https://github.com/karpathy/nanoGPT and pass --nanogpt DIR)")
        fallback_race(args)
        return
    print(f"torch {torch.__version__}, cpu, {args.threads} thread(s) per run; nanoGPT from {args.nanogpt}")
    results = race(args)
    print_table(results, args.seeds, args.iters)


if __name__ == "__main__":
    main()
