"""Reading: :func:`load` (voxels as float32), :func:`load_grid` and :func:`header_shape` (header only).

Both loaders open a file the same way and check its header with :func:`check_header`.
:func:`load` then believes the header only once the file is known to hold the voxel bytes
it claims (a compressed file is counted while decompressing, nothing kept), and only then
asks whether free memory can take them: a small file claiming 5000^3 voxels is called
truncated, costs nothing, and only a file that holds its voxels can be too big to read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
import zlib

import numpy as np
import nibabel as nib
from nibabel.spatialimages import SpatialImage

from arssr_jax.errors import ArSSRError
from arssr_jax.memory import host_available_bytes
from arssr_jax.nifti.paths import one_line, show
from arssr_jax.nifti.volume import Volume, check_affine

__all__ = ["load", "load_grid", "header_shape", "check_header"]

# The raw voxel bytes a compressed file may claim and be read as nibabel does (a short file
# then fails there, cheaply); above this it is first decompressed once, nothing kept, to count them.
_STREAM_CHECK_BYTES = 64 * 2**20
_STREAM_CHUNK = 2**20


def _size_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


# --------------------------------------------------------------------------- opening


def _check_link(p: str, name: str) -> None:
    """Refuse a dangling or looping symbolic link with the right words."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArSSRError(f"{name}: is a symbolic link loop (a link that points back to itself); "
                             "point it at an existing file") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ArSSRError(f"{name}: is a broken symbolic link (target {show(os.path.realpath(p))} is missing); "
                             "point it at an existing file") from None
        raise ArSSRError(f"{name}: cannot be opened ({one_line(e.strerror or e)}); check the path and its permissions") from None


class _NoteOnce(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = one_line(record.getMessage())
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _nibabel_notes(name: str):
    """nibabel's header fixes (e.g. pixdim 0 set to 1) printed once, naming the file.

    nibabel logs them on ``nibabel.global`` with its own handler, and again through the
    root logger when something configured logging: twice. Collect them instead.
    """
    logger = logging.getLogger("nibabel.global")
    handlers, propagate = logger.handlers[:], logger.propagate
    note = _NoteOnce()
    logger.handlers[:] = [note]
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        for message in note.messages:
            print(f"{name}: note: {message}", file=sys.stderr)


def _open(p: str, name: str):
    """The nibabel image of an existing, readable file (header only: no voxel is read)."""
    if not os.path.lexists(p):
        raise ArSSRError(f"{name}: no such file; check the path (and the current directory {show(os.getcwd())})")
    _check_link(p, name)
    if os.path.isdir(p):
        raise ArSSRError(f"{name}: is a directory, not a NIfTI file; give the path of a .nii or .nii.gz file inside it")
    if not os.access(p, os.R_OK):
        raise ArSSRError(f"{name}: permission denied; make the file readable (chmod u+r) or copy it somewhere readable")
    try:
        with _nibabel_notes(name):
            return nib.load(p)
    except MemoryError:
        raise
    except Exception as e:  # ImageFileError, HeaderDataError, OSError, EOFError, gzip.BadGzipFile, ...
        raise ArSSRError(
            f"{name}: could not be read as a NIfTI/Analyze image ({type(e).__name__}: {one_line(e)}); "
            "give a valid .nii or .nii.gz file (convert DICOM with e.g. dcm2niix)"
        ) from e


def check_header(img, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of an image whose header describes a grid: a voxel image with at least
    3 dimensions, no empty axis and a non-degenerate affine (:func:`check_affine`)."""
    if not isinstance(img, SpatialImage):
        raise ArSSRError(f"{what}: is not a voxel image with an affine; give a 3D NIfTI volume (.nii or .nii.gz)")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise ArSSRError(f"{what}: is a {len(shape)}D image of shape {shape}; ArSSR needs a 3D volume")
    if 0 in shape:
        raise ArSSRError(f"{what}: is empty (shape {shape}); give a non-empty 3D volume")
    return shape, check_affine(img.affine, what)


def header_shape(path: str | os.PathLike) -> tuple | None:
    """The image shape its header states, or None when the header cannot be read (then
    :func:`load` names the problem)."""
    try:
        return tuple(int(n) for n in nib.load(os.fspath(path)).shape)
    except Exception:
        return None


def load_grid(path: str | os.PathLike, role: str = "--like image") -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of an image's voxel grid, from its header only (no voxel is read).

    Refuses what :func:`load` refuses about the file and its header (:func:`check_header`).
    """
    p = os.fspath(path)
    name = f"{role} {show(p)}"
    shape, affine = check_header(_open(p, name), name)
    return shape[:3], affine


# --------------------------------------------------------------------------- load


def load(path: str | os.PathLike, volume_index: int | None = None) -> Volume:
    """Read a 3D volume (or volume ``volume_index`` of a 4D series) as float32 with the file's
    scaling applied; refuses what would make super-resolution silently wrong (2D slices, 4D
    without a volume index, NaN/Inf voxels, complex or RGB data, a degenerate affine)."""
    p = os.fspath(path)
    name = show(p)
    img = _open(p, name)
    what = f"{name} ({type(img).__name__})"
    shape, affine = check_header(img, what)

    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind == "c":
        raise ArSSRError(f"{what}: has complex-valued voxels ({dtype}); save the magnitude image first (e.g. fslcomplex -realabs)")
    if dtype.kind not in "biuf":
        raise ArSSRError(f"{what}: has non-numeric voxels (dtype {dtype}, e.g. RGB); give a single-channel intensity image")
    if 1 in shape[:3]:
        flat = ("a single 2D slice", "a 1D line of voxels", "a single voxel")[shape[:3].count(1) - 1]
        raise ArSSRError(
            f"{what}: is {flat} (shape {shape[:3]}); ArSSR needs a 3D volume with at least 2 voxels along every axis"
        )
    n_vols = _volume_count(shape, volume_index, what)

    _check_file_holds_voxels(img, shape, dtype, what)  # before the memory check: a lying header is damage
    _check_memory(shape, dtype, what)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become Inf: reported below
            data = _read_voxels(img, shape, n_vols, volume_index)
    except MemoryError:
        raise ArSSRError(f"{what}: not enough memory to read its {_size_text(shape[:3])} voxels; "
                         "free memory or crop the image first (e.g. fslroi)") from None
    except Exception as e:
        raise ArSSRError(
            f"{what}: voxel data could not be read ({type(e).__name__}: {one_line(e)}); the file is probably truncated or corrupt, re-export it"
        ) from e
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape != shape[:3]:  # pragma: no cover - defensive
        raise ArSSRError(f"{what}: read data of shape {data.shape}, expected {shape[:3]}; the file is corrupt, re-export it")
    _check_finite(img, data, shape, volume_index, what)
    return Volume(data=data, affine=affine, header=img.header)


def _volume_count(shape, volume_index, what: str) -> int:
    """The number of volumes along the one extra axis (1 for 3D), with ``volume_index`` checked against it."""
    extra = [n for n in shape[3:] if n > 1]
    if len(extra) > 1:
        raise ArSSRError(
            f"{what}: has {len(shape)}D data of shape {shape} with several non-singleton extra axes; "
            "extract one 3D volume first (e.g. fslroi)"
        )
    n_vols = extra[0] if extra else 1
    if volume_index is not None:
        if isinstance(volume_index, bool) or not isinstance(volume_index, (int, np.integer)):
            raise ArSSRError(f"{what}: volume index {volume_index!r} is not an integer; use --volume-index I with 0 <= I < {n_vols}")
        if not 0 <= int(volume_index) < n_vols:
            raise ArSSRError(
                f"{what}: volume index {int(volume_index)} is out of range, the file has {n_vols} volume(s); "
                f"use --volume-index I with 0 <= I < {n_vols}"
            )
    elif n_vols > 1:
        raise ArSSRError(
            f"{what}: is 4D with {n_vols} volumes (shape {shape}); use --volume-index I to pick one (0 <= I < {n_vols})"
        )
    return n_vols


def _check_file_holds_voxels(img, shape, dtype: np.dtype, what: str) -> None:
    """Refuse a file (plain or compressed) that holds fewer voxel bytes than its header claims."""
    holder = getattr(img, "file_map", {}).get("image")
    filename = getattr(holder, "filename", None)
    if filename is None or not os.path.isfile(filename):
        return
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    claimed = offset + math.prod(shape) * dtype.itemsize
    if not filename.lower().endswith((".gz", ".bz2", ".zst")):
        size = os.path.getsize(filename)
        if size < claimed:
            raise ArSSRError(
                f"{what}: is truncated or corrupt: its header claims {_size_text(shape)} voxels ({claimed:,} bytes with the header) "
                f"but the file holds {size:,} bytes; re-export or re-download it"
            )
        return
    if claimed - offset <= _STREAM_CHECK_BYTES:
        return  # small enough to read as nibabel does; a short file fails there
    count = 0
    try:
        from nibabel.openers import ImageOpener

        with ImageOpener(filename, "rb") as stream:  # reads no further than the file holds
            while count < claimed:
                chunk = stream.read(min(_STREAM_CHUNK, claimed - count))
                if not chunk:
                    break
                count += len(chunk)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise ArSSRError(f"{what}: its compressed data is corrupt ({type(e).__name__}: {one_line(e)}); re-export it") from None
    if count < claimed:
        raise ArSSRError(
            f"{what}: is truncated or corrupt: its header claims {_size_text(shape)} voxels ({claimed:,} bytes uncompressed) "
            f"but the file unpacks to {count:,} bytes; re-export or re-download it"
        )


def _check_memory(shape, dtype: np.dtype, what: str) -> None:
    """Refuse a volume whose reading would not fit in the host's free memory, before anything is allocated."""
    needed = math.prod(shape[:3]) * (dtype.itemsize + 8)  # the raw bytes, the float32 result and a scaling temporary
    available = host_available_bytes()
    if needed > 0.8 * available:
        raise ArSSRError(
            f"{what}: its {_size_text(shape)} voxels need about {needed / 2**30:.1f} GiB to read "
            f"but only {available / 2**30:.1f} GiB is free; crop the image first (e.g. fslroi) or use a larger machine"
        )


def _read_voxels(img, shape, n_vols, volume_index) -> np.ndarray:
    if len(shape) == 3:
        return img.get_fdata(dtype=np.float32, caching="unchanged")
    if n_vols == 1 and volume_index in (None, 0):
        return img.get_fdata(dtype=np.float32, caching="unchanged").reshape(shape[:3])
    index = int(volume_index or 0)
    slicer = (slice(None),) * 3 + tuple(index if n > 1 else 0 for n in shape[3:])
    return np.asarray(img.dataobj[slicer], dtype=np.float32)


def _check_finite(img, data, shape, volume_index, what) -> None:
    """Refuse NaN/Inf voxels, telling values beyond float32's range apart from stored NaN/Inf."""
    finite = np.isfinite(data)
    if finite.all():
        return
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(data.size - np.count_nonzero(finite) - n_nan)
    overflow, largest = _float32_overflow(img, shape, volume_index) if n_inf else (0, 0.0)
    if overflow and overflow == n_inf and not n_nan:
        raise ArSSRError(
            f"{what}: {overflow} voxel(s) of {data.size} hold values beyond float32's range (up to {largest:.3g}; "
            "float32 ends at 3.4e+38); rescale the image in float64 first (e.g. divide it by 1e30 with nibabel)"
        )
    raise ArSSRError(
        f"{what}: has {n_nan} NaN and {n_inf - overflow} Inf voxel(s) of {data.size}"
        + (f" (and {overflow} beyond float32's range)" if overflow else "")
        + "; replace them with finite values first (e.g. fslmaths in.nii.gz -nan out.nii.gz)"
    )


def _float32_overflow(img, shape, volume_index) -> tuple[int, float]:
    """(voxels whose finite stored value is beyond float32's range, the largest magnitude)."""
    limit = float(np.finfo(np.float32).max)
    count, largest = 0, 0.0
    extra = tuple(int(volume_index or 0) if n > 1 else 0 for n in shape[3:])
    try:
        for k in range(shape[2]):  # a slab at a time: float64 copies of one slice only
            values = np.asarray(img.dataobj[(slice(None), slice(None), k) + extra], dtype=np.float64)
            big = np.isfinite(values) & (np.abs(values) > limit)
            if big.any():
                count += int(np.count_nonzero(big))
                largest = max(largest, float(np.abs(values[big]).max()))
    except Exception:  # the first reading succeeded; this is only a diagnosis
        return 0, 0.0
    return count, largest
