"""Simulated low-resolution inputs for the evaluation: HR volume -> LR volume at a scale.

LR size: n = round(m / s) voxels along an HR axis of m voxels (at least 2). Every
model then decodes *onto the HR grid of the ground truth* (target shape m, not
int(n * s)), so HR voxel i sits at continuous LR index (i + 0.5) * n / m - 0.5: the
realised scale along an axis is m / n, which can differ slightly from s (reported).

Degradation (``arssr_jax.data.degrade``):

* ``centred`` (default): LR voxel j takes the cubic-spline value of the HR volume at
  HR index (j + 0.5) * m / n - 0.5, the same point of the [-1, 1] cube the decoder is
  queried at (voxel-centre consistent, half-sample symmetric boundaries).
* ``reference``: ``scipy.ndimage.zoom(hr, n / m, order=3)``, the corner-aligned zoom the
  reference trains with (misaligned with the decoder's grid by up to half an LR voxel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from arssr_jax.coords import centre_positions
from arssr_jax.data.degrade import CENTRED_BOUNDARY_MODE, degrade
from arssr_jax.errors import ArSSRError

DEGRADATIONS = ("centred", "reference")


def lr_shape_for(hr_shape, scale) -> tuple:
    """round(m / s) LR voxels per axis (halves round up), at least 2."""
    scales = np.broadcast_to(np.asarray(scale, np.float64), (len(hr_shape),))
    if not np.all(np.isfinite(scales)) or np.any(scales < 1):
        raise ArSSRError(f"scale must be a finite number >= 1, got {scale}")
    return tuple(max(2, int(np.floor(m / s + 0.5))) for m, s in zip(hr_shape, scales))


def simulate_lr(hr, scale, mode: str = "centred", antialias: bool = False) -> np.ndarray:
    """LR float32 volume of shape ``lr_shape_for(hr.shape, scale)`` simulated from ``hr``."""
    hr = np.asarray(hr, np.float32)
    if hr.ndim != 3:
        raise ArSSRError(f"HR volume must be 3D, got shape {hr.shape}")
    if mode not in DEGRADATIONS:
        raise ArSSRError(f"unknown degradation {mode!r}; choose one of {', '.join(DEGRADATIONS)}")
    lr_shape = lr_shape_for(hr.shape, scale)
    if len(set(lr_shape)) == 1 and len(set(hr.shape)) == 1:
        return degrade(hr, lr_shape[0], mode=mode, antialias=antialias)  # the training pipeline's own code
    # Non-cubic volumes: the same two resamplings, with one LR size per axis.
    if mode == "reference":
        lr = ndimage.zoom(hr, [n / m for n, m in zip(lr_shape, hr.shape)], order=3)
        if lr.shape != lr_shape:  # guard against zoom's rounding of the output size
            raise AssertionError(f"zoom gave {lr.shape}, expected {lr_shape}")
        return lr.astype(np.float32)
    data = hr.astype(np.float64)
    if antialias:
        sigma = [max(0.0, (m / n - 1.0) / 2.0) for m, n in zip(hr.shape, lr_shape)]
        data = ndimage.gaussian_filter(data, sigma, mode=CENTRED_BOUNDARY_MODE)
    points = np.meshgrid(*[centre_positions(n, m) for m, n in zip(hr.shape, lr_shape)], indexing="ij")
    lr = ndimage.map_coordinates(data, points, order=3, mode=CENTRED_BOUNDARY_MODE, prefilter=True, output=np.float64)
    return lr.astype(np.float32)


@dataclass(frozen=True, eq=False)
class SimulatedCase:
    hr: np.ndarray  # ground truth, normalised to [0, 1]
    lr: np.ndarray
    scale: float  # the requested scale
    realised: tuple  # m / n per axis

    @property
    def hr_shape(self) -> tuple:
        return tuple(self.hr.shape)


def simulate(hr, scale: float, mode: str = "centred") -> SimulatedCase:
    lr = simulate_lr(hr, scale, mode)
    realised = tuple(float(m) / n for m, n in zip(np.shape(hr), lr.shape))
    return SimulatedCase(np.asarray(hr, np.float32), lr, float(scale), realised)
