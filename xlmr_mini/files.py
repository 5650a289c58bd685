"""Output files: atomic writes (readers see the old file or the new one, never half of one),
output paths checked before any work (writable, holding none of the inputs), a full disk
reported as one line naming the file; content hashes of files, cached by size and mtime."""
import contextlib
import errno
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from xlmr_mini.errors import InputError

# A write that fails while less than this is free on its disk failed for want of space (torch and
# safetensors report a full disk in their own words, without an errno).
NEARLY_FULL = 1 << 20


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, content: bytes | str | Callable[[str], None]) -> None:
    """Write `content` (bytes, text as UTF-8, or a function that writes a given temporary path)
    to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    with disk_space(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                if not callable(content):
                    f.write(content.encode("utf-8") if isinstance(content, str) else content)
            if callable(content):
                content(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # a temporary file is private (0600); the written file is not
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def disk_space(path: str | Path):
    """Turn a write into `path` that failed on a full disk into one line that says so."""
    try:
        yield
    except Exception as e:
        if not _disk_full(e, Path(path)):
            raise
        raise InputError(f"{path}: no space left on device (the disk holding {_existing(Path(path)).resolve()} is "
                         f"full); free some space and run the command again") from None


def reports_full_disk(write: Callable) -> Callable:
    """Decorate a function whose first argument is the path it writes: `disk_space` around it."""

    @functools.wraps(write)
    def wrapper(path, *args, **kwargs):
        with disk_space(path):
            return write(path, *args, **kwargs)

    return wrapper


def _disk_full(e: Exception, path: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return free_bytes(_existing(path)) < NEARLY_FULL


def free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return NEARLY_FULL
    return st.f_bavail * st.f_frsize


def _existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists."""
    return next(p for p in (path, *path.parents) if os.path.lexists(p))


@contextlib.contextmanager
def readable(path: str | Path, advice: str):
    """Turn a file that cannot be read as expected (truncated, bad JSON, not a pickle of tensors)
    into one line naming it, with `advice` on what to do."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise InputError(f"{path}: damaged, cannot be read ({reason}); {advice}") from None


def check_output_dir(path: str | Path, flag: str) -> None:
    """One line now, before any work, when `path` cannot be (or become) a directory we write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a directory")
    _check_writable(_existing(path), flag, path)


def check_output_file(path: str | Path, flag: str) -> None:
    """One line now, before any work, when a file cannot be written at `path`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a file name")
    _check_writable(_existing(path.parent), flag, path)


def _check_writable(directory: Path, flag: str, path: Path) -> None:
    if not directory.is_dir():
        raise InputError(f"{flag} {path}: {directory} is not a directory")
    try:  # a real write: permission bits say nothing to root, nor about read-only mounts
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.")
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {directory} ({e.strerror.lower()})") from None
    os.close(fd)
    os.unlink(probe)


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
