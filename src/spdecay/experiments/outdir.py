"""One process per output folder: a lock held for the whole run (or merge), so a second
``spdecay compare`` into a busy folder is refused instead of overwriting the first one's results."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from spdecay.experiments.errors import RunnerError

LOCK_FILE = ".spdecay-compare.lock"


@contextlib.contextmanager
def out_lock(out: Path, option: str = "--out") -> Iterator[None]:
    """Create ``out`` if needed and hold its lock (``flock``: released when the process ends,
    however it ends). A folder that cannot be written is a one-line error naming ``option``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunnerError(f"{option} {out}: cannot write to this folder ({exc.strerror or exc})") from None
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the runner is tested on Linux)
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunnerError(f"{option} {out}: another spdecay compare (pid {holder}) is using this folder; "
                                  "wait for it to finish or choose another folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
