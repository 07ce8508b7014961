"""Simulated LR patches: order-3 spline down-sampling of an HR patch to lr_size^3.

Two modes:

``reference``
    ``scipy.ndimage.zoom(hr, 1/s, order=3)`` with scipy's default corner-aligned
    grid (``grid_mode=False``, ``mode='constant'``), as the reference trains. The
    corner-aligned mapping depends only on the input and output shapes
    (LR index j -> HR index j * (m - 1) / (n - 1)), so we pass the factor
    ``n / m``: it always gives exactly ``n = lr_size`` voxels, and the result is
    identical to ``zoom(hr, 1/s)`` whenever that gives ``n`` voxels (always for
    s >= 2, since m / s >= n - 1/s rounds to n; tested).

``centred``
    Voxel-centre consistent: LR voxel j (centre at normalised coordinate
    c = -1 + (2j + 1)/n) takes the value of the cubic B-spline interpolant of the
    HR patch at continuous HR index ((c + 1) m - 1)/2 = (j + 1/2) m/n - 1/2, i.e.
    the same point of the [-1, 1] cube the decoder is queried at. Spline prefilter
    with half-sample symmetric ('reflect') boundaries. Optional Gaussian
    anti-alias pre-blur, sigma = (m/n - 1)/2 HR voxels per axis (off by default,
    as the reference's degradation model has none).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from arssr_jax.coords import centre_positions

CENTRED_BOUNDARY_MODE = "reflect"


def degrade_reference(hr: np.ndarray, lr_size: int) -> np.ndarray:
    """Corner-aligned cubic zoom of ``hr`` to ``lr_size`` voxels per axis (reference)."""
    factors = [lr_size / m for m in hr.shape]
    lr = ndimage.zoom(hr, factors, order=3)
    assert lr.shape == (lr_size,) * hr.ndim, lr.shape
    return lr


def degrade_centred(hr: np.ndarray, lr_size: int, antialias: bool = False) -> np.ndarray:
    """Voxel-centre consistent cubic resampling of ``hr`` to ``lr_size`` voxels per axis."""
    hr = np.asarray(hr)
    if antialias:
        sigma = [max(0.0, (m / lr_size - 1.0) / 2.0) for m in hr.shape]
        hr = ndimage.gaussian_filter(hr.astype(np.float64), sigma, mode=CENTRED_BOUNDARY_MODE)
    axes = [centre_positions(lr_size, m) for m in hr.shape]
    points = np.meshgrid(*axes, indexing="ij")
    lr = ndimage.map_coordinates(hr, points, order=3, mode=CENTRED_BOUNDARY_MODE,
                                 prefilter=True, output=np.float64)
    return lr.astype(np.float32)


def degrade(hr: np.ndarray, lr_size: int, mode: str = "centred",
            antialias: bool = False) -> np.ndarray:
    """Down-sample an HR patch to ``lr_size``^3 float32 in the given mode."""
    if mode == "reference":
        return degrade_reference(np.asarray(hr, np.float32), lr_size).astype(np.float32)
    if mode == "centred":
        return degrade_centred(hr, lr_size, antialias=antialias)
    raise ValueError(f"unknown degrade mode {mode!r}")
