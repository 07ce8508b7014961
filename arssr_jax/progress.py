"""Progress bars: tqdm on a terminal, silent otherwise or when disabled (--quiet)."""

from __future__ import annotations

import sys

from tqdm import tqdm  # the text bar: bars are drawn on terminals only, never as notebook widgets


def shows(enabled: bool = True) -> bool:
    """Whether a bar is drawn: enabled and stderr a terminal (a log file gets no bars)."""
    return bool(enabled) and sys.stderr.isatty()


def progress_bar(iterable, desc: str, unit: str = "it", enabled: bool = True, total=None):
    """tqdm over ``iterable`` when it :func:`shows`; the iterable itself otherwise."""
    if not shows(enabled):
        return iterable
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True)


def progress_counter(total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                     leave: bool = False) -> tqdm:
    """A bar advanced by hand (``update``, ``set_postfix``, ``write``, ``close``); disabled (every
    call still valid, ``write`` prints) unless it :func:`shows`."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=not shows(enabled), file=sys.stderr)
