#!/usr/bin/env python
"""Where a masked volume's low-band error comes from: errors by depth below the mask's edge.

    python eval/edge_errors.py data/heldout/mni152.nii.gz --scales 2 2.5 --arssr ArSSR=default

For each volume (a skull-stripped or masked one: its background exactly its minimum) and
scale, the LR is simulated as the model card's protocol does (centred cubic degradation,
clipped at 0), decoded by tricubic and by the model exactly as ``arssr-jax upsample`` runs
it, and the signed and absolute errors are printed for the background layer touching the
mask and each layer inside it, and by band of ground-truth intensity in the outer layer and
below it (``arssr_jax.evaluation.edges``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.evaluation.cli import load_min_max
from arssr_jax.evaluation.edges import depth_labels, edge_tables
from arssr_jax.evaluation.protocol import band_index
from arssr_jax.evaluation.runners import arssr_runner, interpolation_runner
from arssr_jax.evaluation.simulate import simulate_lr


def report(path, runners, scales, deepest: int) -> str:
    gt = load_min_max(path)
    labels = depth_labels(gt, deepest)  # an unmasked volume is refused before any decoding
    bands = band_index(gt)
    parts = []
    for scale in scales:
        lr = np.maximum(simulate_lr(gt, scale), 0.0)
        outputs = {r.label: r(lr, gt.shape) for r in runners}
        parts.append(f"### {path} x{scale:g}\n\n" + edge_tables(outputs, gt, bands, deepest, labels))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("volumes", nargs="+", help="masked HR volumes (NIfTI)")
    p.add_argument("--arssr", action="append", default=None, metavar="[LABEL=]MODEL",
                   help="a model directory, workdir or shipped name (repeatable; default: ArSSR=default)")
    p.add_argument("--scales", type=float, nargs="+", default=[2.0, 2.5])
    p.add_argument("--deepest", type=int, default=4, help="layers this deep and deeper are one row (default 4)")
    args = p.parse_args(argv)
    try:
        if args.deepest < 1:
            raise ArSSRError(f"--deepest {args.deepest}: give a layer of at least 1")
        runners = [interpolation_runner("tricubic")] + [arssr_runner(spec) for spec in args.arssr or ["ArSSR=default"]]
        for path in args.volumes:
            print(report(path, runners, args.scales, args.deepest) + "\n", flush=True)
    except ArSSRError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
