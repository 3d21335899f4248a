"""The first run needs no network and no cache: python main.py (quick) and --tokenizer bpe, in a
process whose sockets refuse to connect, with every cache pointed at an empty folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs main.py as `python main.py ...` would, after taking the network away from the process.
NO_NETWORK = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("the network is blocked in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/main.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def first_run(tmp_path, *flags):
    empty = tmp_path / "empty-cache"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(empty), "MINIGPT_CACHE_DIR": str(empty),
           "HF_HOME": str(empty), "XDG_CACHE_HOME": str(empty), "HOME": str(tmp_path),
           "MPLCONFIGDIR": str(tmp_path / "matplotlib")}  # matplotlib's font list is not a download
    return subprocess.run([sys.executable, "-c", NO_NETWORK, str(ROOT), *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
def test_the_first_run_needs_no_network_and_no_cache(tmp_path, tokenizer):
    assert (ROOT / "the-verdict.txt").is_file(), "the-verdict.txt is part of the repository"
    result = first_run(tmp_path, "--tokenizer", tokenizer, "--out", "first")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training finished" in result.stdout
    assert (tmp_path / "first" / "checkpoint.pt").is_file()
    assert not any((tmp_path / "empty-cache").iterdir())  # nothing was fetched or cached


def test_the_network_is_really_blocked_in_that_process(tmp_path):
    """The check above means something only if a download there fails."""
    result = first_run(tmp_path, "--data", "tinyshakespeare", "--out", "other")
    assert result.returncode == 2 and "could not download" in result.stderr
