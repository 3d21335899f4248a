"""Did a change slow training down, or change what it computes? Quick-mode pretraining in this
working tree against the same run at an earlier git revision, interleaved in fresh processes.

    python benchmarks/bench_against_revision.py --base 4cc07c9          # the landed tree before issue 22
    python benchmarks/bench_against_revision.py --base HEAD~3 --models gpt-mini halting-tiny --repeats 4

Each repeat runs the revision, then this tree, one process each at one thread, on the-verdict
for two epochs (72 steps); the table gives the median training throughput (tokens/s of the
training steps, evaluation excluded) of each, their ratio, and both final validation losses
(equal when the change kept the computation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

# Where pretrain and resolve_run_config live: this tree's layout, then the one before issue 22.
RUN = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
try:
    from minigpt.settings import resolve_run_config
    from minigpt.task_pretrain import pretrain
except ImportError:
    from minigpt.config import resolve_run_config
    from minigpt.train import pretrain
run = resolve_run_config({"LOG_EVERY": 10**6, "MODEL": sys.argv[2]},
                         {"out": sys.argv[3], "data": sys.argv[4], "device": "cpu", "num_epochs": 2})
metrics = pretrain(run)[2]
print(json.dumps([metrics["tokens_per_sec"], metrics["final_val_loss"]]))
"""


def export_revision(revision: str, folder: Path) -> Path:
    """The package, main.py and config_run.py at `revision`, unpacked into `folder`."""
    archive = subprocess.run(["git", "archive", revision, "minigpt", "main.py", "config_run.py"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def train(root: Path, model: str, out: Path, text: Path) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUN, str(root), model, str(out), str(text)], cwd=root, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the run in {root} failed:\n{done.stderr[-2000:]}")
    tokens_per_sec, val_loss = json.loads(done.stdout.strip().splitlines()[-1])
    return tokens_per_sec, val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with, e.g. HEAD~1 or a hash")
    parser.add_argument("--models", nargs="+", default=["gpt-mini"], help="model presets (quick mode's settings)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved runs of each tree per model")
    args = parser.parse_args()
    text = DATA / "the-verdict.txt" if (DATA / "the-verdict.txt").is_file() else ROOT / "the-verdict.txt"
    print(f"quick-mode pretraining, 2 epochs of {text.name}, 1 thread, {args.repeats} interleaved runs each; "
          f"torch {__import__('torch').__version__}")
    print(f"{'model':<14} {args.base + ' tok/s':>16} {'this tree tok/s':>16} {'ratio':>7} "
          f"{args.base + ' val loss':>18} {'this tree val loss':>19}")
    with tempfile.TemporaryDirectory(prefix="minigpt-ab-") as tmp:
        base = export_revision(args.base, Path(tmp) / "base")
        for model in args.models:
            ours, theirs = [], []
            for i in range(args.repeats):
                theirs.append(train(base, model, Path(tmp) / f"base-{model}-{i}", text))
                ours.append(train(ROOT, model, Path(tmp) / f"ours-{model}-{i}", text))
            old = statistics.median(t for t, _ in theirs)
            new = statistics.median(t for t, _ in ours)
            print(f"{model:<14} {old:>16,.0f} {new:>16,.0f} {new / old:>7.3f} {theirs[0][1]:>18.6f} "
                  f"{ours[0][1]:>19.6f}")


if __name__ == "__main__":
    main()
