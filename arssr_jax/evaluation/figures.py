"""Figures for one volume at one scale (matplotlib, Agg backend, PNG):

* ``slices_x<s>.png``: three orthogonal slices through the centre of the foreground, one
  row per model (the ground truth first), each panel with a zoomed inset of the same
  region (marked in the panel);
* ``profile_x<s>.png``: intensity along a line (axis 0, through the same centre) for
  every model, the ground truth and the LR samples at their positions on the HR grid;
* ``errors_x<s>.png``: |SR - ground truth| on the same slices, one colour scale for
  all models (simulated mode only).

Slices are drawn with the first remaining array axis horizontal and the second
vertical (origin at the bottom): for a RAS scan sagittal, coronal and axial views.
Intensities share one grey scale (0.5th to 99.5th percentile of the reference image).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from arssr_jax.evaluation.protocol import GROUND_TRUTH, FigureCase
from arssr_jax.tempfiles import publish_mode

VIEWS = ("axis 0 (sagittal)", "axis 1 (coronal)", "axis 2 (axial)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        publish_mode(tmp)  # mkstemp made it private; the figure gets a plain file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _centre(volume) -> tuple[int, int, int]:
    """Centre of mass of the foreground (above the mean), as integer voxel indices."""
    v = np.asarray(volume, np.float64)
    fg = v > v.mean()
    if not fg.any():
        return tuple(n // 2 for n in v.shape)
    idx = np.argwhere(fg).mean(axis=0)
    return tuple(int(round(i)) for i in idx)


def _slice(volume, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis).T


def _inset_box(shape2d, centre2d) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1) of a square a quarter of the smaller side, around the centre."""
    rows, cols = shape2d  # displayed: rows = vertical (y), cols = horizontal (x)
    side = max(4, min(rows, cols) // 4)
    x0 = int(np.clip(centre2d[0] - side // 2, 0, max(0, cols - side)))
    y0 = int(np.clip(centre2d[1] - side // 2, 0, max(0, rows - side)))
    return x0, x0 + side, y0, y0 + side


def _panels(volumes: dict, reference, title: str, cmap: str, vmin: float, vmax: float, inset: bool,
            colorbar_label: str | None = None):
    plt = _pyplot()
    centre = _centre(reference)
    names = list(volumes)
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 2.9 * len(names)), squeeze=False)
    image = None
    for r, name in enumerate(names):
        for a in range(3):
            ax = axes[r][a]
            panel = _slice(volumes[name], a, centre[a])
            image = ax.imshow(panel, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(VIEWS[a], fontsize=9)
            if a == 0:
                ax.set_ylabel(name, fontsize=9)
            if inset:
                rest = [c for i, c in enumerate(centre) if i != a]
                x0, x1, y0, y1 = _inset_box(panel.shape, rest)
                zoom = ax.inset_axes([0.6, 0.6, 0.4, 0.4])
                zoom.imshow(panel, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
                zoom.set_xlim(x0 - 0.5, x1 - 0.5)
                zoom.set_ylim(y0 - 0.5, y1 - 0.5)
                zoom.set_xticks([])
                zoom.set_yticks([])
                for spine in zoom.spines.values():
                    spine.set_edgecolor("yellow")
                ax.indicate_inset_zoom(zoom, edgecolor="yellow")
    fig.suptitle(title, fontsize=10)
    if colorbar_label is not None and image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label=colorbar_label)
    return fig


def _grey_range(reference) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(reference, np.float64), [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def slices_figure(case: FigureCase, path) -> Path:
    volumes = {}
    if case.ground_truth is not None:
        volumes[GROUND_TRUTH] = case.ground_truth
    volumes.update(case.outputs)
    reference = case.ground_truth if case.ground_truth is not None else next(iter(case.outputs.values()))
    vmin, vmax = _grey_range(reference)
    title = f"{os.path.basename(case.volume)}, ×{case.scale:g}: orthogonal slices (inset: zoomed region)"
    fig = _panels(volumes, reference, title, "gray", vmin, vmax, inset=True)
    try:
        return _save(fig, Path(path))
    finally:
        _pyplot().close(fig)


def error_figure(case: FigureCase, path) -> Path:
    if case.ground_truth is None:
        raise ValueError("error maps need a ground truth")
    errors = {k: np.abs(v - case.ground_truth) for k, v in case.outputs.items()}
    vmax = float(np.percentile(np.concatenate([e.ravel() for e in errors.values()]), 99.5)) or 1e-6
    title = f"{os.path.basename(case.volume)}, ×{case.scale:g}: |SR - ground truth|"
    fig = _panels(errors, case.ground_truth, title, "magma", 0.0, vmax, inset=False, colorbar_label="|error|")
    try:
        return _save(fig, Path(path))
    finally:
        _pyplot().close(fig)


def profile_figure(case: FigureCase, path, axis: int = 0) -> Path:
    plt = _pyplot()
    reference = case.ground_truth if case.ground_truth is not None else next(iter(case.outputs.values()))
    centre = list(_centre(reference))
    index = [slice(None) if a == axis else centre[a] for a in range(3)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if case.ground_truth is not None:
        ax.plot(case.ground_truth[tuple(index)], color="black", linewidth=2.2, label=GROUND_TRUTH)
    for name, volume in case.outputs.items():
        ax.plot(volume[tuple(index)], linewidth=1.2, label=name)
    # The LR samples on the line, at their positions on the HR grid.
    m, n = reference.shape[axis], case.lr.shape[axis]
    lr_index = [slice(None) if a == axis else min(case.lr.shape[a] - 1, int((centre[a] + 0.5) * case.lr.shape[a]
                                                                             / reference.shape[a]))
                for a in range(3)]
    positions = (np.arange(n) + 0.5) * (m / n) - 0.5
    ax.plot(positions, case.lr[tuple(lr_index)], "o", color="grey", markersize=3, label="LR samples (nearest line)")
    where = ", ".join(f"{'ijk'[a]}={centre[a]}" for a in range(3) if a != axis)
    ax.set_xlabel(f"HR voxel index along axis {axis} ({where})")
    ax.set_ylabel("intensity")
    ax.set_title(f"{os.path.basename(case.volume)}, ×{case.scale:g}: intensity profile", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def write_figures(case: FigureCase, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    tag = f"x{case.scale:g}"
    paths = [slices_figure(case, out_dir / f"slices_{tag}.png"), profile_figure(case, out_dir / f"profile_{tag}.png")]
    if case.ground_truth is not None:
        paths.append(error_figure(case, out_dir / f"errors_{tag}.png"))
    return paths
