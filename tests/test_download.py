"""Resumable downloads, against a loopback HTTP server that can cut a transfer short."""

import hashlib
import http.server
import os
import socket

import pytest

from conftest import loopback_server
from minigpt.config import ConfigError
from minigpt.download import download_file

PAYLOAD = os.urandom(2_500_000)  # over 1 MB, so the progress-bar path runs too


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honouring `Range: bytes=N-` unless told to ignore it."""

    def do_GET(self) -> None:
        server = self.server
        server.ranges_seen.append(self.headers.get("Range"))
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not server.ignore_range:
            start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:  # promise the whole body, send only part of it
            body, server.cut_after = body[:server.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    with loopback_server(RangeHandler) as httpd:
        httpd.ranges_seen, httpd.cut_after, httpd.ignore_range = [], None, False
        httpd.url += "/model.safetensors"
        yield httpd


def part_of(path):
    return path.with_name(path.name + ".part")


def test_clean_download_gives_the_bytes_and_no_part(server, tmp_path):
    """A download that is never interrupted gives the exact bytes and leaves no .part file."""
    target = tmp_path / "model.safetensors"
    assert download_file(server.url, target) == target
    assert target.read_bytes() == PAYLOAD
    assert not part_of(target).exists()
    assert server.ranges_seen == [None]


def test_interrupted_download_keeps_the_part_and_resumes(server, tmp_path):
    """A broken transfer keeps its bytes; the next call asks for the rest and completes the file."""
    target = tmp_path / "model.safetensors"
    server.cut_after = 1_000_000
    with pytest.raises(ConfigError, match="resume") as err:
        download_file(server.url, target, timeout=5)
    assert "1,000,000 bytes" in str(err.value) and str(target) in str(err.value)
    assert part_of(target).stat().st_size == 1_000_000
    assert not target.exists()

    download_file(server.url, target, timeout=5)
    assert server.ranges_seen == [None, "bytes=1000000-"]
    assert target.read_bytes() == PAYLOAD
    assert not part_of(target).exists()


def test_resumed_download_verifies_the_whole_file(server, tmp_path):
    """The SHA-256 covers the kept bytes and the resumed ones together."""
    target = tmp_path / "model.safetensors"
    server.cut_after = 700_000
    sha256 = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(ConfigError):
        download_file(server.url, target, sha256=sha256, timeout=5)
    download_file(server.url, target, sha256=sha256, timeout=5)
    assert target.read_bytes() == PAYLOAD


def test_wrong_checksum_after_resume_leaves_nothing(server, tmp_path):
    """A resumed file that fails its check is deleted, part and all."""
    target = tmp_path / "model.safetensors"
    server.cut_after = 700_000
    with pytest.raises(ConfigError):
        download_file(server.url, target, sha256="0" * 64, timeout=5)
    with pytest.raises(ConfigError, match="SHA-256"):
        download_file(server.url, target, sha256="0" * 64, timeout=5)
    assert not target.exists() and not part_of(target).exists()


def test_server_that_ignores_range_starts_over(server, tmp_path):
    """A 200 answer to a Range request replaces the part instead of appending a second copy."""
    target = tmp_path / "model.safetensors"
    part_of(target).write_bytes(PAYLOAD[:500_000])
    server.ignore_range = True
    download_file(server.url, target, timeout=5)
    assert server.ranges_seen == ["bytes=500000-"]
    assert target.read_bytes() == PAYLOAD


def test_part_longer_than_the_file_is_discarded(server, tmp_path):
    """A 416 (the part is not a prefix of the served file) discards the part and starts over once."""
    target = tmp_path / "model.safetensors"
    part_of(target).write_bytes(PAYLOAD + b"stale")
    download_file(server.url, target, timeout=5)
    assert server.ranges_seen == [f"bytes={len(PAYLOAD) + 5}-", None]
    assert target.read_bytes() == PAYLOAD


def test_ctrl_c_keeps_the_part(server, tmp_path, monkeypatch):
    """Ctrl-C mid-download propagates and keeps the bytes written so far for the next call."""
    import requests

    def one_chunk_then_ctrl_c(response, chunk_size=1, decode_unicode=False):
        yield response.raw.read(300_000)
        raise KeyboardInterrupt

    target = tmp_path / "model.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(requests.Response, "iter_content", one_chunk_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            download_file(server.url, target, timeout=5)
    assert part_of(target).read_bytes() == PAYLOAD[:300_000]
    download_file(server.url, target, timeout=5)
    assert server.ranges_seen == [None, "bytes=300000-"]
    assert target.read_bytes() == PAYLOAD


def test_missing_server_says_where_to_place_the_file(tmp_path):
    """Connection refused: the error says how to put the file in place by hand."""
    with socket.socket() as sock:  # a port that nothing listens on once the socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = tmp_path / "model.safetensors"
    with pytest.raises(ConfigError, match="place it at") as err:
        download_file(f"http://127.0.0.1:{port}/model.safetensors", target, timeout=5)
    assert str(target) in str(err.value)
    assert not target.exists() and not part_of(target).exists()
