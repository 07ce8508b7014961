#!/usr/bin/env python
"""Choose the data-consistency step a model is exported with (``arssr-jax export --consistency``) on its training volumes.

    python eval/consistency_sweep.py data/train/colin27_2mm.nii.gz data/train/colin27_brain_1mm.nii.gz

For each volume (min-max normalised; at most --max-slices slices along its last axis, the
middle ones, to keep it quick) and scale, the LR is simulated as the evaluation does
(centred cubic degradation, clipped at 0), decoded once without consistency, and then
back-projected with each step (arssr_jax.consistency). Prints PSNR per step, the step
with the highest mean PSNR over every volume and scale, and the best step at each scale
(a schedule ``arssr-jax export --consistency`` takes). ``--antialias`` simulates an LR that averages
over its voxels (as an acquisition does, and evaluate.py --antialias) instead.
Run it on training volumes only: a step chosen on the held-out sources would make their
scores optimistic.
"""

from __future__ import annotations

import argparse

import numpy as np

from arssr_jax import metrics
from arssr_jax.consistency import back_project
from arssr_jax.coords import grid_for_shape
from arssr_jax.evaluation.cli import load_min_max
from arssr_jax.evaluation.simulate import simulate_lr
from arssr_jax.inference import upsample
from arssr_jax.weights import load_model


def sweep(hr, model, steps, scales, antialias=False) -> np.ndarray:
    """PSNR (dB) of the back-projected output, one row per scale, one column per step."""
    rows = []
    for scale in scales:
        lr = np.maximum(simulate_lr(hr, scale, antialias=antialias), 0.0)
        grid = grid_for_shape(lr.shape, hr.shape)
        sr = upsample(lr, model, grid=grid, consistency=0.0)
        rows.append([metrics.psnr(back_project(sr, lr, grid, step), hr) for step in steps])
    return np.asarray(rows)


def middle_slab(volume, slices: int):
    start = max(0, (volume.shape[2] - slices) // 2)
    return volume[:, :, start:start + slices]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("volumes", nargs="+", help="training volumes (NIfTI)")
    p.add_argument("--model", default="default", help="model directory, workdir or shipped name (default: default)")
    p.add_argument("--steps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--scales", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0])
    p.add_argument("--max-slices", type=int, default=50, help="slices kept along the last axis (default 50)")
    p.add_argument("--antialias", action="store_true",
                   help="an LR that averages over its voxels (as evaluate.py --antialias) instead of point sampling")
    args = p.parse_args(argv)
    module, params, _ = load_model(args.model)
    header = "| volume | scale | " + " | ".join(f"step {s:g}" for s in args.steps) + " |"
    print(header + "\n" + "|---" * (2 + len(args.steps)) + "|")
    tables = []
    for path in args.volumes:
        hr = middle_slab(load_min_max(path), args.max_slices)
        table = sweep(hr, (module, params), args.steps, args.scales, args.antialias)
        tables.append(table)
        for scale, row in zip(args.scales, table):
            print(f"| {path} | x{scale:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)
    per_scale = np.mean(tables, axis=0)  # one row per scale, averaged over the volumes
    mean = per_scale.mean(axis=0)
    print("| mean | | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    print(f"best step: {args.steps[int(np.argmax(mean))]:g}")
    # The same rule scale by scale: whether one step suits every scale, and if not the
    # schedule to save with the model (linear in between, held beyond the ends).
    best = [(scale, args.steps[int(np.argmax(row))]) for scale, row in zip(args.scales, per_scale)]
    print("best step per scale: " + ", ".join(f"x{scale:g} {step:g}" for scale, step in best))
    print("export with: --consistency " + " ".join(f"{scale:g}:{step:g}" for scale, step in best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
