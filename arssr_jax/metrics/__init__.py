"""Image-quality metrics for 3D MR super-resolution (numpy + scipy only).

Reference-based metrics take ``(prediction, ground_truth)`` in that order.
Volumes are in nibabel (i, j, k) order.
"""

from arssr_jax.metrics.no_reference import lpc_si, psi
from arssr_jax.metrics.reference import psnr, ssim, ssim_factors, ssim_scores
from arssr_jax.metrics.segmentation import TissueModel, dice, fit_tissue_model, otsu_threshold, segment
from arssr_jax.metrics.slices import slicewise, slicewise_per_axis

__all__ = [
    "psnr",
    "ssim",
    "ssim_factors",
    "ssim_scores",
    "psi",
    "lpc_si",
    "slicewise",
    "slicewise_per_axis",
    "dice",
    "fit_tissue_model",
    "segment",
    "otsu_threshold",
    "TissueModel",
]
