"""Shared test setup: offline data, small models, and the repository root on sys.path."""

import contextlib
import functools
import http.server
import os
import sys
import threading
from pathlib import Path

# Tiny test models run fastest on one thread, and on a shared 2-core machine more threads can
# be many times slower. Set before torch loads; subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Property tests draw the same examples on every run (a failure in CI reproduces locally)
# and write no example database into the checkout.
hypothesis_settings.register_profile("minigpt", derandomize=True, database=None)
hypothesis_settings.load_profile("minigpt")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# tiktoken reads GPT-2's files from this cache instead of downloading them (CI has no internet),
# and minigpt finds GPT-2's encoder.json and vocab.bpe in SHARED_DATA/gpt2 the same way.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken_cache")
if "MINIGPT_CACHE_DIR" not in os.environ and (SHARED_DATA / "gpt2").is_dir():
    os.environ["MINIGPT_CACHE_DIR"] = str(SHARED_DATA)


def find_verdict() -> Path | None:
    for path in (ROOT / "the-verdict.txt", SHARED_DATA / "the-verdict.txt"):
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def verdict_text() -> str:
    path = find_verdict()
    if path is None:
        pytest.skip("the-verdict.txt is not available offline (run main.py once, or put ../shared beside the checkout)")
    return path.read_text(encoding="utf-8")


@pytest.fixture
def tiny_cfg():
    from minigpt.config import GPTConfig

    return GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def loopback_server(handler):
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler`, in a thread; `.url` is its address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on loopback serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    with loopback_server(handler) as server:
        yield served, server.url
