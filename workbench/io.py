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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` to `path` atomically: a temp file beside it, fsynced, renamed over it (with the usual file mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    called once if another process holds it (to say so before blocking). A folder is locked itself (its directory
    inode: nothing is written into it)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock_handle(path) as f:
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


class _Fd:
    """An open file descriptor, closed on exit (Python's file objects refuse folders)."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _lock_handle(path: Path, create: bool = True):
    """An open handle to lock: the folder itself when `path` is one, else the lock file (created if missing unless
    `create` is False: then FileNotFoundError)."""
    if path.is_dir():
        return _Fd(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
    return open(path, "a+" if create else "rb")  # the caller's `with` closes it


POOL_MANIFEST = "pool.json"  # `pool.MANIFEST` (io cannot import pool): its lock is the pool folder itself


def lock_for(path: Path) -> Path:
    """What to lock to guard `path`, beside it (symlinks resolved first), so every writer of `path` takes the same
    lock whatever its $WORKBENCH_CACHE, user or machine sharing the folder: a pool's manifest is guarded by the pool
    folder itself (`file_lock` locks a folder's own inode: nothing is written into a pool); anything else (a results
    record or folder, a cache folder) by an empty `.<name>.lock` file beside it, left in place (deleting one while
    another process waits on it would let two holders in)."""
    p = Path(path).resolve()
    if p.name == POOL_MANIFEST and p.parent.is_dir():
        return p.parent
    return p.parent / f".{p.name}.lock"


@contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """`file_lock` without waiting: yields True holding the lock, False when another holder has it (another process,
    or another open of the same file in this one). A missing lock file is not created: nobody holds it, yields True."""
    import fcntl

    try:
        f = _lock_handle(Path(path), create=False)
    except FileNotFoundError:
        yield True
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _staged_name(folder: str, prefix: str) -> str | None:
    """The final name a `.staging-<name>-XXXXXXXX` / `.old-<name>-XXXXXXXX` folder (`staging_dir`) was made for."""
    if not folder.startswith(prefix):
        return None
    name, sep, _ = folder[len(prefix):].rpartition("-")  # mkdtemp's suffix has no '-'
    return name if sep and name else None


def clean_stale_staging(root: Path) -> list[Path]:
    """Leftovers of killed builds in `root` (an artifacts folder whose builds lock `.<name>.lock` beside `<name>`,
    as `recipes.build` does): `.staging-<name>-*` folders (a build's files, with anything it staged inside) and
    `.old-<name>-*` folders (a replace killed between its renames: put back when nothing took its place, else
    deleted), each only while nobody holds `<name>`'s lock (a live build keeps its own). Also `wb-mergekit-moe-*`
    temp folders an older version made beside the artifacts, while no mergekit_moe build holds its lock. Returns
    what it removed or put back."""
    root = Path(root)
    done: list[Path] = []
    if not root.is_dir():
        return done
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return done
    for p in entries:
        if p.is_symlink() or not p.is_dir():
            continue
        name = _staged_name(p.name, ".staging-") or _staged_name(p.name, ".old-")
        if name is None:
            continue
        with try_file_lock(root / f".{name}.lock") as free:
            if not free or not p.exists():
                continue
            final = root / name
            if p.name.startswith(".old-") and not final.exists() and (p / name).is_dir():
                os.replace(p / name, final)  # the old artifact, whole: nothing replaced it
            shutil.rmtree(p, ignore_errors=True)
            done.append(p)
    legacy = [p for p in entries if p.name.startswith("wb-mergekit-moe-") and p.is_dir() and not p.is_symlink()]
    if legacy:
        locks = [q for q in entries if q.name.startswith(".mergekit_moe-") and q.name.endswith(".lock")]
        with _all_free(locks) as free:
            if free:
                for p in legacy:
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(p)
    return done


@contextmanager
def _all_free(locks: list[Path]) -> Iterator[bool]:
    """Every lock in `locks` taken without waiting (True), or none held (False: someone holds one)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for lock in locks:
            if not stack.enter_context(try_file_lock(lock)):
                yield False
                return
        yield True


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`: raises ValueError (one line) for anything else (a FIFO,
    socket or device: opened without blocking and never read; a file over `max_bytes`: not read past its cap) and
    OSError when it cannot be opened. A reader of a folder of records (the app's scan) never hangs on a name."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
            raise ValueError(f"not a regular file ({kind}): not read")
        if st.st_size > max_bytes:
            raise ValueError(f"too large to read ({st.st_size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise ValueError(f"too large to read (over {max_bytes / 2**20:.0f} MiB)")
    return data


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
