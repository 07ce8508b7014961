"""Slice profiles: what a thick slice (or a large voxel) measures of a finely sampled signal.

Pure numpy. Along one axis, an HR signal is taken as piecewise constant over its voxels
(voxel i covers [i, i + 1) in HR face units). LR voxel j of a stack of ``count`` voxels
``ratio`` HR voxels apart has its centre at ``offset + (j + 1/2) * ratio`` (face units), so
that with ``offset`` 0 and ``count * ratio`` HR voxels the LR and HR grids span the same
extent: the voxel-centre ([-1, 1] cube) convention of :mod:`arssr_jax.coords`, which the
decoder is queried in. LR voxel j measures the HR signal weighted by the profile centred
there, integrated exactly over each HR voxel:

``box``       a box of ``width`` HR voxels (the slice thickness). ``width == ratio``: the
              contiguous stack of a thick-slice acquisition; for an integer ratio the mean
              of ``ratio`` consecutive HR voxels. ``width < ratio``: a gap between slices;
              ``width > ratio``: overlapping slices. Fractional HR voxels at the box's ends
              count by their covered fraction (any real ratio).
``gaussian``  a Gaussian of full width at half maximum ``width`` HR voxels.

Each row of :func:`profile_matrix` sums to 1 (the profile's weight beyond the given HR
extent is dropped and the rest rescaled; :func:`profile_margin` gives the HR voxels each
side a stack needs for none to be lost).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

PROFILES = ("box", "gaussian")
ANISOTROPY = 1.5  # a spacing this many times each other axis's makes an axis thick
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
GAUSSIAN_REACH = 3.0  # sigmas of a Gaussian profile taken into account


def _cdf(profile: str, width: float, x: np.ndarray) -> np.ndarray:
    """The profile's cumulative weight (centred at 0, total 1) up to ``x``."""
    if profile == "box":
        return np.clip(x / width + 0.5, 0.0, 1.0)
    sigma = width / FWHM_PER_SIGMA
    return 0.5 * (1.0 + erf(x / (sigma * math.sqrt(2.0))))


def _check(profile: str, ratio: float, width: float) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown slice profile {profile!r}; choose one of {PROFILES}")
    if not (math.isfinite(ratio) and ratio > 0 and math.isfinite(width) and width > 0):
        raise ValueError(f"ratio and width must be positive and finite, got {ratio!r} and {width!r}")


def profile_margin(profile: str, ratio: float, width: float) -> int:
    """HR voxels each side of a stack's ``count * ratio`` extent that its profiles reach into."""
    _check(profile, ratio, width)
    half = width / 2.0 if profile == "box" else GAUSSIAN_REACH * width / FWHM_PER_SIGMA
    return max(0, int(math.ceil(half - ratio / 2.0 - 1e-9)))


def profile_matrix(count: int, hr_length: int, ratio: float, profile: str = "box", width=None,
                   offset: float = 0.0) -> np.ndarray:
    """(count, hr_length) float64 matrix W: ``W @ hr`` is what ``count`` slices, ``ratio`` HR
    voxels apart with centres at ``offset + (j + 1/2) * ratio``, measure of the HR samples
    ``hr`` along that axis. ``width`` (HR voxels): the box's thickness or the Gaussian's FWHM
    (None: ``ratio``, a contiguous stack)."""
    width = float(ratio if width is None else width)
    _check(profile, float(ratio), width)
    centres = offset + (np.arange(count, dtype=np.float64) + 0.5) * ratio
    edges = np.arange(hr_length + 1, dtype=np.float64)
    cdf = _cdf(profile, width, edges[None, :] - centres[:, None])
    weights = np.diff(cdf, axis=1)
    totals = weights.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError(f"a slice of this profile lies outside the {hr_length} HR voxels given")
    return weights / totals


def apply_profile(hr: np.ndarray, axis: int, count: int, ratio: float, profile: str = "box", width=None,
                  offset: float = 0.0) -> np.ndarray:
    """``hr`` measured along ``axis`` by ``count`` slices (:func:`profile_matrix`); float32."""
    hr = np.asarray(hr)
    matrix = profile_matrix(count, hr.shape[axis], ratio, profile, width, offset)
    out = np.tensordot(matrix, np.asarray(hr, np.float64), axes=([1], [axis]))  # new axis first
    return np.moveaxis(out, 0, axis).astype(np.float32)


def thick_slices(hr: np.ndarray, axis: int, factor: int, profile: str = "box", width=None) -> np.ndarray:
    """A thick-slice version of ``hr``: ``hr.shape[axis] // factor`` slices ``factor`` HR voxels
    apart along ``axis`` (an incomplete last block is dropped: crop ``hr`` to a multiple first
    to keep HR and LR on the same extent), each measuring ``factor`` HR voxels with the profile
    (box: their mean; ``width`` the thickness or FWHM in HR voxels, default ``factor``).
    Slices near the ends whose profile reaches past ``hr`` are renormalised over what is there."""
    count = np.shape(hr)[axis] // int(factor)
    if count < 1:
        raise ValueError(f"axis {axis} has {np.shape(hr)[axis]} voxels, fewer than the factor {factor}")
    return apply_profile(hr, axis, count, float(factor), profile, width)


def thick_axis(spacing, anisotropy: float = ANISOTROPY):
    """The axis whose spacing is at least ``anisotropy`` times each other's (a thick-slice
    scan's slice axis), or None."""
    thick = [k for k in range(3) if all(spacing[k] >= anisotropy * spacing[j] for j in range(3) if j != k)]
    return thick[0] if thick else None
