"""Writing: :func:`save` (float32 NIfTI, atomic) and the mark that tells arssr-jax's outputs apart.

:func:`save` sets the sform and the qform both to the volume's affine and writes through a
temporary file in the output directory renamed over the target once complete; temporaries
of the same output left by a killed run are removed (:mod:`arssr_jax.tempfiles`).
:func:`check_overwrite` lets an output replace only a file that carries the mark.

Precision: NIfTI-1 stores the sform as float32, so an affine survives a round trip exactly
when its entries are float32-representable (any affine read from a NIfTI-1 file is);
volumes over 32767 voxels along an axis, or saved like a NIfTI-2 header, are written as
NIfTI-2, which stores float64.
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np
import nibabel as nib
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header
from nibabel.spatialimages import SpatialImage

from arssr_jax import tempfiles
from arssr_jax.errors import ArSSRError
from arssr_jax.nifti.paths import check_output_path, nifti_extension, one_line, show
from arssr_jax.nifti.volume import Volume, check_affine

__all__ = ["save", "OUTPUT_MARK", "output_description", "written_by_arssr", "check_overwrite"]

OUTPUT_MARK = "arssr-jax"  # begins the description (descrip) of every super-resolved volume the tool writes
_NIFTI1_MAX_DIM = 32767
_GZIP_LEVEL = 1  # nibabel's own default for .nii.gz: fast, most of the gain


# --------------------------------------------------------------------------- the mark


def output_description(input_header: Any = None) -> bytes:
    """The description of a super-resolved volume: the mark, then the input's own (80 bytes at most)."""
    try:
        own = bytes(input_header["descrip"]).rstrip(b"\0").strip()
    except (KeyError, TypeError, ValueError):  # no header, or one without a description
        own = b""
    return (OUTPUT_MARK.encode() + (b"; " + own if own else b""))[:80]


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
        raise ArSSRError(f"output {show(out_path)} exists and was not written by arssr-jax (several inputs need "
                         "--out-dir DIR); pass --overwrite to replace it")


# --------------------------------------------------------------------------- save


def _build_image(volume: Volume, affine: np.ndarray, like_header: Any, description: bytes | None) -> SpatialImage:
    data = np.asarray(volume.data, dtype=np.float32)
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
    affine = check_affine(volume.affine, f"output {show(p)}", fix="give the volume an affine")
    ext = nifti_extension(p)
    assert ext is not None
    img = _build_image(volume, affine, like_header, description)

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
        raise ArSSRError(f"output {show(p)}: could not be written ({one_line(e)}); check free disk space and permissions, or choose another path") from e
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
