"""Command line of ``eval/evaluate.py``: the evaluation, and training a fixed-scale baseline.

    python eval/evaluate.py HR.nii [HR_DIR ...] --out results/ [--scales 2 2.5 3 3.5 4]
        [--degradation centred|reference] [--arssr [LABEL=]DIR_OR_NAME ...]
        [--baseline NAME:DIR ...] [--nearest] [--metrics psnr,ssim,psi,lpc_si,dice] [--quiet]
    python eval/evaluate.py --real LR.nii [...] --out results_real/ [--scales 2 3 4] ...
    python eval/evaluate.py train-baseline SRCNN3D --scale 2 --data HR_DIR --steps 2000 --out models/srcnn3d_x2

User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
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
                   help="a trained fixed-scale baseline directory, shown as NAME (repeatable: one per scale)")
    p.add_argument("--nearest", action="store_true", help="add a nearest-neighbour row (sanity floor)")
    p.add_argument("--metrics", default="psnr,ssim,psi,lpc_si,dice",
                   help="comma-separated subset of psnr,ssim,psi,lpc_si,dice (real scans: psi,lpc_si only)")
    p.add_argument("--figure-volume", type=int, default=0, help="index of the volume shown in the figures (0)")
    p.add_argument("--figure-scale", type=float, default=None, help="scale shown in the figures (largest)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--tile", type=int, default=64, help="tile size (voxels) for the baseline CNNs")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def build_train_parser() -> argparse.ArgumentParser:
    from arssr_jax.models.baselines import BASELINES

    p = argparse.ArgumentParser(prog=f"{PROG} train-baseline",
                                description="Train one fixed-scale baseline CNN (Adam, L1, random patches) and save it.")
    p.add_argument("name", choices=sorted(BASELINES))
    p.add_argument("--scale", type=float, required=True)
    p.add_argument("--data", nargs="+", required=True, help="HR training volumes (files, directories, list files)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="baseline model directory to write")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--degradation", choices=["centred", "reference"], default="centred")
    p.add_argument("--options", default="{}", help='architecture options as JSON, e.g. \'{"num_features": 32}\'')
    p.add_argument("--quiet", action="store_true")
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


def _loader(path):
    def load():
        from arssr_jax.data.volumes import normalise_volume
        from arssr_jax.nifti import load as load_nifti

        return normalise_volume(load_nifti(path).data, str(path))

    return load


def run_evaluation(args) -> list[Path]:
    from arssr_jax.data.volumes import find_volume_files
    from arssr_jax.evaluation import figures, protocol, runners, tables

    if bool(args.hr) == bool(args.real):
        raise ArSSRError("give HR test volumes (simulated mode) or --real LR scans, not both and not neither")
    real = bool(args.real)
    default = (2.0, 3.0, 4.0) if real else protocol.PAPER_SCALES
    scales = protocol.check_scales(_scales(args.scales) if args.scales else default)
    metrics = protocol.check_metrics(args.metrics.split(","), real=real)
    if args.tile < 8:
        raise ArSSRError(f"--tile {args.tile} is too small; use 32 or more")
    files = find_volume_files(args.real if real else args.hr)
    if not 0 <= args.figure_volume < len(files):
        raise ArSSRError(f"--figure-volume {args.figure_volume} is out of range: {len(files)} volume(s) given")
    out = _out_dir(args.out)

    models = [runners.interpolation_runner("nearest")] if args.nearest else []
    models.append(runners.interpolation_runner("tricubic"))
    models += [runners.baseline_runner(spec, tile=args.tile) for spec in args.baseline]
    models += [runners.arssr_runner(spec) for spec in args.arssr]
    runners.unique_labels(models)

    items = [(f, _loader(f)) for f in files]
    common = dict(metrics=metrics, figure_volume=args.figure_volume, figure_scale=args.figure_scale, quiet=args.quiet)
    if real:
        results = protocol.evaluate_real(items, models, scales, **common)
    else:
        results = protocol.evaluate_simulated(items, models, scales, degradation=args.degradation, **common)
    written = tables.write_tables(results, out)
    if not args.no_figures and results.figure is not None:
        written += figures.write_figures(results.figure, out)
    if not args.quiet:
        print(tables.markdown(results), end="")
        print(f"wrote {', '.join(str(p) for p in written)}")
    return written


def run_training(args) -> Path:
    from arssr_jax.data.volumes import load_volumes
    from arssr_jax.models.baselines import save_baseline, train_baseline

    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ArSSRError(f"--options {args.options!r} is not a JSON object ({error})") from None
    if args.scale < 1:
        raise ArSSRError(f"--scale {args.scale} must be >= 1")
    if args.patch_size < 4 or args.batch_size < 1:
        raise ArSSRError("--patch-size must be >= 4 and --batch-size >= 1")
    out = Path(args.out)
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise ArSSRError(f"--out {out}: folder {out.parent} does not exist; create it first")
    volumes = load_volumes(args.data)
    module, params, losses = train_baseline(
        args.name, volumes.arrays, args.scale, args.steps, options=options, patch_size=args.patch_size,
        batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, degradation=args.degradation,
        progress=not args.quiet)
    metadata = {"steps": args.steps, "patch_size": args.patch_size, "batch_size": args.batch_size,
                "learning_rate": args.lr, "seed": args.seed, "degradation": args.degradation,
                "final_loss": losses[-1], "data": list(volumes.names)}
    save_baseline(out, args.name, args.scale, params, options, metadata)
    if not args.quiet:
        print(f"wrote {out}: {args.name} x{args.scale:g}, final L1 {losses[-1]:.4f}")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    training = bool(argv) and argv[0] == "train-baseline"
    parser = build_train_parser() if training else build_parser()
    args = parser.parse_args(argv[1:] if training else argv)
    try:
        run_training(args) if training else run_evaluation(args)
    except ArSSRError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0
