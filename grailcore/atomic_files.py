"""Crash-safe file operations shared by checkpoints and model export: fsync of files and
directories, a streaming sha256, and replacing a directory by a finished temp dir."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    # Directories must be fsynced too, or a rename may not survive a power loss.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temp dir to `final`, replacing an older `final` if there is one."""
    old = None
    if final.exists():
        # os.rename cannot replace a non-empty dir; move the old one aside first.
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)
