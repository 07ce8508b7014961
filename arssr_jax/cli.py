"""The ``arssr-jax`` command line: one subcommand per job.

User errors (ArSSRError) become one line on stderr and exit status 2, never a
traceback, and never a partial output file.
"""

from __future__ import annotations

import argparse
import sys

from arssr_jax.errors import ArSSRError


def _convert_torch(args) -> None:
    from arssr_jax.weights import load_torch_reference, save_model
    from arssr_jax.weights.model_dir import describe

    config, params = load_torch_reference(args.input, encoder=args.encoder, axis_order=args.axis_order)
    metadata = {"source": str(args.input), "converted_from": "PyTorch reference state_dict", "axis_order": args.axis_order}
    save_model(args.output, config, params, metadata)
    if not args.quiet:
        print(f"wrote {args.output}: {describe(config, params)} (axis order: {args.axis_order})")


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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ArSSRError as error:
        print(f"arssr-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arssr-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
