"""Atomic file writes (readers see the old file or the new one, never half of one), content
hashes of files, and the check that an output directory holds none of a command's inputs."""
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from xlmr_mini.errors import InputError


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


_sha256_seen: dict[tuple, str] = {}


def file_sha256(path: str | Path, cache_file: str | Path | None = None) -> str:
    """sha256 of a file's bytes. A hash is reused while the file's size and mtime are unchanged:
    within the process, and across processes through `cache_file` (JSON, path -> size, mtime,
    hash); a file whose size or mtime changed is read and hashed again."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _sha256_seen:
        return _sha256_seen[key]
    known = _read_hashes(cache_file)
    entry = known.get(key[0])
    if entry is not None and tuple(entry[:2]) == key[1:]:
        digest = entry[2]
    else:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if cache_file is not None:  # re-read: another process may have added entries meanwhile
            known = {**_read_hashes(cache_file), key[0]: [stat.st_size, stat.st_mtime_ns, digest]}
            atomic_write(cache_file, json.dumps(known))
    _sha256_seen[key] = digest
    return digest


def _read_hashes(cache_file) -> dict:
    try:
        known = json.loads(Path(cache_file).read_text(encoding="utf-8")) if cache_file is not None else {}
    except (OSError, ValueError):  # missing or damaged: a cache, rebuilt as files are hashed
        return {}
    return known if isinstance(known, dict) else {}


def check_apart(out_flag: str, out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output directory that is, or contains, one of the inputs (flag -> path): writing
    or clearing it would destroy what the command reads."""
    where = Path(out).resolve()
    for flag, path in inputs.items():
        if path is not None and Path(path).resolve().is_relative_to(where):
            raise InputError(f"{out_flag} {out}: contains the input {flag} {path}; writing there could destroy it, "
                             f"choose an --out outside it")
