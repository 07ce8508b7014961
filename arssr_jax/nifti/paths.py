"""Paths: NIfTI file names, how a path is printed in a message, and the output-path check."""

from __future__ import annotations

import os
from typing import Any

from arssr_jax.errors import ArSSRError

__all__ = ["NIFTI_EXTENSIONS", "nifti_extension", "check_output_path"]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def show(path: Any) -> str:
    """A path as one printable line (control characters escaped)."""
    s = os.fspath(path) if not isinstance(path, str) else path
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.isprintable():
        return s
    return ascii(s)


def one_line(text: Any) -> str:
    """Any text (e.g. an exception's) as one line."""
    return " ".join(str(text).split())


def nifti_extension(path: str) -> str | None:
    """The NIfTI extension ``path`` ends with, as spelt there (".nii.gz", ".NII", ...), or None."""
    low = path.lower()
    for ext in NIFTI_EXTENSIONS:
        if low.endswith(ext):
            return path[len(path) - len(ext):]
    return None


def check_output_path(out_path: str | os.PathLike, in_path: str | os.PathLike | None = None) -> None:
    """Refuse an output path that cannot or must not be written. Call before expensive work."""
    out = os.fspath(out_path)
    name = show(out)
    if isinstance(out, bytes):
        out = os.fsdecode(out)
    if not out:
        raise ArSSRError("output path is empty; give a file name ending in .nii or .nii.gz")
    if os.path.isdir(out):
        raise ArSSRError(f"output {name}: is an existing directory; give a file name inside it, e.g. {show(os.path.join(out, 'sr.nii.gz'))}")
    if nifti_extension(out) is None:
        stem = out[:-1] if out.endswith(os.sep) else out
        raise ArSSRError(f"output {name}: must end in .nii or .nii.gz; e.g. use {show(os.path.splitext(stem)[0] + '.nii.gz')}")
    if in_path is not None:
        inp = os.fspath(in_path)
        same = os.path.realpath(out) == os.path.realpath(inp)
        if not same and os.path.exists(out) and os.path.exists(inp):
            try:
                same = os.path.samefile(out, inp)
            except OSError:
                same = False
        if same:
            raise ArSSRError(f"output {name}: is the input file {show(inp)}; choose a different output path so the input is not overwritten")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.exists(parent):
        raise ArSSRError(f"output {name}: directory {show(parent)} does not exist; create it first (mkdir -p {show(parent)})")
    if not os.path.isdir(parent):
        raise ArSSRError(f"output {name}: {show(parent)} is not a directory; choose an output inside an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArSSRError(f"output {name}: directory {show(parent)} is not writable; choose a writable directory or fix its permissions")
