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
import io
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


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _CorruptError("a tensor refers to something that is not a storage")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise _CorruptError("a tensor has a malformed offset/size/stride")
    if len(size) != len(stride) or storage_offset < 0:
        raise _CorruptError("a tensor has a malformed offset/size/stride")
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _CorruptError("a tensor has a negative size or stride")
    flat = storage.array
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
) -> _Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


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
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._big_endian = big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _ForbiddenGlobal(f"{module}.{name}") from None

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
        try:
            raw = self._archive.read(member)
        except KeyError:
            raise _CorruptError(f"storage record {member!r} is missing") from None
        dtype = stype.dtype
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder(">" if self._big_endian else "<")
        if len(raw) < numel * dtype.itemsize:
            raise _CorruptError(
                f"storage {member!r} holds {len(raw)} bytes but {numel} x {dtype.itemsize} are needed"
            )
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
        try:
            big_endian = False
            if f"{prefix}byteorder" in archive.namelist():
                order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise _CorruptError(f"unknown byteorder record {order!r:.20}")
                big_endian = order == "big"
            data = archive.read(f"{prefix}data.pkl")
            obj = _SafeUnpickler(data, archive, prefix, big_endian).load()
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
