"""Interpolation onto the voxel-centre HR grid ArSSR decodes (numpy + scipy only).

HR voxel i of m along an axis of n LR voxels sits at the continuous LR index
p = (i + 0.5) * n / m - 0.5 (the centre of the same [-1, 1] cube):

* :func:`tricubic` - order-3 B-spline interpolation (``scipy.ndimage.map_coordinates``
  with the spline prefilter), boundary mode ``'reflect'`` (half-sample symmetric:
  the signal is mirrored about the outer voxel *faces*, the faces of the [-1, 1] cube,
  as in the centred LR simulation of ``arssr_jax.data.degrade``). It equals
  ``scipy.ndimage.zoom(lr, m / n, order=3, grid_mode=True, mode='reflect')``
  whenever that zoom gives m voxels.
* :func:`nearest` - nearest-neighbour on the same grid (a sanity floor).

The fixed-scale baseline CNNs take the tricubic volume as input; the training data
pipeline builds it here too, so worker processes never import JAX.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from arssr_jax.coords import centre_positions
from arssr_jax.errors import ArSSRError

TRICUBIC_BOUNDARY_MODE = "reflect"


def _target_shape(lr_shape, shape=None, scale=None) -> tuple:
    if shape is not None:
        shape = tuple(int(m) for m in shape)
        if len(shape) != len(lr_shape) or any(m < 1 for m in shape):
            raise ArSSRError(f"target shape {shape} must be {len(lr_shape)} positive integers")
        return shape
    if scale is None:
        raise ArSSRError("give a target shape or a scale")
    scales = np.broadcast_to(np.asarray(scale, np.float64), (len(lr_shape),))
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ArSSRError(f"scale must be positive and finite, got {scale}")
    return tuple(max(1, int(np.floor(n * s + 1e-9))) for n, s in zip(lr_shape, scales))


def spline_matrix(n: int, positions, order: int = 3, mode: str = TRICUBIC_BOUNDARY_MODE) -> np.ndarray:
    """(len(positions), n) matrix W: the order-``order`` spline interpolant of any n samples,
    evaluated at ``positions`` (continuous sample indices), is W @ samples (float64)."""
    positions = np.asarray(positions, np.float64)[None]
    columns = [ndimage.map_coordinates(np.eye(n)[j], positions, order=order, mode=mode, prefilter=order > 1,
                                       output=np.float64) for j in range(n)]
    return np.stack(columns, axis=1)


def resample_axes(volume, positions, order: int = 3, mode: str = TRICUBIC_BOUNDARY_MODE, dtype=np.float64):
    """The order-``order`` spline of ``volume`` at the Cartesian product of ``positions`` (one
    array of continuous voxel indices per axis), computed in ``dtype``.

    A tensor-product spline is separable: one 1D matrix per axis (identical to
    map_coordinates over the 3D grid, and much cheaper)."""
    data = np.asarray(volume, dtype)
    for axis, axis_positions in enumerate(positions):
        weights = spline_matrix(data.shape[axis], axis_positions, order, mode).astype(dtype)
        data = np.moveaxis(np.tensordot(weights, data, axes=(1, axis)), 0, axis)
    return data


def _interpolate(lr, order: int, shape=None, scale=None, mode: str = TRICUBIC_BOUNDARY_MODE) -> np.ndarray:
    lr = np.asarray(lr)
    if lr.ndim != 3:
        raise ArSSRError(f"interpolation needs a 3D volume, got shape {lr.shape}")
    shape = _target_shape(lr.shape, shape, scale)
    positions = [centre_positions(m, n) for n, m in zip(lr.shape, shape)]
    return resample_axes(lr, positions, order, mode).astype(np.float32)


def tricubic(lr, shape=None, scale=None, mode: str = TRICUBIC_BOUNDARY_MODE) -> np.ndarray:
    """Order-3 spline upsampling of ``lr`` onto the voxel-centre HR grid.

    ``shape``: the HR shape (preferred: decode by target shape); else ``scale`` gives
    int(n * s) voxels per axis as ArSSR's grid does. Computed in float64, returned float32.
    """
    return _interpolate(lr, 3, shape, scale, mode)


def nearest(lr, shape=None, scale=None) -> np.ndarray:
    """Nearest-neighbour upsampling onto the same voxel-centre HR grid."""
    return _interpolate(lr, 0, shape, scale, "nearest")


INTERPOLATORS: dict[str, Callable] = {"tricubic": tricubic, "nearest": nearest}
