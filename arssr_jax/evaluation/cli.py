"""Command line of ``eval/evaluate.py``.

    python eval/evaluate.py HR.nii [HR_DIR ...] --out results/ [--scales 2 2.5 3 3.5 4]
        [--degradation centred|reference] [--arssr [LABEL=]DIR_OR_NAME ...]
        [--baseline NAME:DIR ...] [--nearest] [--metrics psnr,ssim,psi,lpc_si,dice] [--quiet]
    python eval/evaluate.py --real LR.nii [...] --out results_real/ [--scales 2 3 4] ...

Fixed-scale baselines are trained by the training system (``arssr-jax train --baseline
SRCNN3D --scale 2 --data HR_DIR --workdir runs/srcnn3d_x2``); ``--baseline NAME:DIR``
takes that workdir or a model directory exported from it.

User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from arssr_jax.errors import ArSSRError

PROG = "evaluate.py"


def _scales(values) -> list[float]:
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(float(part))
            except ValueError:
                raise ArSSRError(f"--scales: {part!r} is not a number; e.g. --scales 2 2.5 3") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Evaluate ArSSR models against tricubic interpolation and fixed-scale CNN baselines "
        "on simulated LR (metrics vs the HR ground truth) or on real LR scans (no-reference metrics only).")
    p.add_argument("hr", nargs="*", help="HR test volumes: NIfTI files, directories of them, or list files")
    p.add_argument("--real", nargs="+", metavar="LR", help="real-scan mode: LR scans to upsample (no ground truth)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--scales", nargs="+", default=None,
                   help="up-sampling scales (default 2 2.5 3 3.5 4; commas allowed)")
    p.add_argument("--degradation", choices=["centred", "reference"], default="centred",
                   help="LR simulation: voxel-centre consistent cubic resampling (default) or the reference's "
                   "corner-aligned scipy zoom")
    p.add_argument("--arssr", action="append", default=[], metavar="[LABEL=]MODEL",
                   help="an ArSSR model directory, training workdir or shipped name (repeatable)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME:DIR",
                   help="a trained fixed-scale baseline (training workdir or exported directory), shown as NAME "
                   "(repeatable: one per scale)")
    p.add_argument("--nearest", action="store_true", help="add a nearest-neighbour row (sanity floor)")
    p.add_argument("--metrics", default="psnr,ssim,psi,lpc_si,dice",
                   help="comma-separated subset of psnr,ssim,psnr_head,ssim_head,ssim_factors,psi,lpc_si,dice,bands "
                   "(real scans: psi,lpc_si only)")
    p.add_argument("--clip-lr", action="store_true",
                   help="clip the simulated LR at 0, as a magnitude image is")
    p.add_argument("--antialias", action="store_true",
                   help="blur the HR (Gaussian, sigma = (s - 1) / 2 HR voxels) before sampling it: an LR that averages "
                   "over its voxel as an acquisition does, unlike the point sampling the models train on")
    p.add_argument("--by-volume", action="store_true",
                   help="one table per HR volume in results.md (e.g. one per held-out source)")
    p.add_argument("--no-normalize", action="store_true",
                   help="feed ArSSR models the [0, 1] inputs as they are (the reference's released weights); "
                   "by default they normalise their input as arssr-jax upsample does")
    p.add_argument("--consistency", nargs="+", default=None, metavar="STEP",
                   help="override the ArSSR models' data-consistency step: 0 to 1 at every scale, or SCALE:STEP "
                   "pairs (default: each model's own)")
    p.add_argument("--adapt", action="store_true",
                   help="add a row per ArSSR model adapted to each LR before decoding it (arssr-jax upsample --adapt)")
    p.add_argument("--adapt-steps", type=int, default=None, metavar="N", help="adaptation steps (default 200)")
    p.add_argument("--adapt-isotropic", action="store_true",
                   help="adapt isotropic LRs too (arssr-jax upsample --adapt-isotropic; without it they keep the model)")
    p.add_argument("--figure-volume", type=int, default=0, help="index of the volume shown in the figures (0)")
    p.add_argument("--figure-scale", type=float, default=None, help="scale shown in the figures (largest)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--tile", type=int, default=64, help="tile size (voxels) for the baseline CNNs")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _out_dir(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ArSSRError(f"--out {out} is a file; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArSSRError(f"cannot create output directory {out} ({error.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK):
        raise ArSSRError(f"output directory {out} is not writable; choose another --out")
    return out


def load_min_max(path):
    """The volume min-max normalised to [0, 1] (the paper's convention for scoring)."""
    import numpy as np

    from arssr_jax.nifti import load as load_nifti

    data = np.asarray(load_nifti(path).data, np.float64)
    low, high = data.min(), data.max()
    if not high > low:
        raise ArSSRError(f"{path} is constant; it cannot be scored")
    return ((data - low) / (high - low)).astype(np.float32)


def run_evaluation(args) -> list[Path]:
    from arssr_jax.data.volumes import find_volume_files
    from arssr_jax.evaluation import figures, protocol, runners, tables
    from arssr_jax.options import schedule_from_words

    if bool(args.hr) == bool(args.real):
        raise ArSSRError("give HR test volumes (simulated mode) or --real LR scans, not both and not neither")
    real = bool(args.real)
    default = (2.0, 3.0, 4.0) if real else protocol.PAPER_SCALES
    scales = protocol.check_scales(_scales(args.scales) if args.scales else default)
    metrics = protocol.check_metrics(args.metrics.split(","), real=real)
    if args.antialias and args.degradation != "centred":
        raise ArSSRError("--antialias blurs before the centred degradation; drop --degradation reference or --antialias")
    if args.tile < 8:
        raise ArSSRError(f"--tile {args.tile} is too small; use 32 or more")
    files = find_volume_files(args.real if real else args.hr)
    if not 0 <= args.figure_volume < len(files):
        raise ArSSRError(f"--figure-volume {args.figure_volume} is out of range: {len(files)} volume(s) given")
    out = _out_dir(args.out)

    models = [runners.interpolation_runner("nearest")] if args.nearest else []
    models.append(runners.interpolation_runner("tricubic"))
    models += [runners.baseline_runner(spec, tile=args.tile) for spec in args.baseline]
    consistency = schedule_from_words(args.consistency)
    models += [runners.arssr_runner(spec, normalize=not args.no_normalize, consistency=consistency)
               for spec in args.arssr]
    if args.adapt or args.adapt_steps is not None or args.adapt_isotropic:
        from arssr_jax.adapt import AdaptConfig

        config = AdaptConfig(isotropic=args.adapt_isotropic)
        if args.adapt_steps is not None:
            config = config.replace(steps=args.adapt_steps)
        models += [runners.arssr_runner(spec, normalize=not args.no_normalize, consistency=consistency, adapt=config)
                   for spec in args.arssr]
    runners.unique_labels(models)

    items = [(f, functools.partial(load_min_max, f)) for f in files]  # each loaded at its turn
    common = dict(metrics=metrics, figure_volume=args.figure_volume, figure_scale=args.figure_scale, quiet=args.quiet)
    if real:
        results = protocol.evaluate_real(items, models, scales, **common)
    else:
        results = protocol.evaluate_simulated(items, models, scales, degradation=args.degradation,
                                              clip_lr=args.clip_lr, antialias=args.antialias, **common)
    written = tables.write_tables(results, out, by_volume=args.by_volume)
    if not args.no_figures and results.figure is not None:
        written += figures.write_figures(results.figure, out)
    if not args.quiet:
        print(tables.markdown_by_volume(results) if args.by_volume else tables.markdown(results), end="")
        totals = tables.versus_tricubic_totals(tables.versus_tricubic(results))
        if totals:
            print("\nAgainst tricubic (versus_tricubic.md): " + " ".join(totals))
        print(f"wrote {', '.join(str(p) for p in written)}")
    return written


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_evaluation(args)
    except ArSSRError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0
