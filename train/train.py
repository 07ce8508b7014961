"""Thin entry point: ``python train/train.py --config paper --workdir runs/x --data DIR``.

Exactly ``arssr-jax train ...`` (see ``arssr_jax/training/cli.py`` for the flags).
"""

import sys

from arssr_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
