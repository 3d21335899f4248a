"""Shared test setup: offline data, small models, and the repository root on sys.path."""

import os
import sys
from pathlib import Path

# Tiny test models run fastest on one thread, and on a shared 2-core machine more threads can
# be many times slower. Set before torch loads; subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# tiktoken reads GPT-2's files from this cache instead of downloading them (CI has no internet).
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken_cache")


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
