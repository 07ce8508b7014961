"""The thick-slice protocol: every held-out source made thick along one axis,
brought back to its own grid by each method, scored against it.

For each source (the ground truth, min-max normalised to [0, 1]), slice axis, factor f and
slice profile: the source is cropped along the axis to a multiple of f (so that the LR
slices and the HR voxels span the same extent), and the LR is f times coarser along it,
each slice measuring f consecutive HR voxels (``box``: their mean, as a contiguous
thick-slice acquisition; ``gaussian``: a Gaussian of FWHM = the slice thickness = f HR
voxels; :mod:`arssr_jax.slice_profile`). Slice j's centre is the centre of its f HR
voxels: the [-1, 1] cube's voxel-centre convention, so every method decodes onto the HR
voxel centres with ``shape = source shape`` (grid_for_shape) and no offset.

Rows: tricubic (along the slice axis: the in-plane samples are kept exactly), the shipped
model and the model adapted to that LR (:func:`arssr_jax.adapt.adapt`, default
``AdaptConfig`` unless ``--steps``/``--lr``, with the case's profile: a Gaussian's FWHM is the
slice spacing, as simulated), each as the network alone, with the point consistency steps of
``--consistency`` (0.75: the shipped schedule's step at these grids, whose scale is
f ** (1/3) < 2) and with the slice consistency (``--slice-profile``; what ``--adapt`` gives a
thick-slice scan), and ECLARE's outputs when ``--eclare DIR`` holds
``DIR/<source>_x<f>_<profile>_eclare.nii.gz`` on the source's grid (cropped as here:
``--write-lr DIR`` writes each case's LR and cropped source for ``eval/run_eclare.py``).
Metrics: PSNR and SSIM over the volume and inside the head (``arssr_jax.evaluation``'s
head mask), LPC-SI (slice-wise), wall time (adaptation and decoding apart).

    python eval/thick_slice.py --out results/thick_slice            # all sources, x3 x4 x5, box + gaussian
    python eval/thick_slice.py --out /tmp/ts --quick                 # one source (anatomical), x4, box
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from arssr_jax import metrics as M
from arssr_jax.adapt import AdaptConfig, adapt
from arssr_jax.consistency import back_project, back_project_slices
from arssr_jax.coords import grid_for_shape
from arssr_jax.slice_profile import thick_slices
from arssr_jax.errors import ArSSRError
from arssr_jax.evaluation.protocol import head_mask, reference_scores
from arssr_jax.intensity import Normalisation
from arssr_jax.interpolation import tricubic

METRICS = ("psnr", "ssim", "psnr_head", "ssim_head", "lpc_si")
COLUMNS = ("psnr", "ssim", "psnr_head", "ssim_head", "lpc_si", "adapt_s", "decode_s")


def load_source(path):
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.get_fdata(), np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    data = (data - data.min()) / (data.max() - data.min())
    return data, tuple(float(z) for z in image.header.get_zooms()[:3])


def make_case(hr, zooms, axis, factor, profile):
    """(HR cropped to a multiple of the factor along the axis, its LR, the LR's voxel size)."""
    keep = hr.shape[axis] // factor * factor
    if keep < 2 * factor:
        raise ArSSRError(f"axis {axis} has {hr.shape[axis]} voxels: too few for two slices of {factor}")
    hr = np.take(hr, np.arange(keep), axis=axis)
    lr = thick_slices(hr, axis, factor, profile, width=factor)
    spacing = list(zooms)
    spacing[axis] *= factor
    return np.ascontiguousarray(hr), lr, tuple(spacing)


def write_lr(folder, name, source_path, hr, lr, axis, factor, profile):
    """The case's LR (slice spacing x factor, origin at its first block's centre) and the cropped
    source, as NIfTI: ``<name>_x<f>_<profile>.nii.gz`` and ``..._hr.nii.gz`` (ECLARE's --like)."""
    import nibabel as nib

    affine = nib.load(str(source_path)).affine
    thick = affine.copy()
    thick[:3, axis] *= factor
    thick[:3, 3] += affine[:3, axis] * (factor - 1) / 2
    stem = Path(folder) / f"{name}_x{factor}_{profile}"
    nib.save(nib.Nifti1Image(lr, thick), f"{stem}.nii.gz")
    nib.save(nib.Nifti1Image(hr, affine), f"{stem}_hr.nii.gz")


def network(model, lr, shape):
    """The network's output (no consistency step), in the LR's units, and its wall time."""
    from arssr_jax.inference import upsample

    start = time.perf_counter()
    out = upsample(lr, model, shape=shape, consistency=0)
    return out, time.perf_counter() - start


def score(sr, hr, mask, head):
    return reference_scores(np.asarray(sr, np.float32), hr, mask, None, METRICS, head=head)


def run_case(name, hr, zooms, axis, factor, profile, model, args, records):
    hr, lr, spacing = make_case(hr, zooms, axis, factor, profile)
    if args.write_lr:
        write_lr(args.write_lr, name, args.source_path, hr, lr, axis, factor, profile)
        return
    mask, head = hr > M.otsu_threshold(hr), head_mask(hr)
    grid = grid_for_shape(lr.shape, hr.shape)
    scales = [1.0, 1.0, 1.0]
    scales[axis] = float(factor)
    case = dict(volume=name, axis=axis, factor=factor, profile=profile, lr_shape=list(lr.shape),
                hr_shape=list(hr.shape))

    def add(label, sr, adapt_s=0.0, decode_s=0.0, **extra):
        row = dict(case, model=label, adapt_s=adapt_s, decode_s=decode_s, **score(sr, hr, mask, head), **extra)
        records.append(row)
        print(f"  {label:32s} PSNR {row['psnr']:.3f} SSIM {row['ssim']:.4f} head {row['psnr_head']:.3f}/"
              f"{row['ssim_head']:.4f} LPC-SI {row['lpc_si']:.4f}  ({adapt_s:.0f} s + {decode_s:.0f} s)", flush=True)

    start = time.perf_counter()
    add("tricubic", tricubic(lr, shape=hr.shape), decode_s=time.perf_counter() - start)
    outputs = {}
    if not args.no_shipped:
        outputs["shipped"] = (*network(model, lr, hr.shape), 0.0)
    if not args.no_adapt:
        norm = Normalisation.of(lr)
        config = AdaptConfig(**args.adapt_changes, profile=profile)  # the acquisition's profile is known: FWHM = thickness
        result = adapt(model[0], model[1], norm.apply(lr), spacing, scales, config, progress=not args.quiet)
        print(f"  {result.message}", flush=True)
        out, decode_s = network((model[0], result.params), lr, hr.shape)
        outputs["adapted"] = (out, decode_s, result.seconds)
        case_extra = dict(adapt_start_psnr=result.start_score["psnr"], adapt_psnr=result.adapted_score["psnr"],
                          adapt_steps=result.steps_run, adapt_best_step=result.best_step, kept_start=result.kept_start)
    for label, (out, decode_s, adapt_s) in outputs.items():
        extra = case_extra if label == "adapted" else {}
        add(f"{label}, network alone", out, adapt_s, decode_s, **extra)
        for step in args.consistency:
            add(f"{label}, point step {step:g}", back_project(out, lr, grid, step), adapt_s, decode_s, **extra)
        # --slice-profile (and --adapt on a thick-slice scan): the slices made to agree, measured so
        add(f"{label}, slice consistency", back_project_slices(out, lr, grid, axis, profile, float(factor)),
            adapt_s, decode_s, **extra)
    if args.eclare:
        path = Path(args.eclare) / f"{name}_x{factor}_{profile}_eclare.nii.gz"
        if path.is_file():
            import nibabel as nib

            sr = np.asarray(nib.load(str(path)).get_fdata(), np.float32)
            if sr.shape == hr.shape:
                add("ECLARE", sr)
            else:
                print(f"  ECLARE output {path} has shape {sr.shape}, not {hr.shape}: skipped", flush=True)


def markdown(records) -> str:
    lines = []
    cases = list(dict.fromkeys((r["volume"], r["factor"], r["profile"], r["axis"]) for r in records))
    lines.append("| source | LR | model | PSNR | SSIM | PSNR head | SSIM head | LPC-SI | adapt s | decode s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for volume, factor, profile, axis in cases:
        rows = [r for r in records if (r["volume"], r["factor"], r["profile"], r["axis"]) == (volume, factor, profile, axis)]
        base = next(r for r in rows if r["model"] == "tricubic")
        for r in rows:
            gain = "" if r is base else f" ({r['psnr'] - base['psnr']:+.2f})"
            lines.append(f"| {volume} | x{factor} {profile}, axis {axis} | {r['model']} | {r['psnr']:.2f}{gain} | "
                         f"{r['ssim']:.4f} | {r['psnr_head']:.2f} | {r['ssim_head']:.4f} | {r['lpc_si']:.4f} | "
                         f"{r['adapt_s']:.0f} | {r['decode_s']:.0f} |")
    return "\n".join(lines) + "\n"


def adapt_fields(parser, pairs):
    """``FIELD=VALUE`` words as AdaptConfig fields, each value parsed as its field's type."""
    import dataclasses
    import typing

    types = typing.get_type_hints(AdaptConfig)
    fields = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in {f.name for f in dataclasses.fields(AdaptConfig)} or not text:
            parser.error(f"--adapt-set {pair!r}: give FIELD=VALUE with an AdaptConfig field")
        kind = next((t for t in typing.get_args(types[name]) if t is not type(None)), types[name])
        if kind is bool:  # bool("false") is True
            if text.lower() not in ("true", "false", "1", "0"):
                parser.error(f"--adapt-set {pair!r}: {name} takes true or false")
            fields[name] = text.lower() in ("true", "1")
        else:
            fields[name] = kind(text)
    return fields


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="*", default=None, help="ground-truth volumes (default: data/heldout/*.nii.gz)")
    parser.add_argument("--out", required=True, help="folder for thick_slice.md and thick_slice.json")
    parser.add_argument("--factors", nargs="*", type=int, default=[3, 4, 5])
    parser.add_argument("--profiles", nargs="*", default=["box", "gaussian"], choices=["box", "gaussian"])
    parser.add_argument("--axis", type=int, default=2, help="the slice axis (0, 1 or 2; default 2)")
    parser.add_argument("--consistency", nargs="*", type=float, default=[0.75],
                        help="point consistency steps to score besides the network alone and the slice consistency")
    parser.add_argument("--model", default=None, help="start model (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default: AdaptConfig's)")
    parser.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default: AdaptConfig's)")
    parser.add_argument("--time-budget", type=float, default=None, help="adaptation seconds per case")
    parser.add_argument("--adapt-set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other AdaptConfig fields, e.g. lr_patch=12 samples=4096 (for choosing a recipe on training sources)")
    parser.add_argument("--eclare", default=None, help="folder of ECLARE outputs <source>_x<f>_<profile>.nii.gz")
    parser.add_argument("--write-lr", default=None, metavar="DIR",
                        help="only write each case's LR and cropped source into DIR (inputs for eval/run_eclare.py)")
    parser.add_argument("--no-adapt", action="store_true")
    parser.add_argument("--no-shipped", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one source (anatomical or the first), x4, box")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    sources = [Path(p) for p in (args.sources or sorted(Path("data/heldout").glob("*.nii.gz")))]
    if not sources:
        parser.error("no sources: give --sources or run train/prepare_data.py data")
    if args.quick:
        sources = [next((p for p in sources if p.name.startswith("anatomical")), sources[0])]
        args.factors, args.profiles = [4], ["box"]
    args.adapt_changes = {k: v for k, v in (("steps", args.steps), ("learning_rate", args.lr),
                                            ("time_budget", args.time_budget)) if v is not None}
    args.adapt_changes.update(adapt_fields(parser, args.adapt_set))
    from arssr_jax.weights import load_model

    module, params, _ = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in sources:
        name = path.name.split(".")[0]
        hr, zooms = load_source(path)
        args.source_path = path
        for factor in args.factors:
            for profile in args.profiles:
                print(f"{name} x{factor} {profile} (axis {args.axis}, {'x'.join(map(str, hr.shape))})", flush=True)
                try:
                    run_case(name, hr, zooms, args.axis, factor, profile, (module, params), args, records)
                except ArSSRError as error:
                    print(f"  skipped: {error}", flush=True)
                (out / "thick_slice.json").write_text(json.dumps(records, indent=1))
                (out / "thick_slice.md").write_text(markdown(records))
    print(markdown(records))


if __name__ == "__main__":
    main()
