"""One training volume read and normalised: the rule inference applies to its input."""

from __future__ import annotations

import numpy as np

from arssr_jax import nifti
from arssr_jax.errors import ArSSRError
from arssr_jax.intensity import Normalisation


def read_volume(path) -> np.ndarray:
    """One training volume: a 3D NIfTI file read (with every check of :func:`arssr_jax.nifti.load`)
    and normalised as inference normalises its input, float32."""
    shape = nifti.header_shape(path)
    if shape is not None and len([n for n in shape[3:] if n > 1]):
        raise ArSSRError(f"{path}: shape {shape} is not a 3D volume; give 3D HR volumes (split 4D series first)")
    return normalise_volume(nifti.load(path).data, str(path))


def normalise_volume(data: np.ndarray, name: str) -> np.ndarray:
    """Check a 3D array and normalise it as inference normalises its input (0.5th and
    99.5th percentiles to 0 and 1, :class:`arssr_jax.intensity.Normalisation`), float32."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise ArSSRError(f"{name}: shape {data.shape} is not a 3D volume; give 3D HR volumes")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ArSSRError(f"{name}: dtype {data.dtype} is not a real number type")
    data = data.astype(np.float64)
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise ArSSRError(f"{name}: {bad} voxels are NaN or infinite; fix or remove the volume")
    if float(data.max()) <= float(data.min()):
        raise ArSSRError(f"{name}: the volume is constant ({float(data.min())}); it carries no signal to "
                         "learn from, remove it")
    return Normalisation.of(data, name).apply(data)
