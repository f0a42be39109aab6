"""Files that survive a crash whole: written to a temporary name, fsynced, renamed, the directory fsynced.

A rename alone is atomic but not durable: after a power loss the new name can point at an empty file, or
the rename itself can be lost, unless the data and then the directory entry reach the disk.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old content or the new one, whole, also after a crash."""
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(staged, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
    fsync_dir(path.parent)
