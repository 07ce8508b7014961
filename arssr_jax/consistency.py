"""Data consistency: pull the super-resolved volume back into agreement with its input.

The degradation the models are trained for (and the evaluation simulates) takes LR voxel j
as the cubic-spline value of the HR volume at that voxel's centre. The network's output
does not satisfy this exactly: where it misjudges the low frequencies, sampling it at the
LR centres gives back something other than the input. One step of back-projection
(Irani and Peleg, 1991) removes a fraction of that disagreement:

    sr <- sr + step * tricubic(lr - sr sampled at the LR voxel centres)

``step=1`` makes the output agree with the input almost exactly and keeps the network's
detail only where the LR cannot see it; ``step=0`` leaves the network's output as it is.
A further step changes almost nothing (tricubic interpolation followed by sampling at the
LR centres is close to the identity), so one is applied.

The step may depend on the scale (a *schedule*: (scale, step) pairs, linear in between and
held beyond the ends): the larger the scale, the more of the output the LR cannot see, and
the more a smooth correction can cost the network's detail there.

Any target grid at least as fine as the input along each of its axes works, oblique ones
too: the HR grid's index map places the LR voxel centres in it. LR voxels whose centre lies
outside the HR grid's extent (a region, or a ``--like`` grid that covers part of the input)
are not compared: the output cannot be checked against what it does not contain. Other grids
(a line profile, a downsampling) are returned as decoded.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from arssr_jax.coords import TargetGrid
from arssr_jax.interpolation import TRICUBIC_BOUNDARY_MODE, resample_axes
from arssr_jax.slice_profile import profile_matrix

SLAB_VOXELS = 1 << 21  # oblique grids: HR voxels resampled per map_coordinates call
# Output-sized float32 arrays alive at once while a step runs: the decoded grid, the correction
# and the intermediate of the last separable pass (inference checks free memory for them).
OUTPUT_COPIES = 3


def back_project(sr: np.ndarray, lr: np.ndarray, grid: TargetGrid, step: float) -> np.ndarray:
    """``sr`` (on ``grid``) moved ``step`` of the way towards agreeing with ``lr`` (float32)."""
    sr = np.asarray(sr, np.float32)
    if step == 0 or not is_super_resolution(grid):
        return sr
    lr = np.asarray(lr, np.float32)
    lr_in_hr = np.linalg.inv(grid.index_map)  # LR voxel index -> continuous HR voxel index
    seen = points_inside(lr_in_hr, lr.shape, sr.shape)
    residual = np.where(seen, lr - resample(sr, lr_in_hr, lr.shape), np.float32(0))
    correction = resample(residual, grid.index_map, sr.shape)
    correction *= np.float32(step)  # in place: large grids hold no third copy
    correction += sr
    return correction


def back_project_slices(sr: np.ndarray, lr: np.ndarray, grid: TargetGrid, axis: int, profile: str = "box",
                        width=None, iterations: int = 2) -> np.ndarray:
    """``sr`` brought into agreement with a thick-slice ``lr`` that measures it along ``axis``
    with a slice ``profile`` (:mod:`arssr_jax.slice_profile`; ``width`` in HR voxels, the box's
    thickness or the Gaussian's FWHM; None: the slice spacing): each iteration adds the tricubic
    interpolant of ``lr - profile(sr)``; two remove nearly all of it (a third changed no PSNR).
    For grids that keep the other two axes as they are (a thick-slice scan brought to thin
    slices); :func:`slices_measurable` tells."""
    sr = np.asarray(sr, np.float32)
    lr = np.asarray(lr, np.float32)
    linear, shift = np.asarray(grid.index_map, np.float64)[axis, axis], grid.index_map[axis][3]
    ratio = 1.0 / linear  # HR voxels per slice
    offset = 0.5 - shift * ratio - 0.5 * ratio  # slice 0's centre, in HR face units, less half a slice
    matrix = profile_matrix(lr.shape[axis], sr.shape[axis], ratio, profile, width, offset).astype(np.float32)
    for _ in range(iterations):
        measured = np.moveaxis(np.tensordot(matrix, sr, axes=([1], [axis])), 0, axis)
        sr = sr + resample(lr - measured, grid.index_map, sr.shape)
    return sr


def slices_measurable(grid: TargetGrid, lr_shape, axis: int) -> bool:
    """Whether :func:`back_project_slices` applies: an axis-aligned grid that refines ``axis``
    and keeps every other axis's voxels where the input has them."""
    linear = np.asarray(grid.index_map, np.float64)[:3, :3]
    others = [k for k in range(3) if k != axis]
    return bool(np.all(linear == np.diag(np.diag(linear))) and 0 < linear[axis, axis] < 1
                and all(grid.shape[k] == lr_shape[k] and linear[k, k] == 1 and grid.index_map[k][3] == 0
                        for k in others))


def grid_scales(grid: TargetGrid) -> tuple:
    """HR voxels per LR voxel along each of the input's axes (any orientation)."""
    linear = np.asarray(grid.index_map, np.float64)[:3, :3]
    return tuple(float(1.0 / np.linalg.norm(row)) for row in linear)


def grid_scale(grid: TargetGrid) -> float:
    """HR voxels per LR voxel along an axis, as the geometric mean over the three axes (2 for
    x2; 1.59 for 1 x 1 x 4); any orientation."""
    linear = np.asarray(grid.index_map, np.float64)[:3, :3]
    return float(abs(np.linalg.det(linear)) ** (-1 / 3))


def is_super_resolution(grid: TargetGrid) -> bool:
    """The grid spans three dimensions and steps at most one LR voxel along each of its axes."""
    linear = np.asarray(grid.index_map, np.float64)[:3, :3]
    return bool(abs(np.linalg.det(linear)) > 0 and np.all(np.linalg.norm(linear, axis=0) <= 1 + 1e-9))


def _points(index_map, shape, start=0, stop=None) -> np.ndarray:
    """(3, N) continuous indices that ``index_map`` gives voxels ``start:stop`` (along axis 0) of ``shape``."""
    stop = shape[0] if stop is None else stop
    index = np.indices((stop - start, *shape[1:]), np.float64).reshape(3, -1)
    index[0] += start
    return index_map[:3, :3] @ index + index_map[:3, 3:]


def points_inside(index_map, shape, extent) -> np.ndarray:
    """Which voxels of ``shape``, placed by ``index_map``, lie within a volume of ``extent``
    voxels (within half a voxel of its outer centres)."""
    points = _points(np.asarray(index_map, np.float64), tuple(shape))
    inside = np.all([(points[a] >= -0.5) & (points[a] <= extent[a] - 0.5) for a in range(3)], axis=0)
    return inside.reshape(tuple(shape))


def resample(volume: np.ndarray, index_map: np.ndarray, shape) -> np.ndarray:
    """The cubic spline of ``volume`` (half-sample symmetric boundaries) at every voxel of
    ``shape``, placed in ``volume``'s continuous voxel indices by ``index_map`` (float32)."""
    index_map = np.asarray(index_map, np.float64)
    linear = index_map[:3, :3]
    if np.all(linear == np.diag(np.diag(linear))):  # axis-aligned: separable, cheap on large grids
        positions = [linear[a, a] * np.arange(m) + index_map[a, 3] for a, m in enumerate(shape)]
        return resample_axes(volume, positions, dtype=np.float32)
    return _resample_oblique(volume, index_map, tuple(shape))


def _resample_oblique(volume, index_map, shape):
    """Rotated or sheared maps: ``map_coordinates`` over slabs of the target grid."""
    coefficients = ndimage.spline_filter(np.asarray(volume, np.float64), order=3, mode=TRICUBIC_BOUNDARY_MODE)
    out = np.empty(shape, np.float32)
    rows = max(1, SLAB_VOXELS // max(int(np.prod(shape[1:])), 1))
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        values = ndimage.map_coordinates(coefficients, _points(index_map, shape, start, stop), order=3,
                                         mode=TRICUBIC_BOUNDARY_MODE, prefilter=False, output=np.float64)
        out[start:stop] = values.reshape(stop - start, *shape[1:])
    return out
