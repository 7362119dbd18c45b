"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

EXIT_USAGE = 2


class MfscaleError(Exception):
    """An error caused by the user's input or environment; its message is shown as one line."""


class DataError(MfscaleError):
    """Input data is missing, malformed or inconsistent."""


class DownloadError(MfscaleError):
    """A download failed or its checksum did not match."""


class ConfigError(MfscaleError):
    """A configuration value or flag is invalid."""


def one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def cli_entry(prog: str) -> Callable[[F], F]:
    """Wrap a ``main(argv)`` so user errors print ``prog: error: ...`` and exit non-zero.

    Set MFSCALE_TRACEBACK=1 to see the full traceback when debugging.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except MfscaleError as exc:
                if os.environ.get("MFSCALE_TRACEBACK"):
                    raise
                print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
                raise SystemExit(EXIT_USAGE) from None
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                raise SystemExit(130) from None
            except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
                if os.environ.get("MFSCALE_TRACEBACK"):
                    raise
                where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
                print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
                raise SystemExit(EXIT_USAGE) from None

        return wrapper  # type: ignore[return-value]

    return deco
