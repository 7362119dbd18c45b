"""Download, verify and extract official MovieLens releases into a local cache.

Layout of the cache (default ``~/.cache/mfscale``, or ``$MFSCALE_CACHE``)::

    <cache>/<name>.zip.part          partial download, never trusted
    <cache>/<name>.zip               a zip whose md5 has been verified
    <cache>/<name>/                  extracted release; complete only when it holds
    <cache>/<name>/.mfscale-complete   ... this marker (contents: the zip's md5)

Every step that could leave a half-finished file writes to a temporary name first and
only ``os.replace``-s it into place once it is verified, so an interrupted or corrupt
download can never be mistaken for a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from mfscale.errors import DownloadError
from mfscale.shards import file_digest

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"

# md5 of "<name>.zip" as published by GroupLens. None means "not pinned": ml-latest is
# regenerated over time, so it (and its small sibling) are checked against the ".md5"
# sidecar GroupLens publishes next to each zip instead.
RELEASES: dict[str, str | None] = {
    "ml-32m": "d472be332d4daa821edc399621853b57",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-10m": "ce571fd55effeba0271552578f2648bd",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-latest-small": None,
    "ml-latest": None,
}

MARKER_NAME = ".mfscale-complete"
RATINGS_FILES = ("ratings.csv", "ratings.dat", "u.data")
CHUNK_SIZE = 1 << 20  # 1 MiB

_MD5_RE = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32}(?![0-9a-fA-F])")
# Transport failures that mean "the download did not finish": URLError, ConnectionError and
# socket timeouts are all OSError subclasses; IncompleteRead etc. are HTTPException.
_NET_ERRORS = (http.client.HTTPException, OSError)


def default_cache_dir() -> Path:
    """``$MFSCALE_CACHE`` if set, else ``~/.cache/mfscale``."""
    env = os.environ.get("MFSCALE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mfscale"


def fetch_release(
    name: str,
    cache_dir: Path | None = None,
    *,
    base_url: str | None = None,
    expected_md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Return the extracted release directory (the folder that holds ratings.csv / ratings.dat / u.data).

    Downloads ``<base_url>/<name>.zip`` only when the cache does not already hold a verified,
    fully extracted copy. ``expected_md5`` overrides the built-in table (e.g. for mirrors).
    Raises :class:`DownloadError` (one-line message) on any failure.
    """
    if name not in RELEASES:
        known = ", ".join(RELEASES)
        raise DownloadError(f"unknown MovieLens release {name!r}; known releases: {known}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = (base_url or os.environ.get("MFSCALE_MOVIELENS_URL") or DEFAULT_BASE_URL).rstrip("/")
    url = f"{base}/{name}.zip"
    pinned = _normalize_md5(expected_md5, "expected_md5") if expected_md5 else RELEASES[name]

    out_dir = cache / name
    zip_path = cache / f"{name}.zip"

    # Fast path: a completed extraction needs no network at all. For unpinned releases the
    # marker alone is trusted, since it is only written after a verified extraction.
    found = _complete_extraction(out_dir, pinned)
    if found is not None:
        return found

    _ensure_writable(cache)
    # Get the checksum before downloading so an unverifiable release fails fast.
    expected = pinned or _fetch_sidecar_md5(url, name, timeout)

    cached_ok = False
    if zip_path.is_file():
        actual = _file_md5(zip_path)
        cached_ok = actual == expected
        if not cached_ok:
            # A stale or corrupt cached zip: drop it; the verified download replaces it.
            if progress:
                print(
                    f"mfscale: cached {zip_path.name} has md5 {actual}, expected {expected}; "
                    "downloading again",
                    file=sys.stderr,
                )
            _unlink(zip_path)
    if not cached_ok:
        _download(url, name, cache, zip_path, expected, progress=progress, timeout=timeout)

    return _extract(zip_path, out_dir, cache, name, expected)


def _normalize_md5(value: str, what: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise DownloadError(f"{what} must be 32 hex digits, got {value!r}")
    return value


def _complete_extraction(out_dir: Path, expected: str | None) -> Path | None:
    """The ratings folder of a finished extraction matching ``expected``, else None.

    A directory that exists but is not complete (no marker, wrong md5, files gone) is
    removed so that a fresh extraction can take its place.
    """
    marker = out_dir / MARKER_NAME
    if marker.is_file():
        try:
            recorded = marker.read_text(encoding="ascii").strip().lower()
        except (OSError, UnicodeDecodeError):
            recorded = ""
        if expected is None or recorded == expected:
            found = _find_ratings_dir(out_dir)
            if found is not None:
                return found
    if out_dir.exists() or out_dir.is_symlink():
        _remove_tree(out_dir)
    return None


def _find_ratings_dir(root: Path) -> Path | None:
    """The shallowest folder under ``root`` holding a ratings file (zips nest one top folder)."""
    hits = [p.parent for fname in RATINGS_FILES for p in root.rglob(fname) if p.is_file()]
    if not hits:
        return None
    return min(hits, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def _ensure_writable(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # os.access lies for root and on some network filesystems; actually try a write.
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as exc:
        raise DownloadError(f"cache directory {cache} is not writable: {_reason(exc)}") from None


def _fetch_sidecar_md5(url: str, name: str, timeout: float) -> str:
    """Read the md5 from the ``<url>.md5`` file GroupLens publishes next to each zip."""
    sidecar = f"{url}.md5"
    try:
        with urllib.request.urlopen(sidecar, timeout=timeout) as resp:
            text = resp.read(64 * 1024).decode("utf-8", errors="replace")
    except _NET_ERRORS as exc:
        raise DownloadError(
            f"cannot verify {name}: its checksum file {sidecar} could not be fetched ({_reason(exc)}); "
            "refusing to use an unverified download (pass expected_md5 to supply the checksum)"
        ) from None
    # Formats seen: "MD5 (ml-latest-small.zip) = <hex>" and "<hex>  ml-latest-small.zip".
    tokens = {t.lower() for t in _MD5_RE.findall(text)}
    if len(tokens) != 1:
        raise DownloadError(f"cannot verify {name}: no single md5 found in {sidecar}")
    return tokens.pop()


def _download(
    url: str, name: str, cache: Path, zip_path: Path, expected: str, *, progress: bool, timeout: float
) -> None:
    """Stream ``url`` to ``<zip>.part`` while hashing; rename to ``zip_path`` only if verified."""
    part = cache / f"{name}.zip.part"
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download of {name} from {url} failed: HTTP {exc.code} {exc.reason}") from None
    except _NET_ERRORS as exc:
        raise DownloadError(f"download of {name} from {url} failed: {_reason(exc)}") from None
    ok = False
    try:
        with resp:
            actual = _stream_to(resp, part, name, progress=progress)
        if actual != expected:
            raise DownloadError(
                f"md5 mismatch for {name}.zip: expected {expected}, got {actual}; "
                "the bad download was removed"
            )
        try:
            os.replace(part, zip_path)
        except OSError as exc:
            raise DownloadError(f"could not move download into place at {zip_path}: {_reason(exc)}") from None
        ok = True
    finally:
        # Whatever went wrong (including Ctrl-C), never leave a .part behind to be trusted.
        if not ok:
            _unlink(part)


def _stream_to(resp: http.client.HTTPResponse, part: Path, name: str, *, progress: bool) -> str:
    """Write ``resp`` to ``part`` in chunks; check length and md5. Returns the md5."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.strip().isdigit() else None
    try:
        out = open(part, "wb")  # noqa: SIM115 - closed by the `with out` below
    except OSError as exc:
        raise DownloadError(f"could not write {part}: {_reason(exc)}") from None
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{name}.zip",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    with out, bar:
        while True:
            try:
                chunk = resp.read(CHUNK_SIZE)
            except _NET_ERRORS as exc:
                raise DownloadError(_interrupted(name, received, total, _reason(exc))) from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise DownloadError(f"could not write {part}: {_reason(exc)}") from None
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    # http.client returns b"" rather than raising when the peer closes early, so this
    # length check is what catches a dropped connection.
    if total is not None and received < total:
        raise DownloadError(_interrupted(name, received, total, "connection closed early"))
    return digest.hexdigest()


def _interrupted(name: str, received: int, total: int | None, why: str) -> str:
    of = f" of {total:,}" if total is not None else ""
    return f"download of {name} interrupted after {received:,}{of} bytes: {why}"


def _extract(zip_path: Path, out_dir: Path, cache: Path, name: str, md5: str) -> Path:
    """Extract into a temp dir in the cache, mark it complete, then move it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=cache))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for member in zf.namelist():
                    if unsafe_member(member):
                        _unlink(zip_path)  # never keep a zip-slip archive in the cache
                        raise DownloadError(
                            f"refusing to extract {zip_path.name}: unsafe member path {member!r}"
                        )
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            # The md5 matched, so re-downloading would give the same bytes; drop it anyway so
            # a corrected checksum/mirror is not shadowed by this file.
            _unlink(zip_path)
            raise DownloadError(
                f"{zip_path.name} is not a valid zip file ({_reason(exc)}); it was removed"
            ) from None
        except OSError as exc:
            raise DownloadError(f"could not extract {zip_path.name} into {cache}: {_reason(exc)}") from None
        if _find_ratings_dir(tmp) is None:
            raise DownloadError(f"{zip_path.name} contains none of {', '.join(RATINGS_FILES)}")
        try:
            # Marker goes in before the rename, so <cache>/<name>/ never exists without it.
            (tmp / MARKER_NAME).write_text(md5 + "\n", encoding="ascii")
            if out_dir.exists() or out_dir.is_symlink():
                _remove_tree(out_dir)
            os.replace(tmp, out_dir)
        except OSError as exc:
            raise DownloadError(f"could not install extracted {name} at {out_dir}: {_reason(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = _find_ratings_dir(out_dir)
    assert found is not None  # checked in tmp above
    return found


def unsafe_member(member: str) -> bool:
    """True for absolute paths, drive letters or ``..`` components (zip-slip)."""
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member):
        return True
    return ".." in re.split(r"[/\\]", member)


def _file_md5(path: Path) -> str:
    try:
        return file_digest(path, "md5")
    except OSError as exc:
        raise DownloadError(f"could not read {path}: {_reason(exc)}") from None


def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError as exc:
        raise DownloadError(f"could not remove incomplete {path}: {_reason(exc)}") from None


def _unlink(path: Path) -> None:
    # Best-effort cleanup: must not mask the error that made the cleanup necessary.
    with contextlib.suppress(OSError):
        path.unlink()


def _reason(exc: BaseException) -> str:
    """A short one-line description of a transport/filesystem error."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc_reason = exc.reason
        return str(exc_reason) if not isinstance(exc_reason, BaseException) else _reason(exc_reason)
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
