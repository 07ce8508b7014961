"""One training run per workdir: an exclusive lock on ``WORKDIR/.lock``.

The lock is a POSIX record lock (``fcntl.lockf``) on that file, so it works on shared
file systems that support locking (NFS with lockd or NFSv4, Lustre, GPFS), and the
operating system (or the NFS server) releases it when the holder dies, even by SIGKILL:
a stale lock is recovered by simply taking it. The file itself stays (removing it would
let two runs lock two different files); it records who holds it, for the message a
second run gets. On a file system without locking the run goes on with a warning.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from pathlib import Path

from arssr_jax.errors import ArSSRError

LOCK_FILE = ".lock"

_held: set = set()  # workdirs this process holds (POSIX locks do not exclude the same process)
_held_guard = threading.Lock()


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock or raises ArSSRError at once."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd = None
        self._key = None

    def acquire(self) -> "WorkdirLock":
        import fcntl

        key = os.path.realpath(self.workdir)
        with _held_guard:
            if key in _held:
                raise ArSSRError(f"{self.workdir} is in use by another training run in this process; "
                                 "wait for it to finish or choose another --workdir")
            _held.add(key)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as error:
            self._forget(key)
            raise ArSSRError(f"cannot create the lock file {self.path} ({error.strerror}); "
                             "check the workdir's permissions") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                self._forget(key)
                raise ArSSRError(f"{self.workdir} is in use by another training run ({holder}); wait for it to "
                                 "finish or stop it, or choose another --workdir") from None
            # ENOLCK, EOPNOTSUPP...: this file system cannot lock
            print(f"arssr-jax train: warning: cannot lock {self.path} ({error.strerror}); make sure no other "
                  "run uses this workdir", file=sys.stderr)
            self._key = key
            return self
        self._fd, self._key = fd, key
        try:
            record = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError:
            pass  # the record only improves the message; the lock is what counts
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._key is not None:
            self._forget(self._key)
            self._key = None

    @staticmethod
    def _forget(key) -> None:
        with _held_guard:
            _held.discard(key)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown"
