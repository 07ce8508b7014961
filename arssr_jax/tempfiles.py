"""Temporary siblings for atomic writes, and the removal of those a killed run left behind.

An output ``DIR/NAME`` is written as ``DIR/.STEM.tmp-HOST-PID-RANDOM[SUFFIX]`` and renamed
over ``NAME`` once complete. A run killed with SIGKILL (or a power cut) cannot remove its
temporary; the next write of the same target does (:func:`remove_stale`): a temporary is
stale when it was made on this host by a process that no longer runs, or when it is older
than :data:`STALE_AFTER_S` (a temporary of another host, or of an older naming scheme).
Temporaries of live processes, which may be writing the same target right now, are kept.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time

__all__ = ["make_temp", "stale_temps", "remove_stale", "umask", "publish_mode", "STALE_AFTER_S"]

STALE_AFTER_S = 24 * 3600.0


def umask() -> int:
    """The process's umask, read without changing it (os.umask would, racing other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def publish_mode(path, directory: bool = False) -> None:
    """Give a finished output the mode a plainly created file (or folder) would have:
    0666 (0777) less the umask; temporary files are created private (0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"


def _prefix(stem: str, kind: str) -> str:
    return f".{stem}.{kind}-"


def make_temp(parent, stem: str, suffix: str = "", directory: bool = False, kind: str = "tmp") -> str:
    """A new temporary file (an open-and-closed empty file) or folder beside the target.

    Returns its path; the caller renames it into place or removes it.
    """
    prefix = f"{_prefix(stem, kind)}{_host()}-{os.getpid()}-"
    if directory:
        return tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.close(fd)
    return path


def _owner_alive(rest: str) -> bool | None:
    """True/False when ``rest`` (after the prefix) names a process of this host; None otherwise."""
    host = _host()
    if not rest.startswith(host + "-"):
        return None
    pid_text = rest[len(host) + 1:].split("-", 1)[0]
    if not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError as error:
        return error.errno != errno.ESRCH
    return True


def stale_temps(parent, stem: str, suffix: str = "", kind: str = "tmp") -> list[str]:
    """Paths of the stale temporaries of ``kind`` for target ``stem + suffix`` in ``parent``."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    prefix, now, stale = _prefix(stem, kind), time.time(), []
    for name in names:
        if not name.startswith(prefix) or (suffix and not name.endswith(suffix)):
            continue
        path = os.path.join(parent, name)
        alive = _owner_alive(name[len(prefix):])
        if alive is None:
            try:
                alive = now - os.lstat(path).st_mtime < STALE_AFTER_S
            except OSError:
                continue
        if not alive:
            stale.append(path)
    return stale


def remove_stale(parent, stem: str, suffix: str = "", kinds=("tmp",)) -> list[str]:
    """Remove the stale temporaries of target ``stem + suffix`` in ``parent``; returns their paths."""
    removed = []
    for kind in kinds:
        for path in stale_temps(parent, stem, suffix, kind):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed
