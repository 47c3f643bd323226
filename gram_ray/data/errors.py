"""Why a clip cannot be used: DecodeError, and the checks every decoder shares."""

from __future__ import annotations

import os
from pathlib import Path


class DecodeError(Exception):
    """One clip that cannot be used; str(error) is the reason recorded in report.json."""


def check_media_file(path: str | None, what: str) -> None:
    """DecodeError naming what is wrong with the path before any decoder sees it."""
    if path is None:
        raise DecodeError(f"{what} file not found")
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise DecodeError(f"{what} file is a dangling symlink (to {os.readlink(p)})")
    if p.is_dir():
        raise DecodeError(f"{what} path {p.name} is a folder, not a file")
    if not p.is_file():
        raise DecodeError(f"{what} file not found")
    if p.stat().st_size == 0:
        raise DecodeError(f"{what} file is empty (0 bytes)")
