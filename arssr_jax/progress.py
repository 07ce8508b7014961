"""Progress bars: tqdm on a terminal, silent otherwise or when disabled (--quiet)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable, desc: str, unit: str = "it", enabled: bool = True, total=None):
    """tqdm over ``iterable`` when enabled and stderr is a terminal; the iterable itself otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True)
