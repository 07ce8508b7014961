#!/usr/bin/env python
"""Evaluate ArSSR models and baselines: tables (results.md, results.csv) and figures.

Thin entry point; the logic lives in ``arssr_jax.evaluation`` (see ``--help``). The
fixed-scale baselines are trained with ``arssr-jax train --baseline NAME --scale S``.
"""

import sys

from arssr_jax.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
