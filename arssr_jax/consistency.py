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
from arssr_jax.interpolation import TRICUBIC_BOUNDARY_MODE, spline_matrix

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
    seen, resampled = resample(sr, lr_in_hr, lr.shape)
    residual = np.where(seen, lr - resampled, np.float32(0))
    _, correction = resample(residual, grid.index_map, sr.shape)
    correction *= np.float32(step)  # in place: large grids hold no third copy
    correction += sr
    return correction


def is_super_resolution(grid: TargetGrid) -> bool:
    """The grid spans three dimensions and steps at most one LR voxel along each of its axes."""
    linear = np.asarray(grid.index_map, np.float64)[:3, :3]
    return bool(abs(np.linalg.det(linear)) > 0 and np.all(np.linalg.norm(linear, axis=0) <= 1 + 1e-9))


def resample(volume: np.ndarray, index_map: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """The cubic spline of ``volume`` (half-sample symmetric boundaries) at every voxel of
    ``shape``, placed in ``volume``'s continuous voxel indices by ``index_map``; and which of
    those points lie inside ``volume``'s extent (within half a voxel of its outer centres)."""
    index_map = np.asarray(index_map, np.float64)
    linear = index_map[:3, :3]
    if np.all(linear == np.diag(np.diag(linear))):
        return _resample_separable(volume, index_map, shape)
    return _resample_oblique(volume, index_map, shape)


def _inside(positions, n) -> np.ndarray:
    return (positions >= -0.5) & (positions <= n - 0.5)


def _resample_separable(volume, index_map, shape):
    """Axis-aligned maps: one 1D spline matrix per axis (exact, and cheap on large grids)."""
    data, seen = np.asarray(volume, np.float32), np.ones(tuple(shape), bool)
    for axis, m in enumerate(shape):
        positions = index_map[axis, axis] * np.arange(m) + index_map[axis, 3]
        weights = spline_matrix(volume.shape[axis], positions).astype(np.float32)
        data = np.moveaxis(np.tensordot(weights, data, axes=(1, axis)), 0, axis)
        outside = ~_inside(positions, volume.shape[axis])
        seen[(slice(None),) * axis + (outside,)] = False
    return seen, data


def _resample_oblique(volume, index_map, shape):
    """Rotated or sheared maps: ``map_coordinates`` over slabs of the target grid."""
    coefficients = ndimage.spline_filter(np.asarray(volume, np.float64), order=3, mode=TRICUBIC_BOUNDARY_MODE)
    out, seen = np.empty(tuple(shape), np.float32), np.empty(tuple(shape), bool)
    plane = int(np.prod(shape[1:]))
    rows = max(1, SLAB_VOXELS // max(plane, 1))
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        index = np.indices((stop - start, *shape[1:]), np.float64).reshape(3, -1)
        index[0] += start
        points = index_map[:3, :3] @ index + index_map[:3, 3:]
        values = ndimage.map_coordinates(coefficients, points, order=3, mode=TRICUBIC_BOUNDARY_MODE,
                                         prefilter=False, output=np.float64)
        inside = np.all([_inside(points[a], volume.shape[a]) for a in range(3)], axis=0)
        out[start:stop] = values.reshape(stop - start, *shape[1:])
        seen[start:stop] = inside.reshape(stop - start, *shape[1:])
    return seen, out
