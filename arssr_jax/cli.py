"""The ``arssr-jax`` command line: one subcommand per job.

User errors (ArSSRError) become one line on stderr and exit status 2, never a
traceback, and never a partial output file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from arssr_jax.errors import ArSSRError


def _convert_torch(args) -> None:
    from arssr_jax.weights import load_torch_reference, save_model
    from arssr_jax.weights.model_dir import check_model_output, describe

    check_model_output(args.output)  # before reading anything
    config, params = load_torch_reference(args.input, encoder=args.encoder, axis_order=args.axis_order)
    metadata = {"source": str(args.input), "converted_from": "PyTorch reference state_dict", "axis_order": args.axis_order}
    save_model(args.output, config, params, metadata)
    if not args.quiet:
        print(f"wrote {args.output}: {describe(config, params)} (axis order: {args.axis_order})")


def _upsample(args) -> None:
    from arssr_jax.options import InferenceOptions, schedule_from_words

    scale = _one_or_three(args.scale, "--scale")
    voxel_size = _one_or_three(args.voxel_size, "--voxel-size")
    overrides = dict(consistency=schedule_from_words(args.consistency), normalize=False if args.no_normalize else None,
                     chunk=args.chunk, tile=args.tile, slice_profile=args.slice_profile,
                     slice_thickness=args.slice_thickness)
    InferenceOptions().replace(**overrides)  # every value checked before anything is loaded
    adapt_config = _adapt_config(args)
    jobs = _upsample_jobs(args)
    if scale is not None and not args.quiet:
        low = [s for s in (scale if isinstance(scale, tuple) else (scale,)) if 0 < s < 1]
        if low:
            print(f"arssr-jax upsample: note: --scale {min(low):g} is below 1, so the output is downsampled "
                  "(fewer voxels than the input)", file=sys.stderr)
    if not args.overwrite:
        from arssr_jax.nifti import check_overwrite

        for _, out_path in jobs or [args.paths]:
            check_overwrite(out_path)
    from arssr_jax.inference import Upsampler, like_grid

    like = None if args.like is None else like_grid(args.like, [out for _, out in jobs or [args.paths]])
    upsampler = Upsampler(args.model, padding=args.padding, **overrides)  # a bad --model fails once
    target = dict(scale=scale, voxel_size=voxel_size, like=like, volume_index=args.volume_index)
    if jobs is None:  # upsample IN OUT
        adapt = _adaptation(args, adapt_config, args.paths[0], print)
        result = upsampler.nifti(args.paths[0], args.paths[1], progress=not args.quiet, adapt=adapt, **target)
        if not args.quiet:
            print(f"wrote {args.paths[1]}: {_describe(result)}")
        return
    _upsample_many(args, upsampler, jobs, target, adapt_config)


ADAPT_FLAGS = (("--adapt-steps", "adapt_steps", "steps"), ("--adapt-seconds", "adapt_seconds", "time_budget"),
               ("--adapt-seed", "adapt_seed", "seed"))


def _adapt_config(args):
    """The adaptation's settings from the --adapt flags and the slice profile (checked before
    anything is loaded), or None."""
    given = {field: getattr(args, name) for _, name, field in ADAPT_FLAGS if getattr(args, name) is not None}
    if args.adapt_isotropic:
        given["isotropic"] = True
    if args.slice_profile is not None:
        given["profile"] = args.slice_profile
    if args.slice_thickness is not None:
        given["fwhm" if args.slice_profile == "gaussian" else "thickness"] = args.slice_thickness
    if not args.adapt:
        stray = [flag for flag, name, _ in ADAPT_FLAGS if getattr(args, name) is not None]
        stray += [flag for flag, on in (("--adapt-isotropic", args.adapt_isotropic),
                                        ("--save-adapted", args.save_adapted is not None)) if on]
        if stray:
            raise ArSSRError(f"{', '.join(stray)} set(s) how to adapt to the scan; add --adapt")
        return None
    from arssr_jax.adapt import AdaptConfig

    config = AdaptConfig(**given)
    if args.save_adapted is not None:
        from arssr_jax.weights.model_dir import check_model_output

        if args.out_dir is None:
            check_model_output(args.save_adapted)
        else:
            _make_folder(args.save_adapted, "--save-adapted")
    return config


def _adaptation(args, config, in_path, log):
    """The adaptation of one scan (None without --adapt); with --out-dir each scan's adapted model
    goes to its own folder inside --save-adapted."""
    if config is None:
        return None
    from arssr_jax.adapt import Adaptation

    save_to = args.save_adapted
    if save_to is not None and args.out_dir is not None:
        save_to = os.path.join(save_to, _stem(in_path))
    return Adaptation(config, save_to=save_to, log=None if args.quiet else log)


def _describe(volume) -> str:
    size = " x ".join(f"{v:.3g}" for v in volume.voxel_size)
    return f"{' x '.join(map(str, volume.shape))} voxels of {size} mm"


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0] or name


def output_name(pattern: str, in_path: str) -> str:
    """The output file name of ``in_path`` under ``--pattern`` ({stem}: the input's name without .nii[.gz]; {name}: with it)."""
    try:
        name = pattern.format(stem=_stem(in_path), name=os.path.basename(os.path.normpath(in_path)))
    except (KeyError, IndexError, ValueError) as error:
        raise ArSSRError(f"--pattern {pattern!r} is not a valid name pattern ({type(error).__name__}: {error}); "
                         "use {stem} for the input's name, e.g. '{stem}_sr.nii.gz'") from None
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise ArSSRError(f"--pattern {pattern!r} gives {name!r}, not a file name; give a plain name such as '{{stem}}_sr.nii.gz'")
    return name


def _upsample_jobs(args):
    """None for ``upsample IN OUT``; else the (input, output) pairs of ``upsample IN... --out-dir DIR``."""
    paths = args.paths
    if args.out_dir is None:
        if args.pattern is not None:
            raise ArSSRError("--pattern names the outputs in --out-dir; add --out-dir DIR")
        if len(paths) != 2:
            raise ArSSRError(f"give IN OUT, or several inputs with --out-dir DIR (got {len(paths)} path(s) and no --out-dir)")
        return None
    pattern = "{stem}_sr.nii.gz" if args.pattern is None else args.pattern
    if "{stem}" not in pattern and "{name}" not in pattern and len(paths) > 1:
        raise ArSSRError(f"--pattern {pattern!r} gives every input the same output name; include {{stem}}, e.g. '{{stem}}_sr.nii.gz'")
    out_dir = _make_folder(args.out_dir, "--out-dir")
    jobs, seen = [], {}
    for path in paths:
        out = os.path.join(out_dir, output_name(pattern, path))
        key = os.path.realpath(out)
        if key in seen and os.path.realpath(seen[key]) != os.path.realpath(path):
            raise ArSSRError(f"inputs {seen[key]} and {path} would both be written to {out}; rename one, or use a "
                             "--pattern that tells them apart")
        if key not in seen:
            seen[key] = path
            jobs.append((path, out))
    return jobs


def _make_folder(folder, flag) -> str:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ArSSRError(f"{flag} {folder} is an existing file; give a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ArSSRError(f"cannot create {flag} {folder} ({error.strerror or error}); create it or choose another folder") from None
    return folder


def _upsample_many(args, upsampler, jobs, target, adapt_config=None) -> None:
    """Upsample every (input, output) pair with one loaded model; a failed input is reported in one
    line and skipped; ArSSRError at the end if any failed (exit status 2)."""
    from arssr_jax.progress import progress_bar

    failed = 0
    bar = progress_bar(jobs, desc="upsample", unit="scan", enabled=not args.quiet)

    def say(text, file=sys.stdout):  # above the progress bar when there is one
        if hasattr(bar, "write"):
            bar.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    for in_path, out_path in bar:
        try:
            adapt = _adaptation(args, adapt_config, in_path, say)
            result = upsampler.nifti(in_path, out_path, adapt=adapt, **target)
        except ArSSRError as error:
            failed += 1
            named = str(error) if str(in_path) in str(error) else f"{in_path}: {error}"
            say(f"arssr-jax upsample: error: {named}", sys.stderr)
            continue
        except (OSError, ValueError, RuntimeError, MemoryError) as error:  # unforeseen: still only this input
            failed += 1
            detail = " ".join(str(error).split())[:300]
            say(f"arssr-jax upsample: error: {in_path}: {type(error).__name__}: {detail}", sys.stderr)
            continue
        if not args.quiet:
            say(f"wrote {out_path}: {_describe(result)}")
    if failed == len(jobs):
        raise ArSSRError(f"{failed} of {len(jobs)} input(s) failed (each named above); nothing was written")
    if failed:
        raise ArSSRError(f"{failed} of {len(jobs)} input(s) failed (each named above); "
                         f"the other {len(jobs) - failed} were written to {args.out_dir}")


def _one_or_three(values, flag):
    if values is None:
        return None
    if len(values) not in (1, 3):
        raise ArSSRError(f"{flag} takes one value or three (one per axis), got {len(values)}")
    return values[0] if len(values) == 1 else tuple(values)


def _say(args, line: str) -> None:
    """A summary line, unless --quiet."""
    if not args.quiet:
        print(line)


def _command(commands, name, run, help, description, quiet="no summary line", **parser_options):
    """A subcommand that runs ``run(args)``, with its --quiet flag."""
    parser = commands.add_parser(name, help=help, description=description, **parser_options)
    parser.set_defaults(run=run)
    parser.add_argument("--quiet", action="store_true", help=quiet)
    return parser


def _add_upsample(commands) -> None:
    up = _command(
        commands, "upsample", _upsample, quiet="no progress bars or summary lines", help="super-resolve NIfTI volumes at any scale, voxel size or onto another image's grid",
        usage="arssr-jax upsample IN OUT (--scale S | --voxel-size MM | --like REF) [options]\n"
        "       arssr-jax upsample IN [IN ...] --out-dir DIR [--pattern P] (--scale S | ...) [options]",
        description="Super-resolve IN onto a voxel-centre grid over its field of view and write OUT "
        "(.nii or .nii.gz) with an affine that places every voxel where it was sampled. With --out-dir, "
        "every IN is written to DIR (named by --pattern) with the model loaded once; an input that fails "
        "is reported and skipped, and the exit status is 2 if any failed.",
    )
    up.add_argument("paths", nargs="+", metavar="PATH",
                    help="IN OUT: a low-resolution NIfTI (3D, or 4D with --volume-index) and the output path "
                    "(.nii or .nii.gz; written atomically); with --out-dir: one or more inputs")
    up.add_argument("--out-dir", metavar="DIR", default=None, help="write each input's output here (created if missing)")
    up.add_argument("--pattern", metavar="P", default=None,
                    help="output file name in --out-dir: {stem} is the input's name without .nii[.gz] "
                    "(default: {stem}_sr.nii.gz)")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("--scale", type=float, nargs="+", metavar="S", help="one factor, or three (per axis)")
    target.add_argument("--voxel-size", type=float, nargs="+", metavar="MM", help="target voxel size in mm (one or three)")
    target.add_argument("--like", metavar="REF", help="decode straight onto REF's grid (any affine, oblique too)")
    up.add_argument("--model", default=None, help="model directory, training workdir or shipped name (default: the shipped model)")
    up.add_argument("--no-normalize", action="store_true",
                    help="feed intensities as they are (must already be in [0, 1]) and write the raw output")
    up.add_argument("--padding", choices=["zeros", "border"], default=None,
                    help="feature sampling beyond the outer voxel centres (default: the model's, zeros as the reference)")
    up.add_argument("--consistency", nargs="+", default=None, metavar="STEP",
                    help="after decoding, remove this fraction (0 to 1) of the output's disagreement with the input, "
                    "at every scale, or per scale as SCALE:STEP pairs, linear in between (default: the model's own; "
                    "0 = the network's output as it is; 1 suits an acquired input, whose voxels average the tissue)")
    up.add_argument("--slice-profile", choices=["box", "gaussian"], default=None,
                    help="the input is a thick-slice scan whose slices measure the tissue with this profile: the "
                    "consistency step makes the output's slices agree with the input's along its thick axis "
                    "(default: none, the point step of --consistency; with --adapt on a thick-slice scan: box)")
    up.add_argument("--slice-thickness", type=float, default=None, metavar="MM",
                    help="the slices' thickness (box) or FWHM (gaussian) in mm (default: the slice spacing; "
                    "smaller: a gap between slices)")
    adapt = up.add_argument_group(
        "adapting to the scan", "fine-tune the model on pairs cut from each input itself before decoding it: for a "
        "thick-slice scan (one axis's spacing at least 1.5x the others') from its thin axes degraded with the slice "
        "profile; the model is kept when its own held-out pairs do not improve. Isotropic scans keep the model "
        "unless --adapt-isotropic is given")
    adapt.add_argument("--adapt", action="store_true", help="adapt to each input before decoding it")
    adapt.add_argument("--adapt-steps", type=int, default=None, metavar="N", help="optimiser steps (default 200)")
    adapt.add_argument("--adapt-seconds", type=float, default=None, metavar="S",
                       help="stop adapting after S seconds of training (default: no limit)")
    adapt.add_argument("--adapt-seed", type=int, default=None, metavar="N", help="seed of the pairs (default 0)")
    adapt.add_argument("--adapt-isotropic", action="store_true",
                       help="adapt isotropic scans too, on their own patches degraded around the requested scale "
                       "(experimental: it lost 1.3-1.5 dB at x3-x4 on the training source)")
    adapt.add_argument("--save-adapted", default=None, metavar="DIR",
                       help="write the adapted model (a model directory --model loads; with --out-dir, one per input "
                       "in DIR/<stem>)")
    up.add_argument("--chunk", type=int, default=None, help="at most this many HR voxels decoded per call (default 65536 on CPU, 2^20 on GPU)")
    up.add_argument("--tile", type=int, default=None, help="encoder tile core size in LR voxels (default: from free memory)")
    up.add_argument("--volume-index", type=int, default=None, metavar="I", help="volume of a 4D input to use")
    up.add_argument("--overwrite", action="store_true",
                    help="replace an existing output that arssr-jax did not write (its own outputs are replaced anyway)")


def _export(args) -> None:
    from arssr_jax.options import InferenceOptions, schedule_from_words
    from arssr_jax.weights import save_model
    from arssr_jax.weights.baseline_dir import load_baseline_run, save_baseline
    from arssr_jax.weights.model_dir import check_model_output, describe
    from arssr_jax.weights.workdir import load_inference_params, read_run_document

    check_model_output(args.output)  # before reading the checkpoint
    if read_run_document(args.workdir).get("baseline") is not None:
        _, params, document = load_baseline_run(args.workdir, step=args.step)
        save_baseline(args.output, document["baseline"], document["scale"], params, document["options"],
                      document["metadata"])
        if not args.quiet:
            print(f"wrote {args.output}: {document['baseline']} baseline x{document['scale']:g} "
                  f"(step {document['metadata']['step']})")
        return
    config, params = load_inference_params(args.workdir, step=args.step)
    options = InferenceOptions(consistency=schedule_from_words(args.consistency) or 0.0)
    save_model(args.output, config, params, {"source": str(args.workdir), "step": args.step or "best"}, options)
    _say(args, f"wrote {args.output}: {describe(config, params)}")


def _add_export(commands) -> None:
    export = _command(
        commands, "export", _export, help="write a model directory from a training workdir",
        description="Copy a training run's parameters (its best checkpoint, else the latest, or --step) "
        "into a model directory (config.json + params.msgpack); a baseline run gives a baseline directory.",
    )
    export.add_argument("workdir")
    export.add_argument("output")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the best, else the latest)")
    export.add_argument("--consistency", nargs="+", default=None, metavar="STEP",
                        help="the data-consistency step the model runs with by default: one step (0 to 1) or "
                        "SCALE:STEP pairs, e.g. 2:0.75 3:0.25 (choose it with eval/consistency_sweep.py; default 0)")


def _plot(args) -> None:
    from arssr_jax.curves import plot_curves  # numpy + matplotlib only, not the training stack

    _say(args, f"wrote {plot_curves(args.workdir, args.out)}")


def _add_plot(commands) -> None:
    plot = _command(
        commands, "plot", _plot, help="draw a training run's curves (loss, learning rate, validation PSNR per scale) into a PNG",
        description="Read WORKDIR/log.jsonl and draw the training loss (log scale), the learning rate and the "
        "validation PSNR per scale, each over its interpolation bar (dashed), into a PNG. A run draws "
        "WORKDIR/curves.png itself when it ends; this redraws it at any time, also while the run goes on.",
    )
    plot.add_argument("workdir", help="a training workdir (or its log.jsonl)")
    plot.add_argument("--out", default=None, metavar="PNG", help="where to write the PNG (default: WORKDIR/curves.png)")


def _demo(args) -> None:
    from arssr_jax.demo import run_demo

    run_demo(args.out, model=args.model, progress=not args.quiet, log=(lambda *_: None) if args.quiet else print)


def _add_demo(commands) -> None:
    demo = _command(
        commands, "demo", _demo, quiet="no progress bars or summary lines", help="super-resolve a real 2 mm T1 (shipped with nibabel) at 2x and draw a comparison",
        description="Super-resolve nibabel's bundled anatomical.nii at 2x with the default model; write the "
        "NIfTI and a PNG comparing input, tricubic and ArSSR slices.",
    )
    demo.add_argument("--out", default=".", help="output folder (default: the current directory)")
    demo.add_argument("--model", default=None, help="model to use instead of the shipped default")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``arssr-jax`` parser; given the ``command`` to run, only that one's imports are paid for
    (None: every subcommand in full)."""
    parser = argparse.ArgumentParser(
        prog="arssr-jax", description="Arbitrary-scale super-resolution of 3D MR images (ArSSR) in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = _command(
        commands, "convert-torch", _convert_torch, help="convert a reference PyTorch .pkl into a model directory",
        description="Read a reference ArSSR state_dict (.pkl written by torch.save) safely, "
        "without torch, and write a model directory usable with --model.",
    )
    convert.add_argument("input", help="reference checkpoint, e.g. ArSSR_RDN.pkl")
    convert.add_argument("output", help="model directory to write")
    convert.add_argument("--encoder", choices=["RDN", "ResCNN", "SRResNet"], default="RDN")
    convert.add_argument(
        "--axis-order", choices=["nibabel", "reference"], default="nibabel",
        help="nibabel (default): run the weights on nibabel arrays exactly as the reference ran them on "
        "SimpleITK arrays; reference: keep the reference's axis order",
    )
    _add_upsample(commands)
    _add_demo(commands)
    _add_export(commands)
    _add_plot(commands)
    if command in (None, "train"):
        from arssr_jax.training.cli import add_subcommand as add_train

        add_train(commands)
    else:  # the training stack (orbax, optax, grain) takes seconds to import: only for `train`
        commands.add_parser("train", help=TRAIN_HELP, add_help=False)
    return parser


TRAIN_HELP = "train an ArSSR model or a fixed-scale baseline CNN (or resume a run)"


def _command_of(argv) -> str | None:
    """The subcommand ``argv`` names (its first word not starting with '-'), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def enable_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk, so a second run does not compile again.

    ARSSR_JAX_CACHE picks the folder (default ~/.cache/arssr-jax/xla); "off" disables it.
    """
    from arssr_jax.weights.params import cache_folder

    folder = cache_folder()
    if folder is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup that handles an interrupt runs
    (temporary outputs removed, a training run checkpointed)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _install_quiet_unraisable() -> None:
    """Handle the errors Python can only print ("Exception ignored in ..."):

    * an interrupt (Ctrl-C, SIGTERM) that landed in a garbage-collection callback or a
      finaliser, where Python drops it: the signal is sent again, so the interrupt is not
      lost (the run would otherwise go on) and lands in ordinary code;
    * the 'Event loop is closed' errors that tensorstore's callbacks raise, even after
      main returns, once orbax gave up on a damaged checkpoint (reported in one line).

    Installed once for the process; every other unraisable error is passed on."""
    previous = sys.unraisablehook
    if getattr(previous, "_arssr_quiet", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)
            return
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._arssr_quiet = True
    sys.unraisablehook = hook


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(_command_of(argv) or "")
    args = parser.parse_args(argv)
    restore = []
    if threading.current_thread() is threading.main_thread():
        restore.append(signal.signal(signal.SIGTERM, _on_sigterm))
    _install_quiet_unraisable()
    # orbax logs every checkpoint save and read through absl (INFO and WARNING, and damage it
    # tolerates at ERROR); the console is for our progress lines. Damage that matters raises.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        if args.command in ("upsample", "demo", "train"):
            enable_compilation_cache()
        args.run(args)
    except ArSSRError as error:
        print(f"arssr-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"arssr-jax {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"arssr-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if restore:
            signal.signal(signal.SIGTERM, restore[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
