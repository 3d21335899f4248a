"""Text in, batches of (input, target) token windows out.

A language model learns to predict each next token, so a training example is a window of
`max_length` token ids and the same window shifted one token to the right. `GPTDataset`
cuts a token stream into such windows every `stride` tokens; `create_dataloader` batches
them in an order fixed by a seed, so that a run, and a resumed run, see the same batches.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from minigpt.config import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The default corpus: Edith Wharton's short story "The Verdict" (public domain), as
# published in the repository of the book "Build a Large Language Model (From Scratch)".
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
               "ch02/01_main-chapter-code/the-verdict.txt")
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_PATH = PROJECT_ROOT / "the-verdict.txt"


# ---------------------------------------------------------------------------------------
# Getting text
# ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where downloads are kept: $MINIGPT_CACHE_DIR, else ~/.cache/minigpt."""
    if os.environ.get("MINIGPT_CACHE_DIR"):
        return Path(os.environ["MINIGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt"


def download_file(url: str, path: str | Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `path` (once), checking its SHA-256 when one is given.

    The bytes go to `<path>.part`, renamed into place only when complete and verified. A
    broken download keeps that part, and the next call resumes it with an HTTP Range request:
    a 6 GB file that breaks at 90% should not start again from zero.
    """
    import requests

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        digest = _download_part(url, part, timeout, check=sha256 is not None)
    except requests.RequestException as err:
        kept = part.stat().st_size if part.exists() else 0
        resume = (f"{kept:,} bytes are kept in {part}; run the same command again to resume "
                  "the download. " if kept else "")
        raise ConfigError(
            f"could not download {url} ({type(err).__name__}: {err}). {resume}If you are offline, "
            f"download the file elsewhere and place it at {path}.") from None
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ConfigError(
            f"the file downloaded from {url} has SHA-256 {digest}, "
            f"expected {sha256}; the download was corrupted or the file changed. "
            f"Try again, or place a correct copy at {path}.")
    os.replace(part, path)
    return path


def _download_part(url: str, part: Path, timeout: float, check: bool) -> str | None:
    """Complete `part` from `url`, resuming from its size; the SHA-256 of all of it if `check`."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    # "identity": no gzip, so Range offsets and Content-Length count the bytes on disk.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        stale = offset > 0 and (status == 416 or status == 206 and _range_start(response) != offset)
        if not stale:
            response.raise_for_status()
            # 200 means the server ignored the range and sends the whole file: start over.
            return _write_part(response, part, offset if status == 206 else 0, check)
    # The part does not fit the file the server has now (416, or another range): start over.
    part.unlink()
    return _download_part(url, part, timeout, check)


def _range_start(response) -> int | None:
    """The first byte of a 206 answer, from its `Content-Range: bytes START-END/TOTAL`."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _write_part(response, part: Path, offset: int, check: bool) -> str | None:
    """Write the response body to `part` after its first `offset` bytes, with a progress bar."""
    import requests
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    if check and offset:
        with open(part, "rb") as kept:
            for block in iter(lambda: kept.read(1 << 20), b""):
                digest.update(block)
    expected = int(response.headers.get("Content-Length", 0))
    total = offset + expected if expected else None
    received = 0
    # We count the bytes ourselves: urllib3's own check would drop the chunk it was reading.
    response.raw.enforce_content_length = False
    with open(part, "ab" if offset else "wb") as file, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=f"downloading {part.stem}",
            disable=total is None or total < 1_000_000, leave=False) as bar:
        for chunk in response.iter_content(chunk_size=1 << 16):
            file.write(chunk)
            if check:
                digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if expected and received < expected:
        raise requests.ConnectionError(f"the connection closed after {received:,} of {expected:,} bytes")
    return digest.hexdigest() if check else None


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with errors that say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no text file at {path} (--data / DATA); check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                          "convert it to UTF-8 first.") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; give a file with some text in it.")
    return text


def load_text(path: str | Path | None = None) -> str:
    """The training text: the file at `path`, or the-verdict.txt (downloaded on first use)."""
    if path is None:
        path = download_file(VERDICT_URL, VERDICT_PATH, sha256=VERDICT_SHA256)
    return read_text(path)


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """The first `train_ratio` of the characters for training, the rest for validation."""
    split_at = int(train_ratio * len(text))
    return text[:split_at], text[split_at:]


# ---------------------------------------------------------------------------------------
# Windows and batches
# ---------------------------------------------------------------------------------------

class GPTDataset(Dataset):
    """Sliding windows over a token stream: input = ids[i : i+L], target = ids[i+1 : i+L+1]."""

    def __init__(self, token_ids: list[int] | torch.Tensor, max_length: int, stride: int,
                 name: str = "the text") -> None:
        self.token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        self.max_length = max_length
        num_tokens = len(self.token_ids)
        if num_tokens < max_length + 1:
            raise ConfigError(
                f"{name} has {num_tokens} tokens, but one training window needs max_length + 1 "
                f"= {max_length + 1}: lower max_length (custom_params['max_length'], now "
                f"{max_length}) to at most {max(num_tokens - 1, 1)}, or use a longer text (--data).")
        # A window starts every `stride` tokens, as long as its target fits in the stream.
        self.starts = range(0, num_tokens - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        window = self.token_ids[start:start + self.max_length + 1]
        return window[:-1], window[1:]  # (max_length,), (max_length,)


class SeededSampler(Sampler[int]):
    """Visits the dataset in an order fixed by (seed, epoch), and can start part-way through.

    The order of epoch e is a permutation drawn from a generator seeded with seed + e (or
    0, 1, 2, ... without shuffling). Knowing the epoch and the number of examples already
    consumed is then enough to continue exactly where an interrupted run stopped.
    """

    def __init__(self, num_examples: int, shuffle: bool = True, seed: int = 0) -> None:
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch `epoch`'s order, skipping its first `start` examples."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.num_examples - self.start


def create_dataloader(token_ids: list[int] | torch.Tensor, batch_size: int = 4, max_length: int = 256,
                      stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                      num_workers: int = 0, seed: int = 0, name: str = "the text") -> DataLoader:
    """Batches of (inputs, targets), each (batch_size, max_length), in a seeded order."""
    dataset = GPTDataset(token_ids, max_length, stride, name=name)
    if drop_last and len(dataset) < batch_size:
        raise ConfigError(
            f"{name} gives {len(dataset)} windows of {max_length} tokens, fewer than one batch "
            f"of batch_size={batch_size}: lower batch_size to at most {len(dataset)}, lower "
            f"max_length or stride, or use a longer text.")
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed)
    # The loader gets a generator of its own so that iterating it never draws from the
    # global random state (which dropout uses): a resumed run then replays exactly.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
