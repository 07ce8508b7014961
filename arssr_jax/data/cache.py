"""The volume cache: each training NIfTI converted once into a normalised float32 ``.npy``.

Training reads a few 40^3 patches from each volume per epoch, so holding every volume in
memory (and a pickled copy in every grain worker process) makes memory grow with dataset
size times worker count. Instead each source file is converted once (read, checked,
normalised with :class:`arssr_jax.intensity.Normalisation`, exactly as
:func:`arssr_jax.data.volumes.load_volumes` does in memory) into an uncompressed ``.npy``
in the cache folder, and every process opens it with ``np.load(mmap_mode="r")``: the
pages live in the operating system's page cache, shared by all processes on the host,
and a patch reads only the pages it touches. The values are the in-memory ones, bit for
bit, so batches do not depend on whether the cache is used.

Entries are keyed on the source file: its resolved path, size and modification time
(and :data:`CACHE_VERSION`, bumped whenever the conversion changes). A source that
changes gets a new entry on next use and its old entries are removed. Files are
written to a temporary sibling, flushed to disk and renamed into place, so an
interrupted conversion never leaves a partial entry (a killed run's temporary is
removed by the next conversion of that source). Conversions hold an exclusive lock on
``CACHE_DIR/.lock``, so processes sharing a cache on one host (multi-process training)
convert each volume once; the others wait, then map the finished files. Before
converting, the space the new entries need is checked against the free space on the
cache's disk.

Folder: ``DataConfig.cache_dir``, default :data:`DEFAULT_CACHE_DIR`
(``~/.cache/arssr-jax/volumes``; the environment variable ``ARSSR_JAX_VOLUME_CACHE``
moves the default). None (or ``"off"``) reads every volume into memory instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from arssr_jax import intensity
from arssr_jax.data.reading import read_volume
from arssr_jax.errors import ArSSRError
from arssr_jax.progress import progress_bar
from arssr_jax.tempfiles import make_temp, publish_mode, remove_stale

DEFAULT_CACHE_DIR = "~/.cache/arssr-jax/volumes"
CACHE_ENV = "ARSSR_JAX_VOLUME_CACHE"
CACHE_VERSION = 1  # bump when the conversion (reading, checks, normalisation, layout) changes
LOCK_FILE = ".lock"
FREE_SPACE_RESERVE = 256 * 2 ** 20  # bytes left free on the cache's disk after converting
NPY_HEADER_BYTES = 128  # np.save's header for a 3D float32 array


def resolve_cache_dir(cache_dir) -> Optional[Path]:
    """The cache folder ``cache_dir`` names (``~`` and ``$VARS`` expanded), or None when off.

    The default, :data:`DEFAULT_CACHE_DIR`, is replaced by ``$ARSSR_JAX_VOLUME_CACHE``
    when that is set; None, ``""`` and ``"off"`` switch the cache off.
    """
    if cache_dir is None:
        return None
    value = os.fspath(cache_dir)
    if value == DEFAULT_CACHE_DIR:
        value = os.environ.get(CACHE_ENV, value)
    if value.strip().lower() in ("", "off", "none"):
        return None
    return Path(os.path.expandvars(os.path.expanduser(value)))


def _source_key(path: str) -> tuple:
    """(resolved path, a hash of it, a hash of what the entry depends on)."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError as error:
        raise ArSSRError(f"{path}: cannot read it ({error.strerror}); check the data paths") from None
    rule = {"version": CACHE_VERSION, "path": real, "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "normalisation": [intensity.LOW_PERCENTILE, intensity.HIGH_PERCENTILE, intensity.MAX_SAMPLE]}
    content = hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:16]
    return real, hashlib.sha256(real.encode()).hexdigest()[:12], content


def _stem(real: str) -> str:
    name = os.path.basename(real)
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "volume"


def entry_path(cache_dir, source: str) -> Path:
    """The cache file of ``source`` as it is now (whether or not it exists yet)."""
    real, path_hash, content = _source_key(source)
    return Path(cache_dir) / f"{_stem(real)}-{path_hash}-{content}.npy"


def _older_entries(entry: Path) -> List[Path]:
    """Entries of the same source made from an earlier version of it."""
    prefix = entry.name[: -len(".npy")].rsplit("-", 1)[0] + "-"
    try:
        names = os.listdir(entry.parent)
    except OSError:
        return []
    return [entry.parent / n for n in names
            if n.startswith(prefix) and n.endswith(".npy") and n != entry.name
            and re.fullmatch(r"[0-9a-f]{16}\.npy", n[len(prefix):])]


def open_cached(file) -> np.ndarray:
    """A cache entry memory-mapped read-only, as a plain ndarray (float32, 3D)."""
    if not os.path.isfile(file):
        raise ArSSRError(f"volume cache entry {file} is gone (deleted, or its source changed and "
                         "another run rebuilt it); start the run again to rebuild it") from None
    try:
        mapped = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ArSSRError(f"volume cache entry {file} cannot be read ({error}); delete it and it is "
                         "rebuilt from its source") from None
    if mapped.dtype != np.float32 or mapped.ndim != 3:
        raise ArSSRError(f"volume cache entry {file} holds {mapped.dtype} {mapped.shape}, not a 3D "
                         "float32 volume; delete it and it is rebuilt from its source")
    return np.asarray(mapped)  # a view of the mapping: same pages, no subclass


def _expected_bytes(source: str) -> int:
    """Size of the entry ``source`` will give, from its NIfTI header (nothing else read)."""
    import nibabel as nib

    try:
        shape = nib.load(source).shape
    except Exception:  # a bad file is reported when it is read
        return 0
    return NPY_HEADER_BYTES + 4 * int(np.prod(shape, dtype=np.int64))


def check_free_space(cache_dir: Path, needed: int, count: int) -> None:
    """Refuse a conversion that would fill the cache's disk."""
    free = shutil.disk_usage(cache_dir).free
    if needed + FREE_SPACE_RESERVE > free:
        raise ArSSRError(
            f"volume cache {cache_dir}: converting {count} volume(s) needs {needed / 1e9:.2f} GB but its disk "
            f"has {free / 1e9:.2f} GB free; free space there, or set DataConfig.cache_dir to a folder on a "
            "larger disk (cache_dir=None reads the volumes into memory instead)")


def _write_entry(source: str, entry: Path) -> None:
    """Convert ``source`` into ``entry`` atomically (temporary sibling, fsync, rename)."""
    array = read_volume(source)
    stem = entry.name[: -len(".npy")]
    remove_stale(entry.parent, stem, ".npy")
    temp = make_temp(entry.parent, stem, suffix=".npy")
    try:
        with open(temp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        publish_mode(temp)
        os.replace(temp, entry)
    except BaseException as error:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArSSRError(f"volume cache {entry.parent}: the disk (or quota) filled while converting "
                             f"{source}; free space there, or set DataConfig.cache_dir to a folder on a "
                             "larger disk (cache_dir=None reads the volumes into memory instead)") from None
        if isinstance(error, OSError):
            raise ArSSRError(f"volume cache {entry.parent}: cannot write {entry.name} ({error.strerror}); "
                             "check the folder's permissions or set DataConfig.cache_dir") from None
        raise


class _CacheLock:
    """An exclusive POSIX lock on ``CACHE_DIR/.lock`` (released by the OS if the holder dies)."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / LOCK_FILE
        self.fd = None

    def __enter__(self):
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise ArSSRError(f"volume cache {self.path.parent}: cannot create its lock file "
                             f"({error.strerror}); check the folder's permissions or set "
                             "DataConfig.cache_dir") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):  # no locking here: go on unlocked
                return self
            print(f"volume cache {self.path.parent}: another process is converting; waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def cached_arrays(files: Sequence[str], cache_dir, progress: bool = True) -> tuple[tuple, tuple]:
    """(arrays, cache files) of ``files`` memory-mapped from the cache, converting those not
    cached yet (or changed since)."""
    folder = resolve_cache_dir(cache_dir)
    if folder is None:
        raise ValueError("cached_arrays needs a cache folder (cache_dir is off)")
    files = [os.fspath(f) for f in files]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArSSRError(f"volume cache {folder}: cannot create it ({error.strerror}); set "
                         "DataConfig.cache_dir to a writable folder") from None
    entries = [entry_path(folder, f) for f in files]
    if not all(e.is_file() for e in entries):
        with _CacheLock(folder):
            todo = [(f, e) for f, e in zip(files, entries) if not e.is_file()]  # again, under the lock
            if todo:
                check_free_space(folder, sum(_expected_bytes(f) for f, _ in todo), len(todo))
            for source, entry in progress_bar(todo, desc="caching volumes", unit="vol", enabled=progress):
                _write_entry(source, entry)
                for old in _older_entries(entry):
                    try:
                        old.unlink()
                    except OSError:
                        pass
    mapped = tuple(str(e) for e in entries)
    return tuple(open_cached(e) for e in mapped), mapped
