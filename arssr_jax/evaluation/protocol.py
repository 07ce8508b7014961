"""The evaluation protocol: volumes x scales x models -> per-volume metric records.

Simulated mode (ground truth known): each HR volume is min-max normalised to [0, 1],
degraded to LR at every scale (:mod:`arssr_jax.evaluation.simulate`), super-resolved
by every runner onto the ground truth's grid and scored against it:

* ``psnr``, ``ssim``: 3D, data_range = max(gt) - min(gt) (= 1 after normalising);
* ``psi``, ``lpc_si``: no-reference sharpness, averaged over 2D slices in the three
  orientations (:func:`arssr_jax.metrics.slicewise`); slices are those with >= 10 %
  foreground, foreground = the ground truth above its Otsu threshold, so every model
  is judged on the same slices. PSI needs slices of at least 96 x 96 pixels (the
  original pools only inner 32 x 32 blocks, so smaller slices score 0): an
  orientation with smaller slices is left out (NaN when none is left);
* ``dice``: tissue classes (background / CSF / GM / WM by an intensity model fitted on
  the ground truth, :func:`arssr_jax.metrics.dice`); the mean of the three classes and
  each class;
* ``psnr_head``, ``ssim_head``: the same inside the head (:func:`head_mask`: the
  ground truth above its Otsu threshold, holes filled), data range still the whole
  ground truth's;
* ``ssim_factors``: SSIM's luminance, contrast and structure factors over the whole
  volume (:func:`arssr_jax.metrics.ssim_factors`; columns ``ssim_luminance``,
  ``ssim_contrast``, ``ssim_structure``): whether a lower SSIM comes from a smoother
  output (contrast) or a wrong one (structure);
* ``bands``: the mean absolute error in each band of ground-truth intensity
  (:data:`BAND_EDGES`, as fractions of the ground truth's range above its minimum):
  columns ``mae_band_0`` .. ``mae_band_9``, so no band's error can hide in an average.

The ground truth itself is scored with the no-reference metrics once per volume.

Real-scan mode (no ground truth): each LR scan is normalised to [0, 1], upsampled by
every scale onto int(n * s) voxels per axis, and only ``psi`` and ``lpc_si`` are
reported; the slices scored are those with >= 10 % foreground in the tricubic result
(Otsu), the same for every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from arssr_jax import metrics as M
from arssr_jax.errors import ArSSRError
from arssr_jax.progress import progress_counter
from arssr_jax.evaluation.runners import Runner
from arssr_jax.evaluation.simulate import simulate_lr

METRICS = ("psnr", "ssim", "psnr_head", "ssim_head", "ssim_factors", "psi", "lpc_si", "dice", "bands")
SSIM_FACTOR_COLUMNS = ("ssim_luminance", "ssim_contrast", "ssim_structure")
NO_REFERENCE = ("psi", "lpc_si")
PAPER_SCALES = (2.0, 2.5, 3.0, 3.5, 4.0)
PSI_BLOCK = 32
PSI_MIN_SIDE = 3 * PSI_BLOCK  # PSI.m pools inner blocks only: a smaller slice always scores 0
GROUND_TRUTH = "ground truth"
BAND_EDGES = tuple(round(0.1 * k, 1) for k in range(11))  # the last band includes 1.0
MIN_BAND_VOXELS = 50  # a band with fewer ground-truth voxels is not scored (NaN)


@dataclass
class FigureCase:
    """Everything the figures show for one volume at one scale."""

    volume: str
    scale: float
    lr: np.ndarray
    outputs: dict  # label -> SR volume, in table order
    ground_truth: Optional[np.ndarray] = None


@dataclass
class Results:
    records: list  # dicts: volume, scale (None for the ground-truth row), model, kind, metrics
    models: list  # row labels in table order
    scales: list
    metrics: tuple
    mode: str  # "simulated" or "real"
    degradation: Optional[str] = None
    figure: Optional[FigureCase] = None
    notes: list = field(default_factory=list)


def check_scales(scales) -> list[float]:
    out = []
    for s in scales:
        try:
            s = float(s)
        except (TypeError, ValueError):
            raise ArSSRError(f"scale {s!r} is not a number; give scales like 2 2.5 3") from None
        if not math.isfinite(s) or s < 1:
            raise ArSSRError(f"scale {s} must be a finite number >= 1")
        if not any(math.isclose(s, t) for t in out):
            out.append(s)
    if not out:
        raise ArSSRError("no scales given; e.g. --scales 2 2.5 3 3.5 4")
    return sorted(out)


def check_metrics(names, real: bool = False) -> tuple:
    names = tuple(dict.fromkeys(n.strip().lower().replace("-", "_") for n in names if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ArSSRError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if real:
        names = tuple(n for n in names if n in NO_REFERENCE)
        if not names:
            raise ArSSRError("real-scan mode has no ground truth: choose psi and/or lpc_si as metrics")
    if not names:
        raise ArSSRError(f"no metrics chosen; choose from {', '.join(METRICS)}")
    return names


def _psi_axes(shape) -> tuple:
    return tuple(a for a in range(3) if min(n for i, n in enumerate(shape) if i != a) >= PSI_MIN_SIDE)


def no_reference_scores(volume, mask, metrics) -> dict:
    out = {}
    if "psi" in metrics:
        axes = _psi_axes(volume.shape)
        out["psi"] = M.slicewise(M.psi, volume, mask=mask, axes=axes) if axes else float("nan")
    if "lpc_si" in metrics:
        out["lpc_si"] = M.slicewise(M.lpc_si, volume, mask=mask)
    return out


def head_mask(gt) -> np.ndarray:
    """Voxels inside the head (or brain): above the Otsu threshold, enclosed holes filled."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(np.asarray(gt) > M.otsu_threshold(gt))


def band_index(gt) -> np.ndarray:
    """Each voxel's band of ground-truth intensity (0 .. len(BAND_EDGES) - 2)."""
    gt = np.asarray(gt, np.float64)
    relative = (gt - gt.min()) / (gt.max() - gt.min())
    return np.clip(np.digitize(relative, BAND_EDGES[1:-1]), 0, len(BAND_EDGES) - 2)


def band_errors(sr, gt, bands=None) -> dict:
    """``{"mae_band_k": mean |sr - gt| over band k}`` (NaN for a band of < MIN_BAND_VOXELS)."""
    bands = band_index(gt) if bands is None else bands
    error = np.abs(np.asarray(sr, np.float64) - np.asarray(gt, np.float64))
    count = np.bincount(bands.ravel(), minlength=len(BAND_EDGES) - 1)
    total = np.bincount(bands.ravel(), weights=error.ravel(), minlength=len(BAND_EDGES) - 1)
    return {f"mae_band_{k}": float(total[k] / count[k]) if count[k] >= MIN_BAND_VOXELS else float("nan")
            for k in range(len(BAND_EDGES) - 1)}


def reference_scores(sr, gt, mask, tissue, metrics, head=None, bands=None) -> dict:
    out = {}
    if "psnr" in metrics:
        out["psnr"] = M.psnr(sr, gt)
    if "psnr_head" in metrics or "ssim_head" in metrics:
        head = head_mask(gt) if head is None else head
    if "psnr_head" in metrics:
        out["psnr_head"] = M.psnr(sr, gt, mask=head)
    masks = {name: mask for name, mask in (("ssim", None), ("ssim_head", head)) if name in metrics}
    if masks or "ssim_factors" in metrics:  # one pass over the SSIM windows serves them all
        scores = M.ssim_scores(sr, gt, masks=masks, factors="ssim_factors" in metrics)
        out.update((name, scores[name]) for name in masks)
        if "ssim_factors" in metrics:
            out.update(zip(SSIM_FACTOR_COLUMNS, (scores[k] for k in ("luminance", "contrast", "structure"))))
    out.update(no_reference_scores(sr, mask, metrics))
    if "dice" in metrics:
        d = M.dice(sr, gt, model=tissue)
        out["dice"] = d.pop("mean")
        out.update({f"dice_{k}": v for k, v in d.items()})
    if "bands" in metrics:
        out.update(band_errors(sr, gt, bands))
    return out


def _model_order(runners) -> list[str]:
    return list(dict.fromkeys(r.label for r in runners))


def _check_fixed_scales(runners, scales) -> None:
    for r in runners:
        if r.scale is not None and not any(math.isclose(r.scale, s, abs_tol=1e-6) for s in scales):
            listed = ", ".join(f"{s:g}" for s in scales)
            raise ArSSRError(f"baseline {r.label} ({r.info.get('directory', '')}) was trained for scale {r.scale:g}, "
                             f"which is not among the scales ({listed}); add it to --scales or leave it out")


def evaluate_simulated(volumes: Sequence[tuple[str, np.ndarray]], runners: list[Runner], scales,
                       *, degradation: str = "centred", metrics=METRICS, figure_volume: int = 0,
                       figure_scale: Optional[float] = None, quiet: bool = False,
                       clip_lr: bool = False, antialias: bool = False) -> Results:
    """``volumes``: (name, HR array normalised to [0, 1], or a function loading it) pairs.

    ``antialias``: Gaussian pre-blur before the degradation (an LR averaging over its voxel).
    ``clip_lr``: clip the simulated LR at 0, as a magnitude image is (the spline's
    undershoot next to a dark background is otherwise negative).
    """
    scales, metrics, fig_scale = _checked_plan(runners, scales, metrics, figure_scale)
    records, figure = [], None
    bar = progress_counter(len(volumes) * len(scales), "evaluate", unit="case", enabled=not quiet)
    try:
        for v, (name, hr) in enumerate(volumes):
            hr = np.asarray(hr() if callable(hr) else hr, np.float32)
            mask = hr > M.otsu_threshold(hr)
            head = head_mask(hr)
            bands = band_index(hr) if "bands" in metrics else None
            tissue = M.fit_tissue_model(hr) if "dice" in metrics else None
            nr = no_reference_scores(hr, mask, metrics)
            if nr:
                records.append(dict(volume=name, scale=None, model=GROUND_TRUTH, kind="ground truth", **nr))
            for s in scales:
                bar.set_postfix_str(f"{_short(name)} x{s:g}")
                lr = simulate_lr(hr, s, degradation, antialias=antialias)
                if clip_lr:
                    lr = np.maximum(lr, 0.0)
                keep = v == figure_volume and math.isclose(s, fig_scale)
                outputs = _run_case(records, runners, name, s, lambda r: r(lr, hr.shape),
                                    lambda sr: reference_scores(sr, hr, mask, tissue, metrics, head, bands), keep)
                if keep:
                    figure = FigureCase(name, s, lr, outputs, hr)
                bar.update(1)
    finally:
        bar.close()
    notes = ["HR blurred before sampling (anti-aliased LR)"] if antialias else []
    notes += ["LR clipped at 0 (a magnitude image)"] if clip_lr else []
    return Results(records, _model_order(runners), scales, metrics, "simulated", degradation, figure, notes)


def evaluate_real(scans: Sequence[tuple[str, np.ndarray]], runners: list[Runner], scales, *,
                  metrics=NO_REFERENCE, figure_volume: int = 0, figure_scale: Optional[float] = None,
                  quiet: bool = False) -> Results:
    """``scans``: (name, LR array normalised to [0, 1], or a function loading it) pairs."""
    from arssr_jax.coords import grid_for_scale
    from arssr_jax.interpolation import tricubic

    scales, metrics, fig_scale = _checked_plan(runners, scales, metrics, figure_scale, real=True)
    records, figure = [], None
    bar = progress_counter(len(scans) * len(scales), "evaluate (real scans)", unit="case", enabled=not quiet)
    try:
        for v, (name, lr) in enumerate(scans):
            lr = np.asarray(lr() if callable(lr) else lr, np.float32)
            for s in scales:
                bar.set_postfix_str(f"{_short(name)} x{s:g}")
                shape = grid_for_scale(lr.shape, s).shape
                reference = tricubic(lr, shape=shape)
                mask = reference > M.otsu_threshold(reference)
                run = lambda r: reference if r.kind == "interpolation" and r.label == "tricubic" else r(lr, shape)
                keep = v == figure_volume and math.isclose(s, fig_scale)
                outputs = _run_case(records, runners, name, s, run, lambda sr: no_reference_scores(sr, mask, metrics), keep)
                if keep:
                    figure = FigureCase(name, s, lr, outputs, None)
                bar.update(1)
    finally:
        bar.close()
    return Results(records, _model_order(runners), scales, metrics, "real", None, figure)


def _checked_plan(runners, scales, metrics, figure_scale, real=False) -> tuple:
    """(scales, metrics, the figure's scale) checked against each other and the runners."""
    scales = check_scales(scales)
    _check_fixed_scales(runners, scales)
    return scales, check_metrics(metrics, real=real), _figure_scale(scales, figure_scale)


def _run_case(records: list, runners, name, scale, run, score, keep: bool) -> dict:
    """Every runner that serves ``scale`` on one case: its scores appended to ``records``; with
    ``keep``, its output returned by label (for the figure; else none is held)."""
    outputs = {}
    for r in runners:
        if r.serves(scale):
            sr = run(r)
            records.append(dict(volume=name, scale=scale, model=r.label, kind=r.kind, **score(sr)))
            if keep:
                outputs[r.label] = sr
    return outputs


def _figure_scale(scales, requested) -> float:
    if requested is None:
        return max(scales)
    if not any(math.isclose(float(requested), s) for s in scales):
        raise ArSSRError(f"--figure-scale {requested:g} is not among the scales ({', '.join(f'{s:g}' for s in scales)})")
    return float(requested)


def _short(name: str) -> str:
    import os

    return os.path.basename(str(name))[:30]


__all__ = ["METRICS", "NO_REFERENCE", "PAPER_SCALES", "GROUND_TRUTH", "FigureCase", "Results", "check_scales",
           "check_metrics", "evaluate_simulated", "evaluate_real", "reference_scores", "no_reference_scores",
           "head_mask", "band_errors", "band_index", "BAND_EDGES"]
