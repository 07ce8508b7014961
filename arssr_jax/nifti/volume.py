"""The :class:`Volume` (voxels and their affine) and the one rule every affine must meet."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.nifti.paths import one_line

__all__ = ["Volume", "check_affine"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in nibabel (i, j, k) voxel order with its voxel-to-world affine.

    ``header`` is the source nibabel header (or None); :func:`~arssr_jax.nifti.save` copies
    the spatial/temporal units, the description and the qform/sform codes from it.
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


def check_affine(affine: Any, what: str, fix: str = "fix the header (pixdim / sform / qform)") -> np.ndarray:
    """``affine`` as a float64 4x4 array, or an error when it is missing, non-finite or singular
    (a voxel axis of zero size): ``what`` names the image in the message, ``fix`` says what to do."""
    matrix = None if affine is None else np.asarray(affine, dtype=np.float64)
    if matrix is None or matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) \
            or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ArSSRError(f"{what}: has a degenerate voxel-to-world affine {one_line(np.array2string(np.asarray(affine)))}; "
                         f"{fix} so every voxel axis has a nonzero, finite size")
    return matrix
