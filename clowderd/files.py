"""Small files written whole: a reader sees the old content or the new, never a part."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_whole(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`, with the permission bits `mode`: write a temporary file beside it,
    flush it to disk, then rename it over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by this user alone (mode 0600)."""
    write_whole(path, text.encode())
