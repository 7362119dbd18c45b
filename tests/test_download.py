"""Tests for mfscale.download against a real HTTP server on 127.0.0.1 (never the network)."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mfscale import download
from mfscale.download import fetch_release
from mfscale.errors import DownloadError

U_DATA = b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
U_ITEM = b"1|Toy Story (1995)|01-Jan-1995||http://example.com|0|0|0\n"


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


ML100K_ZIP = make_zip({"ml-100k/u.data": U_DATA, "ml-100k/u.item": U_ITEM})
SMALL_ZIP = make_zip({"ml-latest-small/ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"})


@dataclass
class Server:
    """Routes: path -> (body, mode); mode "ok" or "truncate" (full Content-Length, half the body)."""

    port: int = 0
    routes: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, path: str, body: bytes, mode: str = "ok") -> None:
        self.routes[path] = (body, mode)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            state.requests.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            body, mode = route
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode == "truncate":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def dead_url() -> str:
    """A base URL nothing listens on, to prove a call made no network request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fetch(name: str, cache: Path, server: Server, **kw) -> Path:
    kw.setdefault("base_url", server.url)
    return fetch_release(name, cache, progress=False, timeout=5, **kw)


def assert_nothing_trusted(cache: Path, name: str) -> None:
    assert not (cache / f"{name}.zip").exists()
    assert not (cache / f"{name}.zip.part").exists()
    assert not (cache / name).exists()
    assert not list(cache.glob(f".{name}.extract-*"))


def test_known_release_table() -> None:
    assert download.DEFAULT_BASE_URL == "https://files.grouplens.org/datasets/movielens"
    assert download.RELEASES["ml-100k"] == "0e33842e24a9c977be4e0107933c0723"
    assert download.RELEASES["ml-32m"] == "d472be332d4daa821edc399621853b57"
    assert download.RELEASES["ml-latest"] is None
    assert download.RELEASES["ml-latest-small"] is None


def test_good_md5_extracts_and_returns_inner_dir(server: Server, cache: Path) -> None:
    server.serve("/ml-100k.zip", ML100K_ZIP)
    out = fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    assert out == cache / "ml-100k" / "ml-100k"
    assert (out / "u.data").read_bytes() == U_DATA
    assert (out / "u.item").read_bytes() == U_ITEM
    assert not (cache / "ml-100k.zip.part").exists()
    assert (cache / "ml-100k.zip").read_bytes() == ML100K_ZIP
    assert (cache / "ml-100k" / ".mfscale-complete").read_text().strip() == md5(ML100K_ZIP)
    assert not list(cache.glob(".ml-100k.extract-*"))


def test_bad_md5_removes_everything(server: Server, cache: Path) -> None:
    server.serve("/ml-100k.zip", ML100K_ZIP)
    with pytest.raises(DownloadError, match="md5 mismatch") as info:
        fetch("ml-100k", cache, server, expected_md5="0" * 32)
    assert "\n" not in str(info.value)
    assert_nothing_trusted(cache, "ml-100k")


def test_pinned_md5_used_when_no_override(server: Server, cache: Path) -> None:
    # The test zip is not the real ml-100k, so the pinned checksum must reject it.
    server.serve("/ml-100k.zip", ML100K_ZIP)
    with pytest.raises(DownloadError, match="0e33842e24a9c977be4e0107933c0723"):
        fetch("ml-100k", cache, server)
    assert_nothing_trusted(cache, "ml-100k")


def test_connection_dropped_midway_then_retry_succeeds(server: Server, cache: Path) -> None:
    server.serve("/ml-100k.zip", ML100K_ZIP, mode="truncate")
    with pytest.raises(DownloadError, match="interrupted after") as info:
        fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"of {len(ML100K_ZIP):,} bytes" in msg
    assert_nothing_trusted(cache, "ml-100k")

    server.serve("/ml-100k.zip", ML100K_ZIP)
    out = fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    assert (out / "u.data").read_bytes() == U_DATA


def test_cache_reuse_makes_no_request(server: Server, cache: Path) -> None:
    server.serve("/ml-100k.zip", ML100K_ZIP)
    first = fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    n = len(server.requests)
    assert n == 1
    second = fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    assert second == first
    assert len(server.requests) == n


def test_cached_zip_without_marker_is_verified_and_reextracted(server: Server, cache: Path) -> None:
    server.serve("/ml-100k.zip", ML100K_ZIP)
    fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    (cache / "ml-100k" / ".mfscale-complete").unlink()
    out = fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    assert (out / "u.data").read_bytes() == U_DATA
    assert len(server.requests) == 1  # good cached zip reused, not downloaded again


def test_bad_cached_zip_is_downloaded_again(server: Server, cache: Path) -> None:
    cache.mkdir()
    (cache / "ml-100k.zip").write_bytes(ML100K_ZIP[:100])  # e.g. left by some other tool
    server.serve("/ml-100k.zip", ML100K_ZIP)
    out = fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    assert (out / "u.data").read_bytes() == U_DATA
    assert server.requests == ["/ml-100k.zip"]
    assert (cache / "ml-100k.zip").read_bytes() == ML100K_ZIP


def test_marker_with_other_md5_is_not_trusted(server: Server, cache: Path) -> None:
    server.serve("/ml-100k.zip", ML100K_ZIP)
    fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    other = make_zip({"ml-100k/u.data": b"1\t2\t5\t0\n"})
    server.serve("/ml-100k.zip", other)
    out = fetch("ml-100k", cache, server, expected_md5=md5(other))
    assert (out / "u.data").read_bytes() == b"1\t2\t5\t0\n"
    assert not (out / "u.item").exists()


@pytest.mark.parametrize("style", ["bsd", "gnu"])
def test_unpinned_release_verified_by_sidecar(server: Server, cache: Path, style: str) -> None:
    digest = md5(SMALL_ZIP)
    if style == "bsd":
        sidecar = f"MD5 (ml-latest-small.zip) = {digest}\n"
    else:
        sidecar = f"{digest}  ml-latest-small.zip\n"
    server.serve("/ml-latest-small.zip", SMALL_ZIP)
    server.serve("/ml-latest-small.zip.md5", sidecar.encode())
    out = fetch("ml-latest-small", cache, server)
    assert out == cache / "ml-latest-small" / "ml-latest-small"
    assert (out / "ratings.csv").exists()
    assert "/ml-latest-small.zip.md5" in server.requests

    # The marker alone is enough for an unpinned release: no network at all the second time.
    again = fetch_release("ml-latest-small", cache, base_url=dead_url(), progress=False, timeout=2)
    assert again == out


def test_unpinned_release_wrong_sidecar_md5(server: Server, cache: Path) -> None:
    server.serve("/ml-latest-small.zip", SMALL_ZIP)
    server.serve("/ml-latest-small.zip.md5", f"MD5 (ml-latest-small.zip) = {'a' * 32}\n".encode())
    with pytest.raises(DownloadError, match="md5 mismatch"):
        fetch("ml-latest-small", cache, server)
    assert_nothing_trusted(cache, "ml-latest-small")


def test_unpinned_release_missing_sidecar_refuses(server: Server, cache: Path) -> None:
    server.serve("/ml-latest-small.zip", SMALL_ZIP)
    with pytest.raises(DownloadError, match="could not be fetched") as info:
        fetch("ml-latest-small", cache, server)
    assert "\n" not in str(info.value)
    assert server.requests == ["/ml-latest-small.zip.md5"]  # zip never downloaded
    assert_nothing_trusted(cache, "ml-latest-small")


def test_unknown_release_lists_known_names(cache: Path) -> None:
    with pytest.raises(DownloadError, match="unknown MovieLens release") as info:
        fetch_release("ml-7b", cache, base_url=dead_url(), progress=False)
    assert "ml-100k" in str(info.value) and "ml-latest-small" in str(info.value)


@pytest.mark.parametrize("evil", ["../evil", "ml-100k/../../evil", "/abs/evil"])
def test_zip_slip_member_rejected(server: Server, cache: Path, tmp_path: Path, evil: str) -> None:
    data = make_zip({"ml-100k/u.data": U_DATA, evil: b"pwned"})
    server.serve("/ml-100k.zip", data)
    with pytest.raises(DownloadError, match="unsafe member"):
        fetch("ml-100k", cache, server, expected_md5=md5(data))
    assert not (tmp_path / "evil").exists()
    assert_nothing_trusted(cache, "ml-100k")


def test_not_a_zip(server: Server, cache: Path) -> None:
    data = b"<html>this is not a zip</html>"
    server.serve("/ml-100k.zip", data)
    with pytest.raises(DownloadError, match="not a valid zip"):
        fetch("ml-100k", cache, server, expected_md5=md5(data))
    assert_nothing_trusted(cache, "ml-100k")


def test_zip_without_ratings_file(server: Server, cache: Path) -> None:
    data = make_zip({"ml-100k/README": b"hi"})
    server.serve("/ml-100k.zip", data)
    with pytest.raises(DownloadError, match="contains none of"):
        fetch("ml-100k", cache, server, expected_md5=md5(data))
    assert not (cache / "ml-100k").exists()


def test_http_404(server: Server, cache: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch("ml-100k", cache, server, expected_md5=md5(ML100K_ZIP))
    assert_nothing_trusted(cache, "ml-100k")


def test_connection_refused(cache: Path) -> None:
    with pytest.raises(DownloadError, match="failed") as info:
        fetch_release("ml-100k", cache, base_url=dead_url(), expected_md5=md5(ML100K_ZIP), progress=False)
    assert "\n" not in str(info.value)


def test_cache_dir_not_writable(server: Server, tmp_path: Path) -> None:
    # A regular file where the cache dir should be (permission bits are moot when running as root).
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(DownloadError, match="not writable"):
        fetch("ml-100k", blocker / "cache", server, expected_md5=md5(ML100K_ZIP))
    assert server.requests == []


def test_invalid_expected_md5(server: Server, cache: Path) -> None:
    with pytest.raises(DownloadError, match="32 hex"):
        fetch("ml-100k", cache, server, expected_md5="abc")


def test_env_vars(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFSCALE_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setenv("MFSCALE_MOVIELENS_URL", server.url + "/")
    assert download.default_cache_dir() == tmp_path / "envcache"
    server.serve("/ml-100k.zip", ML100K_ZIP)
    out = fetch_release("ml-100k", expected_md5=md5(ML100K_ZIP), progress=False, timeout=5)
    assert out == tmp_path / "envcache" / "ml-100k" / "ml-100k"


def test_default_cache_dir_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MFSCALE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert download.default_cache_dir() == tmp_path / ".cache" / "mfscale"


def test_prepare_source_end_to_end(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    """`prepare --source` downloads through the mirror, verifies, and writes shards; a bad md5 fails cleanly."""
    from mfscale import prepare

    server.serve("/ml-100k.zip", ML100K_ZIP)
    monkeypatch.setitem(download.RELEASES, "ml-100k", md5(ML100K_ZIP))
    out = tmp_path / "prepared"
    argv = ["--source", "ml-100k", "--base-url", server.url, "--cache-dir", str(tmp_path / "cache"),
            "--val-frac", "0", "--test-frac", "0", "--quiet"]
    assert prepare.main(argv + ["--out", str(out)]) == 0
    manifest = (out / "manifest.json").read_text()
    assert '"release": "ml-100k"' in manifest and md5(ML100K_ZIP) in manifest
    assert '"ratings": 3' in manifest

    monkeypatch.setitem(download.RELEASES, "ml-100k", "f" * 32)
    bad_out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        prepare.main(argv + ["--out", str(bad_out), "--cache-dir", str(tmp_path / "cache2")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mfscale.prepare: error: md5 mismatch") and len(err.splitlines()) == 1
    assert not bad_out.exists() and not (tmp_path / "cache2" / "ml-100k.zip").exists()
