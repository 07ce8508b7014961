"""NIfTI input/output that keeps the geometry and never leaves half-written files.

* :func:`load` reads a 3D volume (or one volume of a 4D series) as float32 with
  the file's scaling applied, and refuses anything that would make
  super-resolution silently wrong (2D slices, 4D without a volume index,
  NaN/Inf voxels, complex or RGB data, a degenerate affine).
* :func:`save` writes float32 NIfTI with the sform and the qform both set to the
  volume's affine, via a temporary file in the output directory and an atomic
  ``os.replace``; temporaries of the same output left by a killed run are removed
  (:mod:`arssr_jax.tempfiles`).
* No header is believed before its file is known to hold the voxels it claims and
  free memory to take them (compressed files are counted while decompressing, nothing
  kept), so a small file claiming 5000^3 voxels costs nothing.
* :func:`check_output_path` validates an output path before any expensive work.

Every user-facing problem is raised as :class:`~arssr_jax.errors.ArSSRError`
with a one-line message naming the file, the problem and the fix.

Note on precision: NIfTI-1 stores the sform as float32, so an affine survives a
round trip exactly when its entries are float32-representable (they are for any
affine that was itself read from a NIfTI-1 file); otherwise it is rounded to
float32 (relative error ~1e-7). Volumes larger than 32767 voxels along an axis,
or saved with a NIfTI-2 header, are written as NIfTI-2, which stores float64.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import nibabel as nib
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header
from nibabel.spatialimages import SpatialImage

from arssr_jax import tempfiles
from arssr_jax.errors import ArSSRError

__all__ = ["Volume", "load", "load_grid", "save", "check_output_path", "check_overwrite", "written_by_arssr",
           "NIFTI_EXTENSIONS"]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_NIFTI1_MAX_DIM = 32767
_GZIP_LEVEL = 1  # nibabel's own default for .nii.gz: fast, most of the gain


def _name(path: Any) -> str:
    """A path as one printable line (control characters escaped)."""
    s = os.fspath(path) if not isinstance(path, str) else path
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.isprintable():
        return s
    return ascii(s)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _ext(path: str) -> str | None:
    low = path.lower()
    for ext in NIFTI_EXTENSIONS:
        if low.endswith(ext):
            return path[len(path) - len(ext):]
    return None


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in nibabel (i, j, k) voxel order with its voxel-to-world affine.

    ``header`` is the source nibabel header (or None); :func:`save` copies the
    spatial/temporal units, the description and the qform/sform codes from it.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 3:
            raise ValueError(f"Volume.data must be 3D (X, Y, Z); got shape {data.shape}")
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4; got shape {affine.shape}")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def voxel_size(self) -> np.ndarray:
        """Voxel edge lengths (world units, usually mm): column norms of affine[:3, :3]."""
        return np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))


# --------------------------------------------------------------------------- load

# The raw voxel bytes a header may claim before its file is checked to hold them (a
# compressed file is then decompressed once, without keeping anything, to count them).
_STREAM_CHECK_BYTES = 64 * 2**20
_STREAM_CHUNK = 2**20


def _check_link(p: str, name: str) -> None:
    """Refuse a dangling or looping symbolic link with the right words."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArSSRError(f"{name}: is a symbolic link loop (a link that points back to itself); "
                             "point it at an existing file") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ArSSRError(f"{name}: is a broken symbolic link (target {_name(os.path.realpath(p))} is missing); "
                             "point it at an existing file") from None
        raise ArSSRError(f"{name}: cannot be opened ({_one_line(e.strerror or e)}); check the path and its permissions") from None


class _NoteOnce(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = _one_line(record.getMessage())
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


def _size_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (OSError, ValueError):
        return 2**63


def _check_data_size(img, shape, dtype: np.dtype, what: str) -> None:
    """Believe no header before its file is known to hold the data and memory to take it.

    Refuses a volume that would not fit in free memory, and a file (plain or compressed)
    that holds fewer voxel bytes than its header claims, before anything is allocated.
    """
    voxels = math.prod(shape[:3])
    needed = voxels * (dtype.itemsize + 8)  # the raw bytes, the float32 result and a scaling temporary
    available = _host_available_bytes()
    if needed > 0.8 * available:
        raise ArSSRError(
            f"{what}: its header claims {_size_text(shape)} voxels, which need about {needed / 2**30:.1f} GiB to read "
            f"but only {available / 2**30:.1f} GiB is free; crop the image first (e.g. fslroi) or use a larger machine"
        )
    holder = getattr(img, "file_map", {}).get("image")
    filename = getattr(holder, "filename", None)
    if filename is None or not os.path.isfile(filename):
        return
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    claimed = offset + math.prod(shape) * dtype.itemsize
    low = filename.lower()
    compressed = low.endswith((".gz", ".bz2", ".zst"))
    if not compressed:
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

        with ImageOpener(filename, "rb") as stream:
            while count < claimed:
                chunk = stream.read(min(_STREAM_CHUNK, claimed - count))
                if not chunk:
                    break
                count += len(chunk)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise ArSSRError(f"{what}: its compressed data is corrupt ({type(e).__name__}: {_one_line(e)}); re-export it") from None
    if count < claimed:
        raise ArSSRError(
            f"{what}: is truncated or corrupt: its header claims {_size_text(shape)} voxels ({claimed:,} bytes uncompressed) "
            f"but the file unpacks to {count:,} bytes; re-export or re-download it"
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


def header_shape(path: str | os.PathLike) -> tuple | None:
    """The image shape its header states, or None when the header cannot be read (then
    :func:`load` names the problem)."""
    try:
        return tuple(int(n) for n in nib.load(os.fspath(path)).shape)
    except Exception:
        return None


def load(path: str | os.PathLike, volume_index: int | None = None) -> Volume:
    """Read a 3D volume (or volume ``volume_index`` of a 4D series) as float32."""
    p = os.fspath(path)
    name = _name(p)
    if not os.path.lexists(p):
        raise ArSSRError(f"{name}: no such file; check the path (and the current directory {_name(os.getcwd())})")
    _check_link(p, name)
    if os.path.isdir(p):
        raise ArSSRError(f"{name}: is a directory, not a NIfTI file; give the path of a .nii or .nii.gz file inside it")
    if not os.access(p, os.R_OK):
        raise ArSSRError(f"{name}: permission denied; make the file readable (chmod u+r) or copy it somewhere readable")

    try:
        with _nibabel_notes(name):
            img = nib.load(p)
    except MemoryError:
        raise
    except Exception as e:  # ImageFileError, HeaderDataError, OSError, EOFError, gzip.BadGzipFile, ...
        raise ArSSRError(
            f"{name}: could not be read as a NIfTI/Analyze image ({type(e).__name__}: {_one_line(e)}); "
            "give a valid .nii or .nii.gz file (convert DICOM with e.g. dcm2niix)"
        ) from e

    kind = type(img).__name__
    what = f"{name} ({kind})"
    if not isinstance(img, SpatialImage):
        raise ArSSRError(f"{what}: is not a voxel image with an affine; give a 3D NIfTI volume (.nii or .nii.gz)")

    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind == "c":
        raise ArSSRError(f"{what}: has complex-valued voxels ({dtype}); save the magnitude image first (e.g. fslcomplex -realabs)")
    if dtype.kind not in "biuf":
        raise ArSSRError(f"{what}: has non-numeric voxels (dtype {dtype}, e.g. RGB); give a single-channel intensity image")

    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise ArSSRError(f"{what}: is a {len(shape)}D image of shape {shape}; ArSSR needs a 3D volume")
    if 0 in shape:
        raise ArSSRError(f"{what}: is empty (shape {shape}); give a non-empty 3D volume")
    if 1 in shape[:3]:
        flat = ("a single 2D slice", "a 1D line of voxels", "a single voxel")[shape[:3].count(1) - 1]
        raise ArSSRError(
            f"{what}: is {flat} (shape {shape[:3]}); ArSSR needs a 3D volume with at least 2 voxels along every axis"
        )
    extra = [(axis, n) for axis, n in enumerate(shape[3:], start=3) if n > 1]
    if len(extra) > 1:
        raise ArSSRError(
            f"{what}: has {len(shape)}D data of shape {shape} with several non-singleton extra axes; "
            "extract one 3D volume first (e.g. fslroi)"
        )
    n_vols = extra[0][1] if extra else 1

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

    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ArSSRError(
            f"{what}: has a degenerate voxel-to-world affine {_one_line(np.array2string(np.asarray(affine)))}; "
            "fix the header (pixdim / sform / qform) so every voxel axis has a nonzero size"
        )

    _check_data_size(img, shape, dtype, what)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become Inf: reported below
            data = _read_voxels(img, shape, n_vols, volume_index)
    except MemoryError:
        raise ArSSRError(f"{what}: not enough memory to read its {_size_text(shape[:3])} voxels; "
                         "free memory or crop the image first (e.g. fslroi)") from None
    except Exception as e:
        raise ArSSRError(
            f"{what}: voxel data could not be read ({type(e).__name__}: {_one_line(e)}); the file is probably truncated or corrupt, re-export it"
        ) from e
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape != shape[:3]:  # pragma: no cover - defensive
        raise ArSSRError(f"{what}: read data of shape {data.shape}, expected {shape[:3]}; the file is corrupt, re-export it")
    return _finite_volume(img, data, shape, volume_index, what)


def _read_voxels(img, shape, n_vols, volume_index) -> np.ndarray:
    if len(shape) == 3:
        return img.get_fdata(dtype=np.float32, caching="unchanged")
    if n_vols == 1 and volume_index in (None, 0):
        return img.get_fdata(dtype=np.float32, caching="unchanged").reshape(shape[:3])
    index = int(volume_index or 0)
    slicer = (slice(None),) * 3 + tuple(index if n > 1 else 0 for n in shape[3:])
    return np.asarray(img.dataobj[slicer], dtype=np.float32)


def _finite_volume(img, data, shape, volume_index, what) -> Volume:
    finite = np.isfinite(data)
    if not finite.all():
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
    return Volume(data=data, affine=np.array(img.affine, dtype=np.float64), header=img.header)


def load_grid(path: str | os.PathLike, role: str = "--like image") -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of an image's voxel grid, from its header only (no voxel is read).

    Refuses what :func:`load` refuses about the header: a missing or unreadable file, fewer
    than 3 dimensions, an empty grid, a degenerate or non-finite affine.
    """
    p = os.fspath(path)
    name = f"{role} {_name(p)}"
    if not os.path.lexists(p):
        raise ArSSRError(f"{name}: no such file; give the path of the image whose grid to use")
    _check_link(p, name)
    if os.path.isdir(p):
        raise ArSSRError(f"{name}: is a directory; give the path of a .nii or .nii.gz file")
    try:
        with _nibabel_notes(name):
            img = nib.load(p)
    except Exception as e:
        raise ArSSRError(f"{name}: could not be read as a NIfTI/Analyze image ({type(e).__name__}: {_one_line(e)}); "
                         "give a valid .nii or .nii.gz file") from None
    if not isinstance(img, SpatialImage):
        raise ArSSRError(f"{name}: is not a voxel image with an affine; give a 3D NIfTI image")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise ArSSRError(f"{name}: is {len(shape)}D (shape {shape}); its grid must be 3D")
    if 0 in shape[:3]:
        raise ArSSRError(f"{name}: has an empty grid (shape {shape}); give an image with voxels")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ArSSRError(
            f"{name}: has a degenerate voxel-to-world affine {_one_line(np.array2string(np.asarray(affine)))}; "
            "fix its header (pixdim / sform / qform) so every voxel axis has a nonzero, finite size"
        )
    return shape[:3], np.array(affine, dtype=np.float64)


# --------------------------------------------------------------------------- output path


def check_output_path(out_path: str | os.PathLike, in_path: str | os.PathLike | None = None) -> None:
    """Refuse an output path that cannot or must not be written. Call before expensive work."""
    out = os.fspath(out_path)
    name = _name(out)
    if isinstance(out, bytes):
        out = os.fsdecode(out)
    if not out:
        raise ArSSRError("output path is empty; give a file name ending in .nii or .nii.gz")
    if os.path.isdir(out):
        raise ArSSRError(f"output {name}: is an existing directory; give a file name inside it, e.g. {_name(os.path.join(out, 'sr.nii.gz'))}")
    if _ext(out) is None:
        stem = out[:-1] if out.endswith(os.sep) else out
        raise ArSSRError(f"output {name}: must end in .nii or .nii.gz; e.g. use {_name(os.path.splitext(stem)[0] + '.nii.gz')}")
    if in_path is not None:
        inp = os.fspath(in_path)
        same = os.path.realpath(out) == os.path.realpath(inp)
        if not same and os.path.exists(out) and os.path.exists(inp):
            try:
                same = os.path.samefile(out, inp)
            except OSError:
                same = False
        if same:
            raise ArSSRError(f"output {name}: is the input file {_name(inp)}; choose a different output path so the input is not overwritten")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.exists(parent):
        raise ArSSRError(f"output {name}: directory {_name(parent)} does not exist; create it first (mkdir -p {_name(parent)})")
    if not os.path.isdir(parent):
        raise ArSSRError(f"output {name}: {_name(parent)} is not a directory; choose an output inside an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArSSRError(f"output {name}: directory {_name(parent)} is not writable; choose a writable directory or fix its permissions")


OUTPUT_MARK = "arssr-jax"  # begins the description (descrip) of every super-resolved volume the tool writes


def written_by_arssr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a NIfTI whose description says arssr-jax wrote it (False for anything unreadable)."""
    try:
        descrip = bytes(nib.load(os.fspath(path)).header["descrip"])
    except Exception:  # any file nibabel cannot read as an image is, a fortiori, not one of ours
        return False
    return descrip.startswith(OUTPUT_MARK.encode())


def check_overwrite(out_path: str | os.PathLike) -> None:
    """Refuse to replace an existing file that arssr-jax did not write (a scan named as an output by mistake,
    e.g. ``upsample a.nii.gz b.nii.gz`` meant as two inputs). A previous output is replaced silently."""
    if os.path.isfile(out_path) and not written_by_arssr(out_path):
        raise ArSSRError(f"output {_name(out_path)} exists and was not written by arssr-jax (several inputs need "
                         "--out-dir DIR); pass --overwrite to replace it")


def output_description(input_header: Any = None) -> bytes:
    """The description of a super-resolved volume: the mark, then the input's own (80 bytes at most)."""
    try:
        own = bytes(input_header["descrip"]).rstrip(b"\0").strip()
    except (KeyError, TypeError, ValueError):  # no header, or one without a description
        own = b""
    return (OUTPUT_MARK.encode() + (b"; " + own if own else b""))[:80]


# --------------------------------------------------------------------------- save


def _build_image(volume: Volume, like_header: Any, description: bytes | None = None) -> SpatialImage:
    data = np.asarray(volume.data, dtype=np.float32)
    affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ArSSRError(f"cannot save a volume with a degenerate affine {_one_line(np.array2string(affine))}; "
                         "give every voxel axis a nonzero, finite size")
    hdr = like_header if like_header is not None else volume.header
    nifti_hdr = hdr if isinstance(hdr, Nifti1Header) else None  # Nifti2Header subclasses it

    use_nifti2 = isinstance(hdr, Nifti2Header) or max(data.shape) > _NIFTI1_MAX_DIM
    cls = nib.Nifti2Image if use_nifti2 else nib.Nifti1Image
    img = cls(data, affine)
    img.set_data_dtype(np.float32)
    out_hdr = img.header

    qcode = scode = 0
    if nifti_hdr is not None:
        qcode = int(nifti_hdr["qform_code"])
        scode = int(nifti_hdr["sform_code"])
        xyz_unit, t_unit = nifti_hdr.get_xyzt_units()
        out_hdr.set_xyzt_units(xyz_unit, t_unit)
    else:
        out_hdr.set_xyzt_units("mm")
    if description is not None:
        out_hdr["descrip"] = description
    elif hdr is not None:
        try:
            out_hdr["descrip"] = hdr["descrip"]
        except (KeyError, ValueError, TypeError):
            pass
    # qform first (it sets pixdim from the affine's column norms), then the exact sform.
    img.set_qform(affine, code=qcode or 1)
    img.set_sform(affine, code=scode or 1)
    out_hdr.set_zooms(tuple(float(z) for z in np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))))
    return img


def save(volume: Volume, path: str | os.PathLike, like_header: Any = None, description: bytes | None = None) -> None:
    """Write ``volume`` as float32 NIfTI to ``path`` (.nii or .nii.gz), atomically.

    The image goes to a hidden temporary file next to ``path`` which is renamed
    over ``path`` only once completely written and flushed; on any failure the
    temporary file is removed and an existing file at ``path`` is left untouched.
    Header fields (units, description, qform/sform codes) come from
    ``like_header`` if given, else from ``volume.header``; ``description`` (at most
    80 bytes) replaces the description.
    """
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    check_output_path(p)
    ext = _ext(p)
    assert ext is not None
    img = _build_image(volume, like_header, description)

    parent = os.path.dirname(os.path.abspath(p))
    base = os.path.basename(p)
    stem = base[: len(base) - len(ext)]
    tmp = None
    try:
        tempfiles.remove_stale(parent, stem, ext)  # left by a run that was killed while writing
        tmp = tempfiles.make_temp(parent, stem, ext)
        with open(tmp, "wb") as raw:
            os.fchmod(raw.fileno(), 0o666 & ~tempfiles.umask())
            if ext.lower().endswith(".gz"):
                # name the member after the final file, not the temporary one; mtime 0 keeps output reproducible
                with gzip.GzipFile(filename=base[:-3], mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
                    img.to_file_map({"image": nib.FileHolder(fileobj=gz)})
            else:
                img.to_file_map({"image": nib.FileHolder(fileobj=raw)})
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise ArSSRError(f"output {_name(p)}: could not be written ({_one_line(e)}); check free disk space and permissions, or choose another path") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    try:  # make the rename itself durable; best effort
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
