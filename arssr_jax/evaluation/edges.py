"""Errors by depth below a masked volume's edge: where a low band's error comes from.

A skull-stripped or masked volume (a template) ends in a hard cut: outside, every voxel is
the volume's minimum; the outer layer inside keeps whatever the tissue had there, from a
dim partial-volume voxel to bright cortex. ``band_errors`` groups voxels by their
ground-truth intensity, so near a cut a dim band holds mostly the outer layer's dimmest
voxels. Every method smooths that layer towards the background; tricubic pulls a bright
rim voxel far down and a dim one hardly at all, so, selected by being dim, its errors look
small. These tables give the error by depth from the cut (the background layer touching
the mask, then each layer inside) and, by band, in the outer layer and below it, so a
band's ratio can be read against the whole layer's.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from arssr_jax.errors import ArSSRError
from arssr_jax.evaluation.protocol import BAND_EDGES, MIN_BAND_VOXELS

MIN_BACKGROUND = 0.01  # at least this fraction of voxels at the minimum: a masked volume
OUTSIDE = -1  # the label of the background layer that touches the mask


def depth_labels(gt, deepest: int = 4) -> np.ndarray:
    """Each voxel's layer: ``k`` >= 1 inside the mask at city-block distance ``k`` from the
    background (``deepest`` for that and deeper), ``OUTSIDE`` for background voxels next to
    the mask, 0 for the rest of the background. The mask is the ground truth above its minimum."""
    gt = np.asarray(gt)
    inside = gt > gt.min()
    background = 1.0 - inside.mean()
    if background < MIN_BACKGROUND or not inside.any():
        raise ArSSRError(f"only {background:.1%} of the volume is at its minimum: the edge tables need a masked "
                         "(skull-stripped) volume whose background is exactly its minimum")
    depth = ndimage.distance_transform_cdt(inside, metric="taxicab")
    labels = np.minimum(depth, deepest).astype(np.int64)
    labels[ndimage.distance_transform_cdt(~inside, metric="taxicab") == 1] = OUTSIDE
    return labels


def _summary(error) -> tuple:
    """(voxels, mean, mean absolute value) of some voxels' errors (NaN for none)."""
    if not error.size:
        return 0, float("nan"), float("nan")
    return int(error.size), float(error.mean()), float(np.abs(error).mean())


def region_errors(sr, gt, chosen) -> tuple:
    """(voxels, mean signed error, mean absolute error) of ``sr`` against ``gt`` where
    ``chosen`` is true (NaN errors for an empty region)."""
    return _summary((np.asarray(sr, np.float64) - np.asarray(gt, np.float64))[chosen])


def layer_name(label: int, deepest: int) -> str:
    if label == OUTSIDE:
        return "background touching the mask"
    return f"inside, layer {label}" + (" and deeper" if label == deepest else "")


def edge_tables(outputs: dict, gt, bands, deepest: int = 4, labels=None) -> str:
    """Markdown: every output's error by layer, then by band of ground-truth intensity in
    the outer layer and in the layers below it (bands of fewer than ``MIN_BAND_VOXELS``
    voxels are left out, as the band tables do). ``outputs``: label -> SR volume, the first
    one the reference the ratios are taken against (tricubic); ``labels``: ``depth_labels(gt,
    deepest)`` when already computed."""
    labels = depth_labels(gt, deepest) if labels is None else labels
    gt = np.asarray(gt, np.float64)
    error_maps = {n: np.asarray(sr, np.float64) - gt for n, sr in outputs.items()}  # once per output, not per row
    layers = [OUTSIDE] + list(range(1, deepest + 1))
    rows = [(layer_name(k, deepest), labels == k) for k in layers]
    for where, chosen in (("outer layer", labels == 1), ("below it", labels >= 2)):
        counts = np.bincount(bands[chosen], minlength=len(BAND_EDGES) - 1)
        rows += [(f"{where}, band {k} ({BAND_EDGES[k]:.1f}-{BAND_EDGES[k + 1]:.1f})", chosen & (bands == k))
                 for k in np.flatnonzero(counts >= MIN_BAND_VOXELS)]
    first = next(iter(outputs))
    others = list(outputs)[1:]
    lines = ["| where | voxels | " + " | ".join(f"{n} error | {n} MAE" for n in outputs) + " | "
             + " | ".join(f"{n} MAE / {first}'s" for n in others) + " |",
             "|---" * (2 + 2 * len(outputs) + len(others)) + "|"]
    for title, chosen in rows:
        errors = {n: _summary(error[chosen]) for n, error in error_maps.items()}
        base = errors[first][2]
        cells = [f"{errors[n][1]:+.4f} | {errors[n][2]:.4f}" for n in outputs]
        ratios = [f"{errors[n][2] / base:.2f}" if base > 0 else "n/a" for n in others]
        lines.append(f"| {title} | {errors[first][0]} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)
