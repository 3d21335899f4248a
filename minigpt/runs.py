"""What every run needs, whatever its task: a device, a run directory of its own (claimed with
a lock, never shared), Ctrl-C that saves, checkpoints that resume exactly (weights, optimizer,
random state), files written whole or not at all, the models a run starts from (`load_model`,
`starting_point`), its metrics, and what the console shows before and after.

The task pipelines (`minigpt.task_*`) are built from these pieces; the chapter modules below
know nothing of runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minigpt.config import ALIGN_TASKS, PRETRAINED_MODELS, ConfigError, RunConfig, TrainConfig
from minigpt.evaluate import perplexity
from minigpt.finetune import build_model, merge_and_unload
from minigpt.generation import Ensemble
from minigpt.hub import load_pretrained, save_pretrained
from minigpt.graph import GraphError, build_graph_model
from minigpt.model import GPTModel, LanguageModel
from minigpt.rlhf import add_reward_head
from minigpt.scale import Distributed, ScaledSetup, accumulation_steps, peak_memory_mib, precision_reason
from minigpt.settings import RESUME_TRAIN_OVERRIDES, start_template
from minigpt.tokenizer import tokenizer_from_spec
from minigpt.train import Diverged, TrainState

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the weights at the lowest validation loss of the periodic evaluations
TOKENIZER_NAME = "tokenizer.bpe"
LOCK_NAME = "run.lock"  # held by the process that trains in the folder; names it (pid, host, command)
CHECKPOINT_FORMAT = "minigpt-checkpoint-v1"
# The files that mean a folder holds a run: a new run never writes into such a folder.
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, "config.json", "metrics.json")
# How main.py ends (README, "Exit codes"): a run stopped by Ctrl-C / SIGTERM / the studio is resumable.
EXIT_FINISHED, EXIT_ERROR, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 2, 3, 130


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


def _folder_of(path: Path) -> Path:
    return path.parent if path.is_file() else path


def choose_run_dir(run: RunConfig) -> Path:
    """Where this run would write: the run it resumes, --out, or the first of runs/<task>-<mode>,
    -2, -3 ... that holds no earlier run and no running one. `RunDirectory` makes it this run's own."""
    if run.resume:
        return _folder_of(Path(run.resume))
    if run.out:
        out = Path(run.out)
        _refuse_earlier_run(out)
        return out
    base = Path("runs") / f"{run.task}-{run.mode}"
    out, n = base, 2
    while _earlier_run_files(out) or held_by_another(out):  # keep earlier default runs: -2, -3, ...
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def _earlier_run_files(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


def _refuse_earlier_run(folder: Path) -> None:
    """A new run writes only into a folder that holds no run: it would mix its files with another's."""
    found = _earlier_run_files(folder)
    if CHECKPOINT_NAME in found:
        raise ConfigError(f"{folder} already holds a run; continue it with --resume {folder}, "
                          "or choose another --out directory.")
    if found:
        raise ConfigError(f"{folder} holds files of an earlier run ({', '.join(found)}) but no {CHECKPOINT_NAME}: "
                          "that run ended before its first checkpoint (it diverged, failed or was killed), so it "
                          "cannot be resumed. Choose another --out directory, or delete that folder to reuse "
                          "the name.")


def held_by_another(folder: Path) -> bool:
    """Whether a run (in another process, or another thread of this one) holds the folder now."""
    if not (folder / LOCK_NAME).exists():
        return False
    probe = _RunLock.try_acquire(folder / LOCK_NAME)
    if probe is None:
        return True
    probe.release()  # a lock file left by a run that died: nobody holds it
    return False


class _RunLock:
    """An exclusive lock on a folder's run.lock, held while a run trains there.

    The operating system's lock (flock on Linux and macOS, msvcrt's on Windows) belongs to the
    open file, so it ends with the process however the process ends: a run killed with SIGKILL
    leaves a run.lock that the next run takes over. The file names its holder for the message
    another run shows.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def try_acquire(cls, path: Path) -> "_RunLock | None":
        """The lock, or None if another process (or another run of this one) holds it."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock_file(fd)
            except OSError:
                os.close(fd)
                return None
            try:  # a holder that finished may have deleted the file as we opened it: lock the one on disk
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return cls(path, fd)
            except FileNotFoundError:
                pass
            os.close(fd)

    def write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"}
        os.ftruncate(self.fd, 0)
        os.write(self.fd, (json.dumps(owner) + "\n").encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a run waiting on this file retries on the new one
        os.close(self.fd)


if os.name == "nt":
    import msvcrt

    def _lock_file(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def _lock_file(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def in_use(folder: Path, resuming: bool) -> ConfigError:
    """The refusal of a folder another run holds, naming that run."""
    instead = "then resume it" if resuming else "or choose another --out directory"
    return ConfigError(f"{folder} is in use by another run, {describe_holder(folder)}; two runs never share a "
                       f"folder: wait for it to end (or stop it with Ctrl-C), {instead}.")


def describe_holder(folder: Path) -> str:
    """Who holds a folder's run.lock, from what the holder wrote in it."""
    try:
        owner = json.loads((folder / LOCK_NAME).read_text())
        return (f"{owner['command']!r} (pid {owner['pid']} on {owner['host']}, started {owner['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class _Taken(Exception):
    """Another run holds the folder, or wrote a run into it first."""


class RunDirectory:
    """A run's folder, claimed for this run alone: `with RunDirectory(run) as run_dir:` (a Path).

    The folder is `choose_run_dir`'s, held by a lock (`_RunLock`) from before the first file is
    written until the run ends, however it ends. Two runs started together on the default folders
    take runs/<task>-<mode> and -2; on the same --out, or resuming the same run, the second is
    refused with the first one's pid and command. A claim nested in one thread (`train_model`
    writing its texts, then `pretrain`) shares the outer one's lock. With several processes
    (torchrun) only the first claims (`lock=True`); the others only read the name. On leaving, a
    folder this run created and left empty is removed; after a stop or a divergence a line says
    what the folder still holds.
    """

    _held = threading.local()  # the folders this thread holds

    def __init__(self, run: RunConfig, lock: bool = True) -> None:
        self.run, self.lock = run, lock
        self.path = Path()
        self._lock: _RunLock | None = None
        self._created = self._owner = False

    def __enter__(self) -> Path:
        held = self._held.__dict__.setdefault("folders", set())
        while True:
            named = self.run.resume or self.run.out  # checked under the lock: "in use" comes first
            self.path = _folder_of(Path(named)) if named and self.lock else choose_run_dir(self.run)
            if os.path.abspath(self.path) in held or not self.lock:  # an outer claim holds it, or rank > 0
                return self.path
            try:
                self._acquire()
            except _Taken:
                if self.run.resume or self.run.out:
                    raise in_use(self.path, resuming=bool(self.run.resume)) from None
                continue  # a default folder another run took first: the next one
            held.add(os.path.abspath(self.path))
            self._owner = True
            return self.path

    def _acquire(self) -> None:
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = _RunLock.try_acquire(self.path / LOCK_NAME)
        except OSError as err:
            self._remove_if_empty()
            raise write_error(self.path / LOCK_NAME, err) from None
        if self._lock is None:
            raise _Taken()
        try:
            if not self.run.resume:  # checked again under the lock: another run may have written here meanwhile
                if _earlier_run_files(self.path) and not self.run.out:
                    raise _Taken()
                _refuse_earlier_run(self.path)
            self._lock.write_owner()
            for stale in self.path.glob(".*.tmp*"):  # left by a writer killed mid-write (SIGKILL, power cut)
                if _TEMPORARY.match(stale.name):
                    stale.unlink()
        except BaseException:
            self._release()
            raise

    def __exit__(self, kind, error, traceback) -> None:
        if not self._owner:
            return
        self._held.folders.discard(os.path.abspath(self.path))
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C or SIGTERM outside the steps, or twice
            tqdm.write(what_is_kept(self.path, stopped=True))
        elif isinstance(error, Diverged):  # main.py prints the message: say there what survives
            error.args = (f"{error} {what_is_kept(self.path, stopped=False)}",)
        self._release()
        self._owner = False

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty: a run stopped before writing anything leaves nothing


def finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` got to its end last time, final measurements included (its
    metrics.json says so); a run stopped during them resumes to take them."""
    try:
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("completed") is True
    except (OSError, ValueError, AttributeError):
        return False


def what_is_kept(run_dir: Path, stopped: bool) -> str:
    """After a run ends early: the checkpoint it can resume from, or that there is none."""
    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return f"nothing to resume in {run_dir}: the run ended before its first checkpoint."
    when = time.strftime("%H:%M:%S", time.localtime(checkpoint.stat().st_mtime))
    return f"{checkpoint} (written at {when}) is intact" + (
        f": python main.py --resume {run_dir} continues from it." if stopped else
        " and loadable (--task generate --checkpoint); a resumed run keeps its learning rate, so retrain with a "
        "lower one.")


class Stopped(KeyboardInterrupt):
    """A stop request (Ctrl-C, SIGTERM) outside the training steps: during setup, the final
    evaluation, or the test answers. The pipeline saves what it has and ends."""


def refuse_several_processes(task: str) -> None:
    """Fine-tuning and alignment run in one process; torchrun is for pretraining."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{task} runs in one process (torchrun is for pretraining); start it with "
                          f"python main.py --task {task}.")


class StopRequest:
    """Ctrl-C (or SIGTERM) asks the run to stop at its next safe point, save and end.

    Inside `deferred()` (the training steps, writing a checkpoint) the request waits for the
    step or the write to finish; elsewhere (setup, the final evaluation) it raises `Stopped` at
    once, and the pipeline saves what it has. A second Ctrl-C interrupts at once, as usual.
    SIGTERM is what `torchrun` and job schedulers send before they kill a process, so it saves
    too. Outside the main thread (where Python cannot install signal handlers, e.g. the studio,
    which sets `requested` itself) only `requested` is read.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.what = "stop"  # what asked: Ctrl-C, SIGTERM
        self._previous: dict[int, Any] = {}
        self._waiting_for: list[str] = []  # the deferred sections now running, innermost last

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, self._previous[signum])  # a second signal behaves as usual
        self.what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if not self._waiting_for:
            raise Stopped(self.what)
        tqdm.write(f"\n{self.what}: stopping {self._waiting_for[-1]} and saving a resumable checkpoint "
                   f"({self.what} again quits at once).")

    @contextlib.contextmanager
    def deferred(self, until: str) -> Iterator[None]:
        """A section a stop request lets finish (`until` says when it stops: "after this step")."""
        self._waiting_for.append(until)
        try:
            yield
        finally:
            self._waiting_for.pop()

    def check(self) -> None:
        """Raise `Stopped` if a stop was asked for while a deferred section ran."""
        if self.requested:
            raise Stopped(self.what)

    def unless_stopped(self, measure: Callable[[], Any], what: str, show: bool = True) -> Any:
        """`measure()` (the measurements after the last step, minutes on a large text), or None if a
        stop request comes first or cuts it short; then a line says that the last step's checkpoint,
        written before, holds every step and that --resume takes `what` again."""
        try:
            self.check()
            return measure()
        except Stopped:
            if show:
                tqdm.write(f"\n{self.what}: {what} stopped; {CHECKPOINT_NAME} holds every training step, and "
                           f"--resume takes {what} again.")
            return None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                if signal.getsignal(sig) == self._handle:
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
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as file:  # through Python's file, so that a full disk is an OSError with its errno
            torch.save(checkpoint, file)
    return write_atomically(path, save)


# ---------------------------------------------------------------------------------------
# Files written whole or not at all
# ---------------------------------------------------------------------------------------

def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` writes the file's content to a temporary file beside `path`, which then
    replaces `path` in one step: readers see the old file or the new one, never part of one.

    The temporary name is unique to this write (two writers never share one), keeps the
    extension (plots choose their format by it), and the file is removed if writing fails or is
    interrupted. A full disk, a quota or a folder that cannot be written becomes one `WriteError`
    that names the path and the free space; the file written before stays as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")  # see _TEMPORARY
    try:  # created here, so that it has the permissions (umask) every other file gets
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise write_error(path, err) from None
    try:
        write(tmp)
        with open(tmp, "r+b") as file:  # on disk before it takes the name: a power cut keeps old or new
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = err if isinstance(err, OSError) else err.__context__  # torch.save wraps the OSError
        if isinstance(err, (OSError, RuntimeError)) and isinstance(cause, OSError):
            raise write_error(path, cause) from None
        raise
    return path


_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp(\.\w+)?$")  # write_atomically's names


class WriteError(ConfigError):
    """A run's file could not be written (a full disk, a quota, permissions); what was there stays."""


def write_error(path: Path, err: OSError) -> WriteError:
    """The message for a file that could not be written: why, how much room is left, what is kept."""
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free on the disk that holds {folder}"
    except OSError:
        free = f"the free space of {folder} is unknown"
    return WriteError(f"could not write {path}: {err.strerror or err} ({free}). Make room or fix the folder's "
                      f"permissions, or choose another --out. {what_is_kept(path.parent, stopped=True)}")


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


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file, or the one inside a run directory, safely (tensors and plain data only).

    `mmap=True` maps the tensors instead of reading them: cheap, for a look at the settings.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; point --resume / --checkpoint at a run "
                          "directory that holds checkpoint.pt (e.g. runs/pretrain-quick).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err):  # pickled Python objects: not ours, and not safe to run
            reason = "it holds Python objects besides tensors and plain data, which minigpt never unpickles"
        raise ConfigError(f"could not read {path}: it is corrupt or not a minigpt checkpoint ({reason}). "
                          "Use another run directory, or delete it and train again.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a minigpt checkpoint (format "
                          f"{checkpoint.get('format') if isinstance(checkpoint, dict) else '?'!r}).")
    return checkpoint


def resume_settings(resume: str | Path) -> dict[str, Any]:
    """The saved settings a run resumes with: checkpoint.pt's own (they built its weights), checked
    against config.json beside it. A config.json that cannot be read (cut short by a full disk) is
    passed over with a note; one that describes another run is refused with what differs."""
    path = Path(resume)
    run_dir = _folder_of(path)
    if held_by_another(run_dir):
        raise in_use(run_dir, resuming=True)
    if not (run_dir / CHECKPOINT_NAME).is_file() and not path.is_file():
        what = "only files of a run that ended before its first checkpoint" if _earlier_run_files(run_dir) else \
            "no checkpoint.pt" if run_dir.is_dir() else "nothing: the folder does not exist"
        raise ConfigError(f"no run to resume in {resume}: it holds {what}. Point --resume at a run directory "
                          "with a checkpoint.pt, such as runs/pretrain-quick.")
    saved = load_checkpoint(path, mmap=True)["run"]
    config = run_dir / "config.json"
    try:
        written = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        tqdm.write(f"note: {config} is missing; resuming with the settings stored in {CHECKPOINT_NAME}.")
        return saved
    except (OSError, UnicodeDecodeError, ValueError) as err:
        tqdm.write(f"note: {config} cannot be read ({type(err).__name__}: {err}); resuming with the settings "
                   f"stored in {CHECKPOINT_NAME}, and the run writes config.json anew.")
        return saved
    differences = _differences(saved, written)
    if differences:
        shown = "; ".join(f"{key}: {a!r} in {CHECKPOINT_NAME}, {b!r} in config.json" for key, a, b in differences[:4])
        raise ConfigError(f"{CHECKPOINT_NAME} and config.json in {run_dir} describe different runs ({shown}"
                          f"{f'; {len(differences) - 4} more' if len(differences) > 4 else ''}). Put back this "
                          f"run's own {CHECKPOINT_NAME}, or delete config.json to resume with the checkpoint's "
                          "settings (change them with flags such as --epochs, not in the file).")
    return {**written, **saved}


# What a resumed run may change (flags on --resume), so the two files may disagree on after a
# resumed run was killed between writing its checkpoint and its config.json.
_MAY_CHANGE = {"resume", "device", *(f"train.{key}" for key in RESUME_TRAIN_OVERRIDES)}


def _differences(saved: dict[str, Any], written: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's, config.json's) for each setting of `saved` the two files disagree on."""
    found = []
    for key, value in saved.items():
        other = written.get(key)
        if prefix + key in _MAY_CHANGE:
            continue
        if isinstance(value, dict) and isinstance(other, dict):
            found += _differences(value, other, f"{prefix}{key}.")
        elif value != other and not (isinstance(value, (list, tuple)) and list(value) == other):
            found.append((prefix + key, value, other))
    return found


# ---------------------------------------------------------------------------------------
# The models a run starts from
# ---------------------------------------------------------------------------------------

def language_model(run: RunConfig) -> LanguageModel:
    """A new model of the run's shape: `GPTModel(run.model)`, or the run's studio graph compiled."""
    if run.graph is None:
        return GPTModel(run.model)
    try:
        return build_graph_model(run.graph, run.model.vocab_size)
    except GraphError as err:
        raise ConfigError(f"the run's studio graph cannot be built: {err}") from None


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
        model = language_model(run)
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
        if saved.get("graph") is not None:
            raise ConfigError(f"{run.checkpoint} holds a studio graph model; fine-tuning and alignment start from "
                              "a GPT (GPTModel). Chat with it or evaluate it (--task generate | evaluate), or build "
                              "the standard GPT chain in the studio to fine-tune it later.")
        return model, tokenizer, f"the minigpt run {run.checkpoint} ({saved['model_name']})"
    if run.pretrained:
        model, tokenizer = load_pretrained(run.pretrained)
        return model.to(device), tokenizer, describe_pretrained(run.pretrained, model, tokenizer)
    return None, None, f"new weights ({run.model_name})"


def describe_pretrained(name: str, model: GPTModel, tokenizer) -> str:
    """One line for a Hugging Face model a run reads: where from, its size, its architecture, its tokenizer."""
    where = f"{PRETRAINED_MODELS[name].repo}" if name in PRETRAINED_MODELS else name
    kind = model.cfg.architecture() or "GPT-2's architecture"
    return (f"{where} ({model.num_parameters():,} parameters, {kind}; "
            f"{tokenizer.name} tokenizer, {tokenizer.vocab_size:,} tokens)")


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
    model, tokenizer = load_pretrained(run.pretrained)
    return model.to(device), tokenizer, describe_pretrained(run.pretrained, model, tokenizer), None


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


def check_same_data(checkpoint: dict[str, Any] | None, fingerprint: str, run_dir: Path, data: str | None) -> None:
    """A resumed run must train on the data it started with (a resumed run reads the same path)."""
    if checkpoint is not None and checkpoint["data_sha256"] != fingerprint:
        where = f"{data} has" if data else "the default data have"
        raise ConfigError(f"the data differs from what the run in {run_dir} started with: {where} changed since "
                          "(its SHA-256 is another). Put the original back to resume, or train on the new data "
                          "in a new run (without --resume).")


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
        "perplexity": perplexity(final_val) if final_val is not None else None,
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


def write_json(path: Path, values: Any) -> None:
    """A JSON file, written atomically; numbers that overflowed (inf, nan) are written as the strings
    "inf", "-inf" and "nan", which every JSON reader accepts."""
    text = json.dumps(_finite(values), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


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


# ---------------------------------------------------------------------------------------
# Hugging Face folders beside a run (EXPORT_HF, --export-hf)
# ---------------------------------------------------------------------------------------

def export_run(path: str | Path, folder: str | Path) -> tuple[Path, GPTModel, dict[str, Any]]:
    """A run's language model (its checkpoint.pt, or a weights file such as best.pt) written with its
    tokenizer as a folder `transformers` loads whole; an instruction-tuned run's template goes with it."""
    model, tokenizer, saved = load_model(path, "cpu")
    if saved["task"] in ("classify", "reward"):
        what = "a classifier, whose head scores classes" if saved["task"] == "classify" else \
            "a reward model, whose head scores answers"
        raise ConfigError(f"{path} holds {what}, not tokens; only language models (pretrained, "
                          "instruction-tuned or aligned runs) export to Hugging Face's causal-LM classes.")
    if saved.get("graph") is not None:
        raise ConfigError(f"{path} holds a studio graph model; transformers has no class for a free wiring of "
                          "blocks, so it stays in minigpt's format (load it with minigpt.runs.load_model). The "
                          "standard GPT chain exports as GPT-2 or Llama.")
    return save_pretrained(model, tokenizer, folder, start_template(saved)), model, saved


def export_hf_folders(run: RunConfig, run_dir: Path, completed: bool) -> None:
    """With EXPORT_HF, hf/final (the last weights) and hf/best (the lowest validation loss, where kept)
    after a finished run, as a Hugging Face trainer leaves them."""
    if not (run.export_hf and completed):
        return
    written = []
    for name, source in (("final", CHECKPOINT_NAME), ("best", BEST_NAME)):
        if (run_dir / source).is_file():
            export_run(run_dir / source, run_dir / "hf" / name)
            written.append(f"hf/{name}")
    print(f"  exported           {run_dir}/: {', '.join(written)} (transformers loads each whole: "
          "AutoModelForCausalLM, AutoTokenizer)")
