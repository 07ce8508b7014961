"""NIfTI input/output that keeps the geometry and never leaves half-written files.

* :mod:`.reading`: :func:`load` (a checked 3D volume as float32), :func:`load_grid` and
  :func:`header_shape` (from the header only), :func:`check_header` (the one header rule).
* :mod:`.writing`: :func:`save` (atomic), the output mark (:func:`output_description`,
  :func:`written_by_arssr`, :func:`check_overwrite`).
* :mod:`.paths`: :func:`check_output_path`, run before any expensive work; NIfTI extensions.
* :mod:`.volume`: :class:`Volume` and :func:`check_affine` (the one affine rule).

Every user-facing problem is raised as :class:`~arssr_jax.errors.ArSSRError` with a
one-line message naming the file, the problem and the fix.
"""

from arssr_jax.nifti.paths import NIFTI_EXTENSIONS, check_output_path, nifti_extension
from arssr_jax.nifti.reading import check_header, header_shape, load, load_grid
from arssr_jax.nifti.volume import Volume, check_affine
from arssr_jax.nifti.writing import OUTPUT_MARK, check_overwrite, output_description, save, written_by_arssr

__all__ = [
    "Volume", "check_affine", "load", "load_grid", "header_shape", "check_header",
    "save", "OUTPUT_MARK", "output_description", "written_by_arssr", "check_overwrite",
    "check_output_path", "NIFTI_EXTENSIONS", "nifti_extension",
]
