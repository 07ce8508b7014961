"""Voxel-centre coordinates in the normalised [-1, 1] cube.

Conventions (grid_sample with ``align_corners=False``): along an axis of ``n`` voxels
the voxel centres sit at ``-1 + (2 i + 1) / n`` and the cube's faces at -1 and +1 are
the outer voxel faces. Coordinate entry k always indexes array axis k (nibabel's
i, j, k order). A grid is the Cartesian product of three axes, "ij" indexing,
flattened row-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from arssr_jax.errors import ArSSRError


def axis_centres(n: int, dtype=np.float32) -> np.ndarray:
    """Normalised voxel-centre coordinates of an axis of ``n`` voxels."""
    return (-1.0 + (2.0 * np.arange(n, dtype=np.float64) + 1.0) / n).astype(dtype)


def make_grid(shape, dtype=np.float32, flatten: bool = True) -> np.ndarray:
    """Voxel-centre coordinates of a volume of ``shape`` (3 ints).

    Returns ``(prod(shape), 3)`` when ``flatten`` else ``(*shape, 3)``.
    """
    axes = [axis_centres(int(n), dtype) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return grid.reshape(-1, len(shape)) if flatten else grid


def centre_positions(count: int, length: int) -> np.ndarray:
    """Continuous voxel indices, on an axis of ``length`` voxels, of the centres of ``count``
    voxels spanning the same extent (float64). HR centres in LR indices:
    ``centre_positions(m, n)``; LR centres in HR indices: ``centre_positions(n, m)``."""
    return (np.arange(count, dtype=np.float64) + 0.5) * (length / count) - 0.5


def normalised_to_index(coords, n):
    """Continuous voxel index of a normalised coordinate (voxel centres at integers)."""
    return ((np.asarray(coords) + 1.0) * np.asarray(n) - 1.0) / 2.0


def index_to_normalised(index, n):
    """Normalised coordinate of a continuous voxel index; inverse of normalised_to_index."""
    return (2.0 * np.asarray(index) + 1.0) / np.asarray(n) - 1.0


# --------------------------------------------------------------------------- target grids
#
# A target grid is an HR shape plus the 4x4 map from HR voxel indices to continuous LR
# voxel indices. Its world affine is lr_affine @ index_map, so every HR voxel centre is
# placed exactly where it was sampled (the reference's "keep origin, divide spacing"
# misplaces the grid: docs/REFERENCE.md section 4).


@dataclass(frozen=True)
class TargetGrid:
    shape: tuple  # HR voxels per axis
    index_map: np.ndarray  # 4x4: HR voxel index -> LR continuous voxel index

    def affine(self, lr_affine) -> np.ndarray:
        """World affine of the HR grid given the LR volume's affine."""
        return np.asarray(lr_affine, np.float64) @ self.index_map

    @property
    def is_axis_aligned(self) -> bool:
        linear = self.index_map[:3, :3]
        return bool(np.all(linear == np.diag(np.diag(linear))))

    @property
    def num_voxels(self) -> int:
        return math.prod(int(m) for m in self.shape)  # Python ints: no int64 wrap-around


def _centred_grid(lr_shape, hr_shape, steps) -> TargetGrid:
    """HR grid of ``hr_shape`` voxels ``steps`` LR voxels apart, centred on the LR field of view."""
    index_map = np.eye(4)
    for axis, (n, m, step) in enumerate(zip(lr_shape, hr_shape, steps)):
        index_map[axis, axis] = step
        index_map[axis, 3] = (n - 1) / 2.0 - (m - 1) / 2.0 * step
    return TargetGrid(tuple(int(m) for m in hr_shape), index_map)


def _per_axis(value, name) -> tuple:
    values = np.broadcast_to(np.asarray(value, np.float64), (3,)) if np.ndim(value) == 0 else np.asarray(value, np.float64)
    if values.shape != (3,):
        raise ArSSRError(f"{name} takes one value or three (one per axis), got {np.ndim(value) and len(value)}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ArSSRError(f"{name} must be positive and finite, got {value}")
    return tuple(float(v) for v in values)


# More voxels along one axis than any volume can hold (2^31 - 1 voxels in all): refused
# before the count is turned into an integer, so 1e308 is an error, not an overflow.
MAX_AXIS_VOXELS = 2**31 - 1


def _axis_count(value: float, axis: int, what: str) -> int:
    if not value <= MAX_AXIS_VOXELS:  # also catches inf
        raise ArSSRError(f"{what} gives {value:.3g} voxels along axis {axis}, more than any volume can hold "
                         f"({MAX_AXIS_VOXELS:,}); use a smaller scale or a larger voxel size")
    return max(1, int(value))


def grid_for_scale(lr_shape, scale) -> TargetGrid:
    """int(n * s) HR voxels per axis over the LR field of view (the reference CLI's grid).

    The HR voxel centres are those of a voxel-centre grid over the same [-1, 1] cube;
    the true HR spacing is n / int(n * s) LR voxels (not 1 / s when n * s is not an integer).
    """
    scales = _per_axis(scale, "scale")
    # int(n * s) as the reference, guarded against 7 * 1.1 = 7.700000000000001-style noise.
    hr_shape = tuple(_axis_count(np.floor(n * s + 1e-9), axis, f"scale {s:g}")
                     for axis, (n, s) in enumerate(zip(lr_shape, scales)))
    return _centred_grid(lr_shape, hr_shape, [n / m for n, m in zip(lr_shape, hr_shape)])


def grid_for_shape(lr_shape, hr_shape) -> TargetGrid:
    """A voxel-centre grid of exactly ``hr_shape`` voxels over the LR field of view."""
    if len(hr_shape) != 3 or any(int(m) < 1 or int(m) > MAX_AXIS_VOXELS for m in hr_shape):
        raise ArSSRError(f"target shape must be three positive integers of at most {MAX_AXIS_VOXELS:,}, got {hr_shape}")
    return _centred_grid(lr_shape, hr_shape, [n / int(m) for n, m in zip(lr_shape, hr_shape)])


def grid_for_voxel_size(lr_shape, lr_voxel_size, voxel_size) -> TargetGrid:
    """Voxels of exactly ``voxel_size`` mm, round(n * spacing / size) per axis, centred on the LR field of view."""
    target = _per_axis(voxel_size, "voxel size")
    with np.errstate(over="ignore", divide="ignore"):  # an absurd size gives inf voxels: refused below
        steps = [t / s for t, s in zip(target, lr_voxel_size)]
        counts = [np.round(n / step) for n, step in zip(lr_shape, steps)]
    hr_shape = tuple(_axis_count(count, axis, f"voxel size {t:g}") for axis, (count, t) in enumerate(zip(counts, target)))
    return _centred_grid(lr_shape, hr_shape, steps)


def grid_like(lr_affine, ref_shape, ref_affine) -> TargetGrid:
    """Decode straight onto another image's grid (any affine, oblique included)."""
    if len(ref_shape) < 3:
        raise ArSSRError(f"reference grid must be 3D, got shape {tuple(ref_shape)}")
    lr_affine, ref_affine = np.asarray(lr_affine, np.float64), np.asarray(ref_affine, np.float64)
    for what, affine in (("input", lr_affine), ("reference grid", ref_affine)):
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ArSSRError(f"the {what}'s affine is degenerate or not finite; fix its header so every voxel "
                             "axis has a nonzero, finite size")
    index_map = np.linalg.solve(lr_affine, ref_affine)
    return TargetGrid(tuple(int(m) for m in ref_shape[:3]), index_map)


def index_map_to_normalised(index_map, lr_shape) -> np.ndarray:
    """4x4 map from HR voxel index to the normalised LR coordinate (c = (2 p + 1) / n - 1)."""
    n = np.asarray(lr_shape, np.float64)
    to_normalised = np.eye(4)
    to_normalised[:3, :3] = np.diag(2.0 / n)
    to_normalised[:3, 3] = 1.0 / n - 1.0
    return to_normalised @ np.asarray(index_map, np.float64)


def grid_for_region(start, stop, scale) -> TargetGrid:
    """A zoom: ``scale`` HR voxels per LR voxel over the LR index box [start, stop) per axis.

    ``start``/``stop`` are LR voxel indices (the box spans voxel faces start - 0.5 to
    stop - 0.5), e.g. start=(10, 12, 8), stop=(16, 18, 14), scale=8 decodes that 6^3
    region at 8x without decoding anything else.
    """
    start = np.broadcast_to(np.asarray(start, np.float64), (3,))
    stop = np.broadcast_to(np.asarray(stop, np.float64), (3,))
    scales = np.asarray(_per_axis(scale, "scale"))
    if np.any(stop <= start):
        raise ArSSRError(f"region stop {tuple(stop)} must exceed start {tuple(start)} on every axis")
    hr_shape = tuple(_axis_count(np.round(w * s), axis, f"scale {s:g}")
                     for axis, (w, s) in enumerate(zip(stop - start, scales)))
    index_map = np.eye(4)
    for axis in range(3):
        step = (stop[axis] - start[axis]) / hr_shape[axis]
        index_map[axis, axis] = step
        index_map[axis, 3] = start[axis] - 0.5 + step / 2
    return TargetGrid(hr_shape, index_map)


def grid_along_line(start, stop, num) -> TargetGrid:
    """``num`` points evenly spaced from LR index ``start`` to ``stop`` (inclusive): a 1 x 1 x num grid."""
    start, stop = np.asarray(start, np.float64), np.asarray(stop, np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = 0.0
    index_map[:3, 2] = (stop - start) / max(1, num - 1)
    index_map[:3, 3] = start
    return TargetGrid((1, 1, int(num)), index_map)
