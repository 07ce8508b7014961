"""Thin entry point: ``python train/train.py --config paper --workdir runs/x --data DIR``.

The same as ``arssr-jax train ...``; see ``arssr_jax/training/cli.py`` for the flags.
"""

import argparse
import sys

from arssr_jax.errors import ArSSRError
from arssr_jax.training.cli import add_subcommand


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="train.py")
    subparsers = parser.add_subparsers(dest="command")
    add_subcommand(subparsers)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.run(args)
    except ArSSRError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
