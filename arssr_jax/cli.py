"""The ``arssr-jax`` command line: one subcommand per job.

User errors (ArSSRError) become one line on stderr and exit status 2, never a
traceback, and never a partial output file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

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
    from arssr_jax.inference import upsample_nifti

    scale = _one_or_three(args.scale, "--scale")
    voxel_size = _one_or_three(args.voxel_size, "--voxel-size")
    for flag, value, unit in (("--chunk", args.chunk, "HR voxels"), ("--tile", args.tile, "LR voxels")):
        if value is not None and value < 1:
            raise ArSSRError(f"{flag} must be a positive number of {unit}, got {value}; omit it for the default")
    if scale is not None and not args.quiet:
        low = [s for s in (scale if isinstance(scale, tuple) else (scale,)) if 0 < s < 1]
        if low:
            print(f"arssr-jax upsample: note: --scale {min(low):g} is below 1, so the output is downsampled "
                  "(fewer voxels than the input)", file=sys.stderr)
    result = upsample_nifti(
        args.input, args.output, args.model, scale=scale, voxel_size=voxel_size, like=args.like,
        volume_index=args.volume_index, normalize=not args.no_normalize, padding=args.padding,
        chunk=args.chunk, tile=args.tile, progress=not args.quiet,
    )
    if not args.quiet:
        size = " x ".join(f"{v:.3g}" for v in result.voxel_size)
        print(f"wrote {args.output}: {' x '.join(map(str, result.shape))} voxels of {size} mm")


def _one_or_three(values, flag):
    if values is None:
        return None
    if len(values) not in (1, 3):
        raise ArSSRError(f"{flag} takes one value or three (one per axis), got {len(values)}")
    return values[0] if len(values) == 1 else tuple(values)


def _add_upsample(commands) -> None:
    up = commands.add_parser(
        "upsample", help="super-resolve a NIfTI volume at any scale, voxel size or onto another image's grid",
        description="Super-resolve IN onto a voxel-centre grid over its field of view and write OUT "
        "(.nii or .nii.gz) with an affine that places every voxel where it was sampled.",
    )
    up.add_argument("input", help="low-resolution NIfTI (3D, or 4D with --volume-index)")
    up.add_argument("output", help="output NIfTI path (.nii or .nii.gz); written atomically")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("--scale", type=float, nargs="+", metavar="S", help="one factor, or three (per axis)")
    target.add_argument("--voxel-size", type=float, nargs="+", metavar="MM", help="target voxel size in mm (one or three)")
    target.add_argument("--like", metavar="REF", help="decode straight onto REF's grid (any affine, oblique too)")
    up.add_argument("--model", default=None, help="model directory, training workdir or shipped name (default: the shipped model)")
    up.add_argument("--no-normalize", action="store_true",
                    help="feed intensities as they are (must already be in [0, 1]) and write the raw output")
    up.add_argument("--padding", choices=["zeros", "border"], default=None,
                    help="feature sampling beyond the outer voxel centres (default: the model's, zeros as the reference)")
    up.add_argument("--chunk", type=int, default=None, help="at most this many HR voxels decoded per call (default 65536 on CPU, 2^20 on GPU)")
    up.add_argument("--tile", type=int, default=None, help="encoder tile core size in LR voxels (default: from free memory)")
    up.add_argument("--volume-index", type=int, default=None, metavar="I", help="volume of a 4D input to use")
    up.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    up.set_defaults(run=_upsample)


def _export(args) -> None:
    from arssr_jax.training.checkpoints import load_inference_params
    from arssr_jax.training.config import CONFIG_FILE, load_config
    from arssr_jax.weights import save_model
    from arssr_jax.weights.model_dir import describe

    from arssr_jax.weights.model_dir import check_model_output

    check_model_output(args.output)  # before reading the checkpoint
    saved = Path(args.workdir) / CONFIG_FILE
    if saved.is_file() and load_config(saved).baseline is not None:
        from arssr_jax.models.baselines import load_baseline_run, save_baseline

        _, params, document = load_baseline_run(args.workdir, step=args.step)
        save_baseline(args.output, document["baseline"], document["scale"], params, document["options"],
                      document["metadata"])
        if not args.quiet:
            print(f"wrote {args.output}: {document['baseline']} baseline x{document['scale']:g} "
                  f"(step {document['metadata']['step']})")
        return
    config, params = load_inference_params(args.workdir, step=args.step)
    save_model(args.output, config, params, {"source": str(args.workdir), "step": args.step or "best"})
    if not args.quiet:
        print(f"wrote {args.output}: {describe(config, params)}")


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="write a model directory from a training workdir",
        description="Copy a training run's parameters (its best checkpoint, else the latest, or --step) "
        "into a model directory (config.json + params.msgpack); a baseline run gives a baseline directory.",
    )
    export.add_argument("workdir")
    export.add_argument("output")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the best, else the latest)")
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(run=_export)


def _demo(args) -> None:
    from arssr_jax.demo import run_demo

    run_demo(args.out, model=args.model, progress=not args.quiet, log=(lambda *_: None) if args.quiet else print)


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", help="super-resolve a real 2 mm T1 (shipped with nibabel) at 2x and draw a comparison",
        description="Super-resolve nibabel's bundled anatomical.nii at 2x with the default model; write the "
        "NIfTI and a PNG comparing input, tricubic and ArSSR slices.",
    )
    demo.add_argument("--out", default=".", help="output folder (default: the current directory)")
    demo.add_argument("--model", default=None, help="model to use instead of the shipped default")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arssr-jax", description="Arbitrary-scale super-resolution of 3D MR images (ArSSR) in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert-torch", help="convert a reference PyTorch .pkl into a model directory",
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
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(run=_convert_torch)
    _add_upsample(commands)
    _add_demo(commands)
    _add_export(commands)
    from arssr_jax.training.cli import add_subcommand as add_train

    add_train(commands)
    return parser


def enable_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk, so a second run does not compile again.

    ARSSR_JAX_CACHE picks the folder (default ~/.cache/arssr-jax/xla); "off" disables it.
    """
    folder = os.environ.get("ARSSR_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arssr-jax", "xla"))
    if folder.lower() in ("", "0", "off", "none"):
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
    parser = build_parser()
    args = parser.parse_args(argv)
    restore = []
    if threading.current_thread() is threading.main_thread():
        restore.append(signal.signal(signal.SIGTERM, _on_sigterm))
    _install_quiet_unraisable()
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
