"""Input checks shared by the metrics: every user error becomes a one-line ArSSRError."""

from __future__ import annotations

import numpy as np

from arssr_jax.errors import ArSSRError


def as_image(x, name: str, ndims: tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``x`` as a finite float64 array, or raise ArSSRError naming the problem."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise ArSSRError(f"{name} cannot be read as an array ({exc}); pass a numpy array.") from None
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ArSSRError(
            f"{name} has dtype {arr.dtype}, which is not a real numeric type; "
            "pass an integer or floating-point array (e.g. nibabel's img.get_fdata())."
        )
    if ndims is not None and arr.ndim not in ndims:
        want = " or ".join(f"{d}D" for d in ndims)
        raise ArSSRError(
            f"{name} is {arr.ndim}D with shape {arr.shape}, but a {want} array is needed; "
            "squeeze extra axes or select a single volume/slice."
        )
    if arr.size == 0:
        raise ArSSRError(f"{name} is empty (shape {arr.shape}); pass a non-empty image.")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ArSSRError(
            f"{name} contains NaN or infinite values; replace them (e.g. np.nan_to_num) before scoring."
        )
    return arr


def same_shape(a: np.ndarray, b: np.ndarray, name_a: str = "prediction", name_b: str = "ground_truth"):
    if a.shape != b.shape:
        raise ArSSRError(
            f"{name_a} shape {a.shape} differs from {name_b} shape {b.shape}; "
            "resample or crop them onto the same grid first."
        )


def gt_range(gt: np.ndarray) -> float:
    """max(gt) - min(gt), refusing a constant ground truth."""
    rng = float(gt.max() - gt.min())
    if rng <= 0:
        raise ArSSRError(
            "ground_truth is constant, so its data range (max - min) is 0; "
            "pass a non-constant ground truth or an explicit data_range > 0."
        )
    return rng


def check_data_range(data_range, name: str = "data_range") -> float:
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        raise ArSSRError(f"{name}={data_range!r} is not a number; pass a positive float.") from None
    if not np.isfinite(value) or value <= 0:
        raise ArSSRError(f"{name}={data_range!r} must be a finite number > 0; pass e.g. max(gt) - min(gt).")
    return value
