"""One writer per state directory: a lock across threads of this process and across processes."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - no advisory locks on this platform (Windows)
    fcntl = None  # type: ignore[assignment]

from .files import StateError, StateWarning

LOCK = ".lock"

_HELD: dict[str, tuple[int, int]] = {}  # resolved state directory -> (owning thread id, depth)
_HELD_GUARD = threading.Lock()
_NO_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def session_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive lock on a state directory: one writer (one thread of one process) at a time.

    Re-entrant within a thread (:func:`save` takes it too). Another thread of this process, or
    another process (advisory ``flock`` on ``directory/.lock``), holding it makes this raise
    :class:`StateError` at once instead of waiting. Where the file lock is not available (no
    ``fcntl`` on this platform, a file system without ``flock``) it warns (:class:`StateWarning`)
    that other processes are not kept out, and still excludes other threads.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    me = threading.get_ident()
    with _HELD_GUARD:
        owner, depth = _HELD.get(key, (me, 0))
        if owner != me:
            raise StateError(f"another thread of this process is writing the state in {directory}")
        _HELD[key] = (me, depth + 1)
    try:
        if depth:
            yield
            return
        fd = _lock_file(directory)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)
    finally:
        with _HELD_GUARD:
            _, depth = _HELD.pop(key)
            if depth > 1:
                _HELD[key] = (me, depth - 1)


def _lock_file(directory: Path) -> int | None:
    """Take the inter-process lock on ``directory/.lock``; the open descriptor, or None (warned)
    where file locks are not available."""
    if fcntl is None:
        _warn_unlocked(directory, "this platform has no fcntl file locks")
        return None
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateError(f"another process is writing the state in {directory}") from None
        if err.errno in _NO_LOCK_ERRNOS:
            _warn_unlocked(directory, f"its file system does not support flock ({err.strerror})")
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def _warn_unlocked(directory: Path, reason: str) -> None:
    warnings.warn(
        f"cannot lock the state in {directory}: {reason}; ultraedit cannot keep another process from writing "
        "it at the same time (run one writer per state directory)",
        StateWarning,
        stacklevel=4,
    )


