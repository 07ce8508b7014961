"""Full-reference metrics: PSNR, SSIM and its three factors (2D or 3D), computed in float64.

Both take ``(prediction, ground_truth)`` in that order and, as in the ArSSR paper,
use the ground truth's range ``max(gt) - min(gt)`` as the data range.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import uniform_filter

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics._validation import as_image, check_data_range, gt_range, same_shape

__all__ = ["psnr", "ssim", "ssim_factors"]

SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004 and scikit-image: C1 = (K1 R)^2, C2 = (K2 R)^2


def _check_mask(mask, shape):
    if mask is None:
        return None
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(shape):
        raise ArSSRError(f"mask shape {mask.shape} differs from the image shape {tuple(shape)}; pass a mask of the "
                         "image's shape")
    if not mask.any():
        raise ArSSRError("the mask selects no voxel; pass a mask with at least one voxel set")
    return mask


def psnr(prediction, ground_truth, *, data_range=None, mask=None) -> float:
    """Peak signal-to-noise ratio in dB.

    ``PSNR = 10 * log10(R**2 / MSE)`` with ``R = max(gt) - min(gt)`` (of the whole image)
    unless ``data_range`` is given, and ``MSE`` the mean squared error over all voxels,
    or over the voxels of ``mask``. Identical images give ``inf``. Any dimensionality;
    shapes must match.
    """
    pred = as_image(prediction, "prediction")
    gt = as_image(ground_truth, "ground_truth")
    same_shape(pred, gt)
    mask = _check_mask(mask, gt.shape)
    rng = gt_range(gt) if data_range is None else check_data_range(data_range)
    error = (pred - gt) ** 2
    mse = float(np.mean(error if mask is None else error[mask]))
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(rng * rng / mse))


def _ssim_inputs(prediction, ground_truth, data_range, win_size, mask):
    """Checked float64 (prediction, ground truth, data range, mask)."""
    pred = as_image(prediction, "prediction", ndims=(2, 3))
    gt = as_image(ground_truth, "ground_truth", ndims=(2, 3))
    same_shape(pred, gt)
    mask = _check_mask(mask, gt.shape)
    if not isinstance(win_size, (int, np.integer)) or win_size < 3 or win_size % 2 == 0:
        raise ArSSRError(f"win_size={win_size!r} must be an odd integer >= 3; the default is 7.")
    if min(gt.shape) < win_size:
        raise ArSSRError(
            f"image shape {gt.shape} is smaller than the {win_size}-voxel SSIM window along some axis; "
            f"pass images at least {win_size} voxels in every dimension or a smaller odd win_size."
        )
    rng = gt_range(gt) if data_range is None else check_data_range(data_range)
    return pred, gt, rng, mask


def _window_statistics(pred, gt, win_size):
    """Local means, variances and covariance over a uniform ``win_size`` window (sample
    covariance, N/(N-1) with N = win_size**ndim, as skimage)."""
    n = win_size ** gt.ndim
    cov_norm = n / (n - 1.0)
    mu_x = uniform_filter(pred, size=win_size)
    mu_y = uniform_filter(gt, size=win_size)
    var_x = cov_norm * (uniform_filter(pred * pred, size=win_size) - mu_x * mu_x)
    var_y = cov_norm * (uniform_filter(gt * gt, size=win_size) - mu_y * mu_y)
    cov_xy = cov_norm * (uniform_filter(pred * gt, size=win_size) - mu_x * mu_y)
    return mu_x, mu_y, var_x, var_y, cov_xy


def _interior_mean(score_map, win_size, mask) -> float:
    """The mean over the voxels at least (win_size - 1) // 2 from every side (and in ``mask``)."""
    pad = (win_size - 1) // 2
    crop = tuple(slice(pad, s - pad) for s in score_map.shape)
    interior = score_map[crop]
    if mask is not None:
        inside = mask[crop]
        if not inside.any():
            raise ArSSRError(f"the mask selects no voxel at least {pad} voxels from the border; pass a larger mask")
        return float(interior[inside].mean(dtype=np.float64))
    return float(interior.mean(dtype=np.float64))


def ssim(prediction, ground_truth, data_range=None, *, win_size: int = 7,
         k1: float = SSIM_K1, k2: float = SSIM_K2, mask=None) -> float:
    """Mean structural similarity of two 2D or 3D images.

    Reproduces ``skimage.metrics.structural_similarity(pred, gt, data_range=R)``
    with skimage's defaults: a ``win_size``-voxel (7) uniform window
    (``scipy.ndimage.uniform_filter``, mode ``'reflect'``), K1=0.01, K2=0.03,
    sample covariance (N/(N-1) with N = win_size**ndim), and the mean of the SSIM
    map over the interior left after cropping ``(win_size-1)//2`` voxels from
    every side. ``R`` defaults to ``max(gt) - min(gt)``. Computed in float64.
    ``mask``: the mean over the voxels of the interior that the mask selects instead.
    """
    pred, gt, rng, mask = _ssim_inputs(prediction, ground_truth, data_range, win_size, mask)
    statistics = _window_statistics(pred, gt, win_size)
    return _interior_mean(_ssim_map(statistics, rng, k1, k2), win_size, mask)


def _ssim_map(statistics, rng, k1, k2):
    mu_x, mu_y, var_x, var_y, cov_xy = statistics
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return num / den


def _ssim_factor_maps(pred, gt, rng, win_size, k1, k2, statistics=None):
    """Luminance, contrast and structure maps; their product is the SSIM map (C3 = C2 / 2)."""
    statistics = _window_statistics(pred, gt, win_size) if statistics is None else statistics
    mu_x, mu_y, var_x, var_y, cov_xy = statistics
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    c3 = c2 / 2
    sigma_xy = np.sqrt(np.maximum(var_x, 0.0) * np.maximum(var_y, 0.0))
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    contrast = (2 * sigma_xy + c2) / (var_x + var_y + c2)
    structure = (cov_xy + c3) / (sigma_xy + c3)
    return luminance, contrast, structure


def ssim_factors(prediction, ground_truth, data_range=None, *, win_size: int = 7,
                 k1: float = SSIM_K1, k2: float = SSIM_K2, mask=None) -> dict[str, float]:
    """SSIM's three factors (Wang et al. 2004), each averaged like :func:`ssim`.

    ``luminance`` compares the local means, ``contrast`` the local standard deviations
    (below 1 when the prediction varies less, or more, than the truth), ``structure``
    the local correlation. Per voxel, their product is the SSIM map, so they tell why
    one method's SSIM is below another's: an output smoother than the truth loses
    contrast even where it correlates better. Same windows, constants and data range as
    :func:`ssim`.
    """
    pred, gt, rng, mask = _ssim_inputs(prediction, ground_truth, data_range, win_size, mask)
    maps = _ssim_factor_maps(pred, gt, rng, win_size, k1, k2)
    return {name: _interior_mean(m, win_size, mask)
            for name, m in zip(("luminance", "contrast", "structure"), maps)}


def ssim_scores(prediction, ground_truth, data_range=None, *, win_size: int = 7, k1: float = SSIM_K1,
                k2: float = SSIM_K2, masks: dict | None = None, factors: bool = False) -> dict[str, float]:
    """:func:`ssim` for each of several masks, and optionally :func:`ssim_factors`, from one
    computation of the window statistics (the costly part on a whole volume).

    ``masks``: {name: mask or None}; returns {name: SSIM over that mask} (default
    ``{"ssim": None}``, the whole interior), plus "luminance", "contrast" and "structure"
    over the whole interior with ``factors=True``. Each number equals what :func:`ssim` or
    :func:`ssim_factors` returns for the same arguments.
    """
    masks = {"ssim": None} if masks is None else masks
    pred, gt, rng, _ = _ssim_inputs(prediction, ground_truth, data_range, win_size, None)
    checked = {name: _check_mask(mask, gt.shape) for name, mask in masks.items()}
    statistics = _window_statistics(pred, gt, win_size)
    score_map = _ssim_map(statistics, rng, k1, k2)
    out = {name: _interior_mean(score_map, win_size, mask) for name, mask in checked.items()}
    if factors:
        maps = _ssim_factor_maps(pred, gt, rng, win_size, k1, k2, statistics)
        out.update({name: _interior_mean(m, win_size, None)
                    for name, m in zip(("luminance", "contrast", "structure"), maps)})
    return out
