"""Downloads, once: the cache folder and a download that resumes and checks its SHA-256.

The bottom layer beside `config`: it imports no torch, so `minigpt.tokenizer` (chapter 2)
can fetch GPT-2's files without loading PyTorch.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

from minigpt.config import ConfigError


def cache_dir() -> Path:
    """Where downloads are kept: $MINIGPT_CACHE_DIR, else ~/.cache/minigpt."""
    if os.environ.get("MINIGPT_CACHE_DIR"):
        return Path(os.environ["MINIGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt"


def download_file(url: str | Iterable[str], path: str | Path, sha256: str | None = None,
                  timeout: float = 30.0) -> Path:
    """Download `url` to `path` (once), checking its SHA-256 when one is given; several URLs are
    mirrors of one file, tried in order.

    The bytes go to `<path>.part`, renamed into place only when complete and verified. A
    broken download keeps that part, and the next call resumes it with an HTTP Range request:
    a 6 GB file that breaks at 90% should not start again from zero.
    """
    import requests

    urls = [url] if isinstance(url, str) else list(url)
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    unreachable, wrong = [], []
    for url in urls:
        try:
            digest = _download_part(url, part, timeout, check=sha256 is not None)
        except requests.RequestException as err:
            unreachable.append(f"{url} ({type(err).__name__}: {err})")
            continue
        if sha256 is None or digest == sha256:
            os.replace(part, path)
            return path
        part.unlink()  # another file than the one expected: try the next address
        wrong.append(f"the file downloaded from {url} has SHA-256 {digest}, expected {sha256}")
    if wrong:
        raise ConfigError(f"{'; '.join(wrong)}; the download was corrupted or the file changed. Try again, "
                          f"or place a correct copy at {path}.")
    kept = part.stat().st_size if part.exists() else 0
    resume = (f"{kept:,} bytes are kept in {part}; run the same command again to resume "
              "the download. " if kept else "")
    raise ConfigError(
        f"could not download {'; nor '.join(unreachable)}. {resume}If you are offline, "
        f"download the file elsewhere and place it at {path}.") from None


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
