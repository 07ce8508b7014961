"""Read PyTorch ``torch.save(state_dict)`` files without torch and without running pickle code.

Modern ``torch.save`` (torch >= 1.6) writes a zip archive::

    <prefix>/data.pkl        the pickled object (a dict of tensors)
    <prefix>/data/<key>      raw bytes of each storage
    <prefix>/byteorder       "little" or "big" (absent in old archives: little)
    <prefix>/version, ...    bookkeeping we do not need

The pickle is read with a restricted :class:`pickle.Unpickler` whose ``find_class``
resolves only the handful of globals a state_dict uses, each mapped to a numpy
implementation in this module. Every other global (``os.system``, ``builtins.eval``...)
is refused before anything is called, so a malicious file cannot execute code.

bfloat16 tensors are returned as float32 (exact: bfloat16 is the top half of float32).
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from arssr_jax.errors import ArSSRError

__all__ = ["read_state_dict"]

_RESAVE_HINT = (
    "only the zip format of torch>=1.6 is supported; re-save a legacy file with "
    "torch.save(torch.load(old_path), new_path)"
)

# Every size the file states is checked against what an ArSSR state_dict can need before
# anything of that size is read or allocated. The reference's largest tensor (an RDN dense
# layer, 64 x 192 x 3^3) holds 331,776 elements and its whole state_dict about 25 MB; the
# bounds leave room for much larger configurations. The pickle of a state_dict is a few KB
# (names and shapes); unpickling can make a few hundred bytes of objects per byte, so it is
# kept small.
MAX_PICKLE_BYTES = 2**20
MAX_TENSOR_ELEMENTS = 2**24
MAX_TOTAL_BYTES = 2**28  # storages read plus tensors built
MAX_NDIM = 8


# --------------------------------------------------------------------------- storages


class _StorageType:
    """Stand-in for a ``torch.<Name>Storage`` class: just remembers its element dtype."""

    __slots__ = ("name", "dtype", "bfloat16")

    def __init__(self, name: str, dtype: str, bfloat16: bool = False):
        self.name = name
        self.dtype = np.dtype(dtype)
        self.bfloat16 = bfloat16

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<storage type {self.name}>"


_STORAGE_TYPES = {
    name: _StorageType(name, dt, name == "BFloat16Storage")
    for name, dt in {
        "FloatStorage": "<f4",
        "DoubleStorage": "<f8",
        "HalfStorage": "<f2",
        "BFloat16Storage": "<u2",
        "ComplexFloatStorage": "<c8",
        "ComplexDoubleStorage": "<c16",
        "LongStorage": "<i8",
        "IntStorage": "<i4",
        "ShortStorage": "<i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
        "UntypedStorage": "u1",
    }.items()
}


class _Storage:
    """A storage loaded from the archive: a flat 1-D numpy array in native byte order."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Tensor:
    """Result of a rebuild call; converted to a plain ndarray once unpickling is done."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _CorruptError(Exception):
    """Internal: the pickle or a storage record is inconsistent."""


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


class _TooLarge(Exception):
    """Internal: the file states a size beyond what an ArSSR state_dict can need."""


class _Budget:
    """Bytes read or built so far, against MAX_TOTAL_BYTES."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > MAX_TOTAL_BYTES - self.used:
            raise _TooLarge(f"{what} would bring the data read to {(self.used + nbytes) / 2**20:,.0f} MiB, beyond the "
                            f"{MAX_TOTAL_BYTES // 2**20} MiB any ArSSR state_dict needs")
        self.used += nbytes


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, budget: _Budget | None = None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _CorruptError("a tensor refers to something that is not a storage")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise _CorruptError("a tensor has a malformed offset/size/stride")
    if len(size) != len(stride) or storage_offset < 0 or len(size) > MAX_NDIM:
        raise _CorruptError("a tensor has a malformed offset/size/stride")
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _CorruptError("a tensor has a negative size or stride")
    if any(s > MAX_TENSOR_ELEMENTS for s in size) or math.prod(size) > MAX_TENSOR_ELEMENTS:
        raise _TooLarge(f"a tensor of shape {tuple(size)!s:.100} has more than the {MAX_TENSOR_ELEMENTS:,} elements "
                        "any ArSSR tensor can need")
    flat = storage.array
    if budget is not None:
        budget.take(math.prod(size) * flat.itemsize, f"a tensor of shape {tuple(size)}")
    if any(s == 0 for s in size):
        return _Tensor(np.zeros(size, dtype=flat.dtype))
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= flat.size:
        raise _CorruptError(
            f"a tensor of shape {tuple(size)} reaches element {last} of a storage "
            f"holding only {flat.size}"
        )
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=tuple(st * item for st in stride),
        writeable=False,
    )
    return _Tensor(np.array(view, copy=True, order="C"))


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
    budget: _Budget | None = None,
) -> _Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride, budget=budget)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise _CorruptError("a parameter wraps something that is not a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> _Tensor:
    return _rebuild_parameter(data)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}
for _name, _stype in _STORAGE_TYPES.items():
    _ALLOWED_GLOBALS[("torch", _name)] = _stype
_ALLOWED_GLOBALS[("torch.storage", "UntypedStorage")] = _STORAGE_TYPES["UntypedStorage"]


class _ForbiddenGlobal(Exception):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


# --------------------------------------------------------------------------- unpickler


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool, budget: _Budget):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._big_endian = big_endian
        self._storages: dict[str, _Storage] = {}
        self._budget = budget

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _ForbiddenGlobal(f"{module}.{name}") from None
        if found in (_rebuild_tensor, _rebuild_tensor_v2):
            return functools.partial(found, budget=self._budget)
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _CorruptError(f"unknown persistent record {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise _CorruptError("malformed storage record")
        if not isinstance(numel, int) or numel < 0:
            raise _CorruptError(f"storage {key!r} has an invalid size")
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        member = f"{self._prefix}data/{key}"
        dtype = stype.dtype
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder(">" if self._big_endian else "<")
        need = numel * dtype.itemsize
        self._budget.take(need, f"storage {member!r} ({numel:,} elements)")
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise _CorruptError(f"storage record {member!r} is missing") from None
        if info.file_size < need:
            raise _CorruptError(f"storage {member!r} holds {info.file_size} bytes but {numel} x {dtype.itemsize} are needed")
        with self._archive.open(info) as stream:  # exactly the bytes needed, however much the record inflates to
            raw = stream.read(need)
        if len(raw) < need:
            raise _CorruptError(f"storage {member!r} holds {len(raw)} bytes but {numel} x {dtype.itemsize} are needed")
        arr = np.frombuffer(raw, dtype=dtype, count=numel)
        if stype.bfloat16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = arr.astype(dtype.newbyteorder("="), copy=False)
        storage = _Storage(arr)
        self._storages[key] = storage
        return storage


# --------------------------------------------------------------------------- public API


def _find_prefix(names: list[str]) -> str | None:
    """The folder holding data.pkl ("" when it sits at the top), preferring the shallowest."""
    candidates = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not candidates:
        return None
    best = min(candidates, key=lambda n: (n.count("/"), n))
    return best[: -len("data.pkl")]


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save(state_dict)`` zip archive as ``{name: numpy array}``.

    Never imports torch and never calls anything the pickle names beyond the small
    allow-list in this module. Raises :class:`ArSSRError` with a one-line message for
    a missing, malformed, malicious or non-state_dict file.
    """
    where = os.fspath(path)
    if not os.path.exists(where):
        raise ArSSRError(f"{where}: weights file not found; check the path")
    if os.path.isdir(where):
        raise ArSSRError(f"{where}: is a directory, not a weights file; pass the .pt/.pth file")
    try:
        archive = zipfile.ZipFile(where)
    except OSError as exc:
        raise ArSSRError(
            f"{where}: cannot read the file ({_one_line(exc.strerror or str(exc))}); check permissions"
        ) from None
    except (zipfile.BadZipFile, ValueError):
        raise ArSSRError(
            f"{where}: not a zip archive (or truncated); {_RESAVE_HINT}"
        ) from None

    with archive:
        prefix = _find_prefix(archive.namelist())
        if prefix is None:
            raise ArSSRError(
                f"{where}: zip archive has no data.pkl, so it is not a torch.save file; "
                "re-save the weights with torch.save(model.state_dict(), path)"
            )
        budget = _Budget()
        try:
            big_endian = False
            if f"{prefix}byteorder" in archive.namelist():
                order = _read_small(archive, f"{prefix}byteorder", 64).decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise _CorruptError(f"unknown byteorder record {order!r:.20}")
                big_endian = order == "big"
            data = _read_small(archive, f"{prefix}data.pkl", MAX_PICKLE_BYTES)
            obj = _SafeUnpickler(data, archive, prefix, big_endian, budget).load()
            if isinstance(obj, dict):  # the copies _to_state_dict makes count too
                for value in obj.values():
                    if isinstance(value, _Tensor):
                        budget.take(value.array.nbytes, "the state_dict's tensors")
        except _TooLarge as exc:
            raise ArSSRError(
                f"{where}: refused: {_one_line(str(exc))}; the file is damaged or not an ArSSR state_dict"
            ) from None
        except _ForbiddenGlobal as exc:
            raise ArSSRError(
                f"{where}: the pickle asks for the forbidden global '{exc.qualname}'; "
                "the file may be malicious and was not loaded; use weights from a trusted source"
            ) from None
        except _CorruptError as exc:
            raise ArSSRError(
                f"{where}: corrupt weights archive ({_one_line(str(exc))}); "
                "re-download or re-save the file with torch.save"
            ) from None
        except ArSSRError:
            raise
        except Exception as exc:  # any malformed pickle/zip member (incl. RecursionError)
            raise ArSSRError(
                f"{where}: corrupt or truncated weights archive "
                f"({type(exc).__name__}: {_one_line(str(exc))}); "
                "re-download or re-save the file with torch.save"
            ) from None

    return _to_state_dict(where, obj)


def _read_small(archive: zipfile.ZipFile, member: str, limit: int) -> bytes:
    """A member's bytes, refused (before reading) when its size is beyond ``limit``."""
    info = archive.getinfo(member)
    if info.file_size > limit:
        raise _TooLarge(f"{member} unpacks to {info.file_size:,} bytes; a state_dict's needs at most {limit:,}")
    with archive.open(info) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:  # pragma: no cover - zipfile stops at the stated size
        raise _TooLarge(f"{member} unpacks to more than {limit:,} bytes")
    return data


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_state_dict(where: str, obj: Any) -> dict[str, np.ndarray]:
    fix = "save it with torch.save(model.state_dict(), path)"
    if not isinstance(obj, dict):
        raise ArSSRError(
            f"{where}: not a state_dict (top-level object is a {type(obj).__name__}, "
            f"expected a mapping of name -> tensor); {fix}"
        )
    result: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ArSSRError(
                f"{where}: not a state_dict (key {_one_line(repr(key), 60)} is not a string); {fix}"
            )
        if not isinstance(value, _Tensor):
            raise ArSSRError(
                f"{where}: not a state_dict (entry '{_one_line(key, 60)}' is a "
                f"{type(value).__name__}, not a tensor); {fix}"
            )
        # Copy per key so entries that shared a tensor/storage stay independent.
        result[key] = np.array(value.array, copy=True)
    return result
