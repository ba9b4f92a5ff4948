"""Creating a store atomically, and the lock that keeps a second writer out of it.

A store is built in a staging directory beside `out`, `.NAME.creating-PID-RANDOM/`, which
holds grokscope's marker file and the store itself (`store/`), and is renamed into place
whole (`create_store`). Both directories are locked (flock) before anything is written into
them: a later run removes a staging directory only when it carries the marker and nobody
holds its lock, i.e. its creator is gone (`remove_stale_staging`). The store's lock moves
with the directory through the rename, so the run that created a store holds it from the
moment it is visible, and any run writing a store holds it until it ends (`lock_store`).
Without flock (Windows) stores are created the same way, without the lock.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path

import numpy as np

from grokscope.store.schema import StoreError
from grokscope.store.writer import create

try:
    import fcntl
except ImportError:  # no flock (Windows): dumps run without the lock
    fcntl = None

__all__ = ["create_store", "lock_store", "remove_stale_staging", "rename_noreplace"]

_STAGING_MARKER = "grokscope-staging.json"
_STAGING_KIND = "grokscope dump staging directory"
_EXISTS = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
_libc = None


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.creating-"


def _try_lock(fd: int) -> bool:
    """Takes an exclusive flock on `fd` without waiting: False while another process holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_new(path: Path) -> int | None:
    """Opens and locks a directory this run just made (nobody else can hold it): the
    descriptor, or None without flock (then no other run ever removes the directory either)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _try_lock(fd)
    except OSError:
        pass  # a filesystem without flock
    return fd


def _lock_holder(path: Path) -> int | None:
    """The pid that holds a flock on `path`, from /proc/locks (Linux), or None."""
    try:
        st = os.stat(path)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and "->" not in fields and inode in fields:
                    pid = int(fields[fields.index(inode) - 1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def lock_store(out: Path, progress: bool, error: type[Exception] = StoreError) -> int | None:
    """Locks the existing store `out` for this run: the descriptor to close when the run ends.
    Refuses (raising `error`) while another dump holds the lock, or when `out` cannot be
    opened. None where the filesystem cannot lock."""
    if fcntl is None:
        return None
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise error(f"{out}: cannot open the store ({e.strerror or e}); nothing was changed") from None
    try:
        locked = _try_lock(fd)
    except OSError as e:
        os.close(fd)
        if progress:
            print(f"note: {out}: its filesystem cannot lock it ({e.strerror or e}); make sure no other dump "
                  f"writes it at the same time", file=sys.stderr)
        return None
    if not locked:
        os.close(fd)
        pid = _lock_holder(out)
        raise error(f"{out} is being written by another dump{f' (pid {pid})' if pid else ''}; "
                        f"not starting a second one (nothing was changed)")
    return fd


def rename_noreplace(source: Path, target: Path) -> None:
    """Renames `source` to `target`; an OSError with errno EEXIST (or ENOTEMPTY, ENOTDIR) when
    `target` exists in any form, an empty directory included (which a plain rename replaces)."""
    global _libc
    if sys.platform.startswith("linux"):
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(_libc, "renameat2", None)
        if renameat2 is not None:
            at_fdcwd, rename_noreplace = -100, 1
            renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            renameat2.restype = ctypes.c_int
            if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
                return
            code = ctypes.get_errno()
            if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: no RENAME_NOREPLACE on this filesystem
                raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)  # still fails onto a non-empty directory


def remove_stale_staging(out: Path) -> None:
    """Removes the staging directories beside `out` that killed runs left: only those that
    carry grokscope's marker and whose lock nobody holds. Nothing else is touched."""
    if fcntl is None:
        return
    prefix = _staging_prefix(out)
    try:
        names = [name for name in os.listdir(out.parent) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = out.parent / name
        try:
            if not (stat.S_ISDIR(os.lstat(path).st_mode) and stat.S_ISREG(os.lstat(path / _STAGING_MARKER).st_mode)):
                continue
            with open(path / _STAGING_MARKER, "rb") as f:
                if json.loads(f.read(4096)).get("kind") != _STAGING_KIND:
                    continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (OSError, ValueError, AttributeError):
            continue
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
            if same and _try_lock(fd):
                shutil.rmtree(path)
        except OSError:
            pass  # removed meanwhile by another run, or not removable: left as it is
        finally:
            os.close(fd)


def create_store(out: Path, variables, coords, attrs: dict, pieces: np.ndarray) -> tuple[bool, int | None]:
    """Builds the whole store in a staging directory beside `out` and renames it to `out`.

    Returns (published, the store's lock descriptor or None). `published` is False when `out`
    came to exist meanwhile (another dump created it first). The staging directory is
    removed in every case, and the store is never visible half made.
    """
    staging = out.parent / f"{_staging_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(staging)
    staging_fd = store_fd = None
    try:
        staging_fd = _lock_new(staging)
        (staging / _STAGING_MARKER).write_text(json.dumps({"kind": _STAGING_KIND, "pid": os.getpid(),
                                                           "out": str(out)}))
        inner = staging / "store"
        os.mkdir(inner)
        store_fd = _lock_new(inner)
        group = create(inner, variables, coords, attrs)
        group["vocab_piece"][:] = pieces
        try:
            rename_noreplace(inner, out)
        except OSError as e:
            if e.errno not in _EXISTS:
                raise
            return False, None
        fd, store_fd = store_fd, None
        return True, fd
    finally:
        if store_fd is not None:
            os.close(store_fd)
        try:
            shutil.rmtree(staging)
        except OSError:
            pass  # keeps its marker, and its lock is released below: the next run removes it
        if staging_fd is not None:
            os.close(staging_fd)

