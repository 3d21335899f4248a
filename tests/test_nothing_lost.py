"""Nothing a user ran is lost at the edges of a run: two runs at once, a stop at any moment, a
full disk, overflowing numbers, broken or mismatched run folders, an absurd model size.

Most cases run real processes (tests/fault_driver.py runs main.py's `main` with a fault injected
at a chosen moment) and compare what they leave with an uninterrupted run.
"""

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from minigpt.config import ConfigError
from minigpt.data import GPTDataset
from minigpt.model import GPTModel
from minigpt.runs import (CHECKPOINT_NAME, EXIT_ERROR, EXIT_FINISHED, EXIT_STOPPED, LOCK_NAME, StopRequest, Stopped,
                          WriteError, choose_run_dir, load_checkpoint, resume_settings, write_atomically, write_json)
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.task_pretrain import pretrain
from minigpt.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "fault_driver.py"

# The small character-level run of test_train.py: 2 epochs of 42 steps, an evaluation every 10.
TINY = dict(
    QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-nano", TOKENIZER="char", SEED=7, LOG_EVERY=1000,
    custom_params=dict(num_epochs=2, batch_size=4, learning_rate=3e-3, eval_freq=10, eval_iter=2,
                       max_length=32, stride=32, start_context="The ", lr_schedule="cosine",
                       warmup_steps=5, grad_clip=1.0,
                       model_overrides=dict(emb_dim=32, n_heads=2, n_layers=2, context_length=32, drop_rate=0.1)))


def with_params(settings=TINY, **params):
    return {**settings, "custom_params": {**settings["custom_params"], **params}}


def driver(fault, *flags, settings=TINY, cwd, limit_file_size=None, wait=True):
    """main.py's `main` in a new process, with `fault` injected (see fault_driver.py)."""
    def limit():  # a disk that fills: writes beyond this many bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    process = subprocess.Popen([sys.executable, "-u", str(DRIVER), json.dumps(settings), fault, *flags], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=limit if limit_file_size else None)
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.fixture
def text_file(tmp_path, verdict_text):
    path = tmp_path / "verdict.txt"
    path.write_text(verdict_text[:6000], encoding="utf-8")
    return path


@pytest.fixture
def straight(tmp_path, text_file):
    """The uninterrupted run every interrupted one must reproduce."""
    _, _, metrics, _ = pretrain(resolve_run_config(TINY, {"out": str(tmp_path / "straight"), "data": str(text_file)}))
    return metrics


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_training(resumed: dict, straight: dict) -> None:
    assert resumed["completed"] and resumed["steps"] == straight["steps"]
    for key in ("batch_losses", "train_losses", "val_losses"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    assert resumed["final_val_loss"] == pytest.approx(straight["final_val_loss"], abs=1e-6)
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], abs=1e-6)


def stray_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name == LOCK_NAME)


# ---------------------------------------------------------------------------------------
# Two runs at once
# ---------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_and_names_the_first(tmp_path, text_file):
    long_run = with_params(num_epochs=200)  # trains until stopped
    first = driver("none", "--data", str(text_file), "--out", "shared", settings=long_run, cwd=tmp_path, wait=False)
    for line in first.stdout:  # training has started: the folder is claimed
        if "run directory" in line:
            break
    code, _, err = driver("none", "--data", str(text_file), "--out", "shared", "--seed", "99", cwd=tmp_path)
    assert code == EXIT_ERROR
    assert "in use by another run" in err and f"pid {first.pid}" in err and "fault_driver.py" in err
    code, _, err = driver("none", "--resume", "shared", cwd=tmp_path)  # nor resumed while it trains
    assert code == EXIT_ERROR and "in use by another run" in err and "then resume it" in err
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode == EXIT_STOPPED
    saved = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert saved["seed"] == 7 and load_checkpoint(tmp_path / "shared")["run"]["seed"] == 7  # only the first's files
    assert stray_files(tmp_path / "shared") == []


def test_two_runs_started_together_on_the_default_folder_take_one_each(tmp_path, text_file):
    go = tmp_path / "go"
    runs = [driver(f"wait:{go}", "--data", str(text_file), "--seed", str(seed), cwd=tmp_path, wait=False)
            for seed in (7, 8)]
    time.sleep(1.0)  # both have imported torch and wait at the line
    go.touch()
    for process in runs:
        process.communicate(timeout=300)
        assert process.returncode == EXIT_FINISHED
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == ["pretrain-custom", "pretrain-custom-2"]
    seeds = set()
    for folder in folders:  # each folder holds one run's files, whole
        seed = json.loads((folder / "config.json").read_text())["seed"]
        assert load_checkpoint(folder)["run"]["seed"] == seed == load_checkpoint(folder / "best.pt")["run"]["seed"]
        assert metrics_of(folder)["steps"] == load_checkpoint(folder)["state"]["global_step"] == 84
        assert stray_files(folder) == []
        seeds.add(seed)
    assert seeds == {7, 8}


def test_a_killed_run_leaves_its_lock_behind_and_resuming_takes_it_over(tmp_path, text_file, straight):
    process = driver("hang@checkpoint-written", "--data", str(text_file), "--out", "killed", cwd=tmp_path,
                     wait=False)
    for line in process.stdout:  # the first epoch's checkpoint is on disk, and the run still holds its folder
        if line.startswith("checkpoint written"):
            break
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    run_dir = tmp_path / "killed"
    assert (run_dir / LOCK_NAME).exists()  # the file stays, its lock died with the process
    code, _, err = driver("none", "--resume", str(run_dir), cwd=tmp_path)
    assert code == EXIT_FINISHED, err
    assert_same_training(metrics_of(run_dir), straight)
    assert stray_files(run_dir) == []


def test_a_folder_without_a_checkpoint_is_never_reused(tmp_path, monkeypatch):
    """A run that diverged in its first epoch leaves best.pt and config.json but no checkpoint.pt."""
    monkeypatch.chdir(tmp_path)
    earlier = Path("runs/pretrain-quick")
    earlier.mkdir(parents=True)
    (earlier / "best.pt").write_bytes(b"weights")
    (earlier / "config.json").write_text("{}")
    run = resolve_run_config({})
    assert choose_run_dir(run) == Path("runs/pretrain-quick-2")
    with pytest.raises(ConfigError, match="ended before its first checkpoint"):
        choose_run_dir(resolve_run_config({}, {"out": str(earlier)}))
    assert (earlier / "best.pt").read_bytes() == b"weights"


# ---------------------------------------------------------------------------------------
# A stop at any moment
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["final-evaluation", "checkpoint-write"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_at_a_bad_moment_leaves_a_run_that_resumes_exactly(tmp_path, text_file, straight, signame,
                                                                        moment):
    run_dir = tmp_path / "run"
    code, out, err = driver(f"{signame}@{moment}", "--data", str(text_file), "--out", str(run_dir), cwd=tmp_path)
    assert code == EXIT_STOPPED, err
    assert "Traceback" not in err and "stopped early" in out
    if moment == "final-evaluation":  # every step was saved; the evaluation is what is left to do
        assert "final evaluation stopped" in out
        assert load_checkpoint(run_dir)["state"]["global_step"] == straight["steps"]
    else:  # the write finished, then the run stopped after the next step
        assert "stopping after this step" in out
        assert load_checkpoint(run_dir)["state"]["global_step"] < straight["steps"]
    assert not metrics_of(run_dir)["completed"] and stray_files(run_dir) == []
    code, out, err = driver("none", "--resume", str(run_dir), cwd=tmp_path)
    assert code == EXIT_FINISHED, err
    assert_same_training(metrics_of(run_dir), straight)


def test_a_stop_before_training_starts_leaves_nothing_behind(tmp_path, text_file, monkeypatch):
    import minigpt.task_pretrain as task_pretrain

    def interrupted(*args, **kwargs):  # Ctrl-C while the model is being built
        stop.requested = True
        raise Stopped("Ctrl-C")

    stop = StopRequest()
    monkeypatch.setattr(task_pretrain, "check_before_building", interrupted)
    run = resolve_run_config(TINY, {"out": str(tmp_path / "new"), "data": str(text_file)})
    with pytest.raises(KeyboardInterrupt):
        pretrain(run, stop)
    assert not (tmp_path / "new").exists()  # the folder it claimed is gone again, lock and all


# ---------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------

def test_a_disk_that_fills_mid_write_keeps_the_last_checkpoint(tmp_path, text_file, straight):
    run_dir = tmp_path / "run"
    code, _, err = driver("SIGINT@checkpoint-write", "--data", str(text_file), "--out", str(run_dir), cwd=tmp_path)
    assert code == EXIT_STOPPED, err
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    steps = load_checkpoint(run_dir)["state"]["global_step"]
    # Resumed where no file may pass half a checkpoint: the next checkpoint's write fails part-way.
    code, _, err = driver("none", "--resume", str(run_dir), cwd=tmp_path, limit_file_size=len(before) // 2)
    assert code == EXIT_ERROR
    assert "Traceback" not in err and f"could not write {run_dir / CHECKPOINT_NAME}: File too large" in err
    assert "MiB free on the disk" in err and "is intact" in err
    assert stray_files(run_dir) == []  # the partial temporary file is gone
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before
    assert load_checkpoint(run_dir)["state"]["global_step"] == steps
    code, _, err = driver("none", "--resume", str(run_dir), cwd=tmp_path)  # room again
    assert code == EXIT_FINISHED, err
    assert_same_training(metrics_of(run_dir), straight)


def test_a_failed_write_names_the_path_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"steps": 1})

    def full_disk(tmp):
        tmp.write_text("{\"steps\"")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*metrics\.json: No space left on device .* MiB free"):
        write_atomically(path, full_disk)
    assert json.loads(path.read_text()) == {"steps": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    with pytest.raises(ZeroDivisionError):  # other failures are not write errors, but leave no file either
        write_atomically(path, lambda tmp: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# ---------------------------------------------------------------------------------------
# Numbers that overflow
# ---------------------------------------------------------------------------------------

def test_a_loss_of_ten_thousand_is_reported_not_a_crash(tmp_path, text_file, monkeypatch, capsys):
    original = GPTModel.forward

    def huge(self, idx, cache=None, details=False):  # logits so confident and wrong that the loss is ~1e4
        output = original(self, idx, cache, details)
        if details:
            output.logits = output.logits * 1e4
            return output
        return output * 1e4

    monkeypatch.setattr(GPTModel, "forward", huge)
    run = resolve_run_config(with_params(num_epochs=1, max_steps=12), {"out": str(tmp_path / "big"),
                                                                        "data": str(text_file)})
    _, _, metrics, run_dir = pretrain(run)
    assert metrics["completed"] and metrics["final_val_loss"] > 709  # e^709 is the largest float
    assert metrics["perplexity"] == float("inf")
    assert "val perplexity     inf" in capsys.readouterr().out

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads((run_dir / "metrics.json").read_text(), parse_constant=strict)  # valid for any reader
    assert saved["perplexity"] == "inf" and saved["final_val_loss"] == metrics["final_val_loss"]


# ---------------------------------------------------------------------------------------
# Broken or mismatched run folders
# ---------------------------------------------------------------------------------------

def stopped_run(tmp_path, text_file, name, settings=TINY):
    """A run stopped after 12 steps, as the studio's Stop button or Ctrl-C leaves one."""
    stop = StopRequest()

    def on_event(event):
        if event.get("step") == 12:
            stop.requested = True

    run = resolve_run_config({**settings, "LOG_EVERY": 1}, {"out": str(tmp_path / name), "data": str(text_file)})
    _, _, metrics, run_dir = pretrain(run, stop, on_event)
    assert not metrics["completed"]
    return run_dir


def test_resuming_with_a_truncated_config_json_uses_the_checkpoint(tmp_path, text_file, capsys):
    run_dir = stopped_run(tmp_path, text_file, "cut")
    text = (run_dir / "config.json").read_text()
    (run_dir / "config.json").write_text(text[:len(text) // 2])  # cut short, as by a full disk before this fix
    run = resolve_resume_config(resume_settings(run_dir), {"resume": str(run_dir)})
    assert "cannot be read" in capsys.readouterr().out
    _, _, metrics, _ = pretrain(run)
    assert metrics["completed"] and json.loads((run_dir / "config.json").read_text())["seed"] == 7


def test_a_checkpoint_from_another_run_is_refused_with_what_differs(tmp_path, text_file):
    mine = stopped_run(tmp_path, text_file, "mine")
    wider = TINY | {"custom_params": {**TINY["custom_params"],
                                      "model_overrides": {**TINY["custom_params"]["model_overrides"], "emb_dim": 48}}}
    other = stopped_run(tmp_path, text_file, "other", wider)
    (mine / CHECKPOINT_NAME).write_bytes((other / CHECKPOINT_NAME).read_bytes())
    with pytest.raises(ConfigError, match=r"describe different runs \(model\.emb_dim: 48 in checkpoint\.pt, 32 in "
                                          r"config\.json"):
        resume_settings(mine)
    assert main.main(["--resume", str(mine)]) == EXIT_ERROR  # a message, not a size-mismatch traceback


def test_a_file_that_is_not_a_checkpoint_gets_our_advice_not_torchs(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"path": Path("x")}, path)  # a pickled Python object that a safe load refuses
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(path)
    assert "never unpickles" in str(caught.value) and "weights_only" not in str(caught.value)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="corrupt or not a minigpt checkpoint"):
        load_checkpoint(path)


def test_an_absurd_model_is_refused_before_its_weights_are_allocated(tmp_path, text_file):
    settings = with_params(model_overrides={**TINY["custom_params"]["model_overrides"], "context_length": 10**9})
    code, _, err = driver("none", "--data", str(text_file), "--out", "absurd", settings=settings, cwd=tmp_path)
    assert code == EXIT_ERROR and "Traceback" not in err
    assert "training needs about" in err and "weights (fp32)" in err  # 10**9 x 32 positions: 122,070 MiB
    peak = int(err.rsplit("peak-rss-mib ", 1)[1])
    assert peak < 1500, f"{peak} MiB: the weights were allocated before the check"
    assert not (tmp_path / "absurd").exists()


# ---------------------------------------------------------------------------------------
# Smaller things
# ---------------------------------------------------------------------------------------

def test_an_unknown_character_does_not_end_an_interactive_session(tmp_path, text_file):
    run_dir = stopped_run(tmp_path, text_file, "chars")
    process = subprocess.run([sys.executable, str(DRIVER), "{}", "none", "--task", "generate", "--checkpoint",
                              str(run_dir), "--max-new-tokens", "5"], input="The \n我们\nThe \n\n", text=True,
                             capture_output=True, timeout=120, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert "character '我' does not occur" in process.stderr
    answers = [text for text in process.stdout.split("> ") if text.strip()]  # after each "> " prompt
    assert len(answers) == 2  # the lines before and after the one it could not read


def test_classify_with_a_language_model_and_a_prompt_is_refused(tmp_path, text_file, monkeypatch, capsys):
    run_dir = stopped_run(tmp_path, text_file, "lm")
    monkeypatch.chdir(tmp_path)
    assert main.main(["--task", "classify", "--checkpoint", str(run_dir), "--prompt", "win a prize"]) == EXIT_ERROR
    assert "holds a pretrain run, not a classifier" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no fine-tuning started


def test_messages_say_what_to_change():
    with pytest.raises(ConfigError) as caught:  # the shortest window is 2 tokens: never "at most 1"
        GPTDataset([1, 2], max_length=4, stride=4)
    assert "at most 1" not in str(caught.value) and "needs 3 tokens" in str(caught.value)
    with pytest.raises(ConfigError, match="at most 9"):
        GPTDataset(list(range(10)), max_length=16, stride=16)
    with pytest.raises(ConfigError) as caught:  # about any text, not only a prompt
        CharTokenizer.from_text("ab").encode("abc")
    assert "prompt" not in str(caught.value) and "use only characters of that text" in str(caught.value)


def test_resuming_on_changed_data_says_the_file_changed(tmp_path, text_file):
    run_dir = stopped_run(tmp_path, text_file, "data")
    text_file.write_text(text_file.read_text() + " more", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        pretrain(resolve_resume_config(resume_settings(run_dir), {"resume": str(run_dir)}))
    assert f"{text_file} has changed" in str(caught.value) and "same --data" not in str(caught.value)


STUDIO_START = """
import json, resource, sys, threading, time
sys.path.insert(0, sys.argv[1])
import minigpt.memory
from minigpt.studio import create_app, presets
minigpt.memory.free_memory_bytes = lambda device: (2 * 2**30, "simulated: 2 GiB free")
client = create_app(sys.argv[2] + "/runs", sys.argv[2] + "/uploads").test_client()
client.environ_base["HTTP_X_MINIGPT_STUDIO"] = "1"  # the page's own header (a request from another site has none)
graph = next(p["graph"] for p in presets() if p["name"] == "gpt2-xl")
run_id = client.post("/api/runs", json={"graph": graph}).get_json()["run_id"]
deadline = time.time() + 120
while any(t.name.startswith("studio-") for t in threading.enumerate()) and time.time() < deadline:
    time.sleep(0.05)  # the training thread has ended
print(json.dumps({**client.get(f"/api/runs/{run_id}").get_json(),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_the_studio_refuses_a_model_too_large_before_allocating_it(tmp_path, verdict_text):
    """gpt2-xl's 1.6 billion weights (6 GB in fp32) on a device with 2 GiB free: before the check ran
    first, the process grew to 6.6 GB to build them and then refused."""
    result = subprocess.run([sys.executable, "-c", STUDIO_START, str(ROOT), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["status"] == "failed" and "training needs about" in info["error"], info
    assert info["peak_mib"] < 1500, f"{info['peak_mib']:.0f} MiB: the weights were allocated before the check"
