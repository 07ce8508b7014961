"""Tissue-class Dice from a simple intensity segmentation fitted on the ground truth.

This is a simplified stand-in for the ArSSR paper's ANTs (Atropos) 6-region
segmentation: a foreground mask from an Otsu threshold, then three tissue classes
from a 1D k-means on the ground truth's foreground intensities. The fitted
thresholds (a :class:`TissueModel`) classify BOTH images, so a prediction is
scored by how well its intensities fall into the ground truth's classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics._validation import as_image, same_shape

__all__ = ["TissueModel", "otsu_threshold", "fit_tissue_model", "segment", "dice"]


def otsu_threshold(image, nbins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance over an ``nbins`` histogram).

    Foreground is ``image > threshold``.
    """
    v = as_image(image, "image").ravel()
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        raise ArSSRError("image is constant, so it has no foreground/background split; pass a non-constant image.")
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = np.cumsum(hist[::-1])[::-1]
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.cumsum((hist * centres)[::-1]) / np.maximum(w1[::-1], 1))[::-1]
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


@dataclass(frozen=True)
class TissueModel:
    """Intensity thresholds fitted on a ground truth.

    Label 0 = background (``<= foreground_threshold``); labels 1..3 = the
    ``class_names`` in order of increasing intensity, split at ``thresholds``.
    """

    foreground_threshold: float
    thresholds: tuple[float, float]
    centres: tuple[float, float, float]
    class_names: tuple[str, str, str] = ("csf", "gm", "wm")


def _kmeans_1d(values: np.ndarray, k: int = 3, n_iter: int = 100):
    """Deterministic 1D Lloyd k-means; returns sorted centres."""
    v = np.sort(values)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(n_iter):
        cuts = 0.5 * (centres[:-1] + centres[1:])
        bounds = np.concatenate([[0], np.searchsorted(v, cuts, side="right"), [v.size]])
        new = centres.copy()
        for i in range(k):
            a, b = bounds[i], bounds[i + 1]
            if b > a:
                new[i] = (csum[b] - csum[a]) / (b - a)
        new = np.sort(new)
        if np.allclose(new, centres, rtol=0, atol=1e-12 * max(1.0, abs(v[-1]))):
            centres = new
            break
        centres = new
    return centres


def fit_tissue_model(ground_truth, class_names=("csf", "gm", "wm"), foreground_threshold=None) -> TissueModel:
    """Fit the background/3-class intensity model on ``ground_truth``.

    Foreground: ``gt > foreground_threshold`` (default: Otsu's threshold of the
    ground truth). Classes: 1D k-means (k=3, initialised at the 1/6, 1/2, 5/6
    quantiles) on the foreground intensities; class boundaries are the midpoints
    between sorted centres. ``class_names`` are given from darkest to brightest
    (the default CSF < GM < WM is T1-weighted contrast; pass ("wm", "gm", "csf")
    for T2-weighted images).
    """
    gt = as_image(ground_truth, "ground_truth")
    if len(class_names) != 3 or len(set(class_names)) != 3:
        raise ArSSRError(f"class_names={class_names!r} must be 3 distinct names, darkest first, e.g. ('csf', 'gm', 'wm').")
    thr = otsu_threshold(gt) if foreground_threshold is None else float(foreground_threshold)
    fg = gt[gt > thr]
    if fg.size < 3 or fg.min() == fg.max():
        raise ArSSRError(
            "ground_truth has too few distinct foreground intensities above the threshold to fit 3 tissue classes; "
            "pass a brain volume or a lower foreground_threshold."
        )
    centres = _kmeans_1d(fg)
    cuts = 0.5 * (centres[:-1] + centres[1:])
    return TissueModel(
        foreground_threshold=thr,
        thresholds=(float(cuts[0]), float(cuts[1])),
        centres=tuple(float(c) for c in centres),
        class_names=tuple(class_names),
    )


def segment(volume, model: TissueModel) -> np.ndarray:
    """Label map (int8): 0 background, 1..3 the model's classes, darkest first."""
    v = as_image(volume, "volume")
    labels = np.zeros(v.shape, dtype=np.int8)
    fg = v > model.foreground_threshold
    labels[fg] = 1 + np.searchsorted(np.asarray(model.thresholds), v[fg], side="right").astype(np.int8)
    return labels


def dice(prediction, ground_truth, *, model: TissueModel | None = None) -> dict[str, float]:
    """Per-class Dice of ``prediction`` vs ``ground_truth`` tissue segmentations.

    The segmentation is fitted on the ground truth only (:func:`fit_tissue_model`,
    unless a ``model`` is passed) and the same thresholds label both images.
    Returns ``{"csf": d, "gm": d, "wm": d, "mean": mean of the three}`` (keys follow
    the model's ``class_names``). A class absent from both images scores 1.0.
    Simplified intensity segmentation standing in for the paper's ANTs 6-region one.
    """
    pred = as_image(prediction, "prediction")
    gt = as_image(ground_truth, "ground_truth")
    same_shape(pred, gt)
    if model is None:
        model = fit_tissue_model(gt)
    lp = segment(pred, model)
    lg = segment(gt, model)
    out = {}
    for label, name in enumerate(model.class_names, start=1):
        a, b = lp == label, lg == label
        total = int(a.sum()) + int(b.sum())
        out[name] = 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)
    out["mean"] = float(np.mean([out[n] for n in model.class_names]))
    return out
