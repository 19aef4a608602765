"""Small file helpers: atomic writes, cache locations, safe safetensors access."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .faults import fault_point

# Formats that unpickle on load. A pool never loads them (arbitrary code execution).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """$WORKBENCH_CACHE, else $XDG_CACHE_HOME/workbench, else ~/.cache/workbench."""
    if env := os.environ.get("WORKBENCH_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "workbench"


def artifacts_dir() -> Path:
    """Where built artifacts live: $WORKBENCH_CACHE_ARTIFACTS, else the cache's artifacts/ folder."""
    root = os.environ.get("WORKBENCH_CACHE_ARTIFACTS")
    return Path(root) if root else cache_dir() / "artifacts"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the usual mode
        fault_point("write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def staging_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """A temp folder beside `final`, renamed onto it only if the block succeeds.

    A crash leaves at most a `.staging-*` folder, never a half-written `final`. When `final` exists by the
    time the block ends (another process built the same thing meanwhile), the existing folder is kept and
    this one discarded, unless `replace`: then the old folder is first renamed aside, so that `final` is
    always either the old folder or the new one, never a mix or missing while the new one is ready.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
    try:
        yield tmp
        old = None
        if replace and final.exists():  # aside first; deleted only once the new folder is in place
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
        try:
            os.rename(tmp, final)  # atomic; fails when another process's `final` landed first
        except OSError:
            if not final.exists():
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_lock(path: Path, waiting=None) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the block: read-modify-write of a shared
    record by one process at a time. The kernel drops it when the holder dies (even by SIGKILL). `waiting()` is
    called once if another process holds it (to say so before blocking)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                waiting()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_for(path: Path) -> Path:
    """The lock file guarding `path` (a record in results/): kept in the cache, never beside the record."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:20]
    return cache_dir() / "locks" / f"{digest}.lock"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
# A digest goes to the on-disk cache only when the file's last change (ctime) is this much older than the moment its
# hashing began: a rewrite in the same timestamp tick as that change could otherwise leave size, mtime and ctime as
# they were (git's "racily clean" entries). 2 s covers filesystems with coarse timestamps (FAT: 2 s).
RACY_NS = 2_000_000_000
_HEX = frozenset("0123456789abcdef")


def digest_cache_dir() -> Path:
    """Where file digests are remembered across processes: the cache's digests/ folder."""
    return cache_dir() / "digests"


def _stat_key(st: os.stat_result) -> str:
    """A file's identity and state: device, inode, size, mtime and ctime (ns). Any write changes the ctime."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _digest_entry(st: os.stat_result) -> Path:
    k = hashlib.sha256(_stat_key(st).encode()).hexdigest()
    return digest_cache_dir() / k[:2] / k[2:]


def _read_digest(st: os.stat_result) -> str | None:
    try:
        text = _digest_entry(st).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 64 and set(text) <= _HEX else None  # a torn or foreign entry: hash again


def _write_digest(st: os.stat_result, digest: str) -> None:
    """Remember a digest (best effort: a cache that cannot be written only costs a re-read later)."""
    entry = _digest_entry(st)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.name[:8]}.", suffix=".tmp", dir=entry.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, entry)  # no fsync: a lost entry is hashed again, a torn one is refused on read
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def sha256_file_cached(path: Path) -> str:
    """sha256_file remembered by the file's state, so an unchanged file is read once, not once per build.

    In-process by (path, size, mtime_ns, inode, ctime_ns); across processes in the cache's digests/ folder by
    (device, inode, size, mtime_ns, ctime_ns). ctime is in both keys because a rewrite can keep the size and put the
    mtime back (utime), never the ctime: a changed file is always hashed again. A file changed less than RACY_NS
    before its hashing began is remembered in-process only (see RACY_NS)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = _read_digest(st)
    if digest is None:
        began = time.time_ns()
        digest = sha256_file(path)
        after = os.stat(path)
        if _stat_key(after) == _stat_key(st) and began - st.st_ctime_ns > RACY_NS:
            _write_digest(st, digest)
    _DIGESTS[key] = digest
    return digest


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
