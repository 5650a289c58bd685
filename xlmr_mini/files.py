"""Atomic file writes: readers see the old file or the new one, never half of one."""
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, content: bytes | str | Callable[[str], None]) -> None:
    """Write `content` (bytes, text as UTF-8, or a function that writes a given temporary path)
    to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(content):
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
