"""Averaging a 2D metric over the slices of a 3D volume in all three orientations."""

from __future__ import annotations

import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics._validation import as_image, same_shape
from arssr_jax.metrics.segmentation import otsu_threshold

__all__ = ["slicewise", "slicewise_per_axis"]


def _foreground(source: np.ndarray, mask) -> np.ndarray:
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != source.shape:
            raise ArSSRError(f"mask shape {m.shape} differs from volume shape {source.shape}; pass a mask on the same grid.")
        return m.astype(bool)
    if source.max() == source.min():
        return np.zeros(source.shape, dtype=bool)
    return source > otsu_threshold(source)


def slicewise_per_axis(metric, volume, reference=None, *, axes=(0, 1, 2), min_foreground: float = 0.1,
                       mask=None, **metric_kwargs) -> dict[int, float]:
    """Like :func:`slicewise` but returns ``{axis: mean over that axis's kept slices}``
    (axes with no kept slice are left out)."""
    if not callable(metric):
        raise ArSSRError(f"metric={metric!r} is not callable; pass a 2D metric such as psi, lpc_si or ssim.")
    vol = as_image(volume, "volume", ndims=(3,))
    ref = None
    if reference is not None:
        ref = as_image(reference, "reference", ndims=(3,))
        same_shape(vol, ref, "volume", "reference")
    if not 0 <= min_foreground <= 1:
        raise ArSSRError(f"min_foreground={min_foreground!r} must be a fraction in [0, 1]; the default is 0.1.")
    axes = tuple(axes)
    if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ArSSRError(f"axes={axes!r} must be distinct values from (0, 1, 2).")
    fg = _foreground(vol if ref is None else ref, mask)

    per_axis = {}
    for axis in axes:
        fraction = fg.mean(axis=tuple(a for a in range(3) if a != axis))
        keep = np.flatnonzero((fraction >= min_foreground) & (fraction > 0))
        if keep.size == 0:
            continue
        scores = []
        for i in keep:
            args = (np.take(vol, i, axis=axis),)
            if ref is not None:
                args += (np.take(ref, i, axis=axis),)
            value = float(metric(*args, **metric_kwargs))
            if np.isnan(value):
                raise ArSSRError(
                    f"metric returned NaN on slice {i} of axis {axis}; check the metric or raise min_foreground."
                )
            scores.append(value)
        per_axis[axis] = float(np.mean(scores))
    if not per_axis:
        raise ArSSRError(
            f"no slice has a foreground fraction >= {min_foreground}; lower min_foreground or pass a mask."
        )
    return per_axis


def slicewise(metric, volume, reference=None, *, axes=(0, 1, 2), min_foreground: float = 0.1,
              mask=None, **metric_kwargs) -> float:
    """Average a 2D metric over the slices of a 3D volume in three orientations.

    ``metric(volume_slice, **metric_kwargs)`` for a no-reference metric (psi,
    lpc_si), or ``metric(volume_slice, reference_slice, **metric_kwargs)`` when
    ``reference`` (the ground truth) is given (psnr, ssim). Volumes are in
    nibabel (i, j, k) order; ``axes`` = (0, 1, 2) slices along i, j and k
    (sagittal, coronal, axial for a RAS-oriented scan).

    Empty slices: a slice is scored only if its foreground fraction is
    >= ``min_foreground`` (default 0.1) and > 0. Foreground is ``mask`` if given,
    else voxels above the Otsu threshold of the reference (or, without a
    reference, of the volume itself), so both images are judged on the same
    slices. Each orientation is averaged over its kept slices, and the result
    is the mean of the per-orientation averages (orientations with no kept
    slice are left out; if none is left an ArSSRError is raised, never NaN).
    """
    per_axis = slicewise_per_axis(metric, volume, reference, axes=axes, min_foreground=min_foreground,
                                  mask=mask, **metric_kwargs)
    return float(np.mean(list(per_axis.values())))
