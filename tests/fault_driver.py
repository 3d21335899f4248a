"""Runs main.py's `main` in a real process with a fault injected at a chosen moment, for
tests/test_nothing_lost.py:

    python tests/fault_driver.py SETTINGS FAULT [main.py flags ...]

SETTINGS is a JSON object put over config_run.py's values (a test's small model); FAULT is one of

    none                      run as main.py would
    SIGINT@final-evaluation   the process signals itself as the final evaluation starts
    SIGTERM@final-evaluation
    SIGINT@checkpoint-write   ... as the first checkpoint.pt is being written
    SIGTERM@checkpoint-write
    wait:PATH                 start when the file PATH exists (two runs started together)
    hang@checkpoint-written   after the first checkpoint.pt is written, print so and wait forever
                              (for a SIGKILL at a known moment)

The peak resident memory is printed last, on stderr, as "peak-rss-mib N".
"""

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config_run  # noqa: E402
import main  # noqa: E402
import minigpt.runs  # noqa: E402
import minigpt.task_pretrain  # noqa: E402


def signal_self_at(module, name: str, signum: int, when=lambda *args: True) -> None:
    """Wrap module.name so that its first call `when(*args)` holds for sends `signum` to this
    process, then goes on."""
    original = getattr(module, name)
    sent = []

    def wrapper(*args, **kwargs):
        if not sent and when(*args):
            sent.append(True)
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def inject(fault: str) -> None:
    if fault == "none":
        return
    if fault.startswith("wait:"):
        while not Path(fault[5:]).exists():
            time.sleep(0.01)
        return
    if fault == "hang@checkpoint-written":
        original = minigpt.task_pretrain.save_checkpoint

        def save_then_hang(path, *args, **kwargs):
            original(path, *args, **kwargs)
            print("checkpoint written", flush=True)
            while True:
                time.sleep(1)

        minigpt.task_pretrain.save_checkpoint = save_then_hang
        return
    what, _, where = fault.partition("@")
    signum = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}[what]
    if where == "final-evaluation":  # the evaluation after the last step (the periodic ones are in train_loop)
        signal_self_at(minigpt.task_pretrain, "evaluate_model", signum)
    elif where == "checkpoint-write":
        signal_self_at(minigpt.runs.torch, "save", signum,  # into checkpoint.pt's temporary file
                       when=lambda value, file: ".checkpoint." in getattr(file, "name", ""))
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    settings, fault, *flags = sys.argv[1:]
    for key, value in json.loads(settings).items():
        setattr(config_run, key, value)
    inject(fault)
    code = main.main(flags)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    print(f"peak-rss-mib {peak:.0f}", file=sys.stderr)
    sys.exit(code)
