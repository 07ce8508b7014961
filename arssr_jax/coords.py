"""Voxel-centre coordinates in the normalised [-1, 1] cube.

Conventions (grid_sample with ``align_corners=False``): along an axis of ``n`` voxels
the voxel centres sit at ``-1 + (2 i + 1) / n`` and the cube's faces at -1 and +1 are
the outer voxel faces. Coordinate entry k always indexes array axis k (nibabel's
i, j, k order). A grid is the Cartesian product of three axes, "ij" indexing,
flattened row-major.
"""

from __future__ import annotations

import numpy as np


def axis_centres(n: int, dtype=np.float32) -> np.ndarray:
    """Normalised voxel-centre coordinates of an axis of ``n`` voxels."""
    return (-1.0 + (2.0 * np.arange(n, dtype=np.float64) + 1.0) / n).astype(dtype)


def make_grid(shape, dtype=np.float32, flatten: bool = True) -> np.ndarray:
    """Voxel-centre coordinates of a volume of ``shape`` (3 ints).

    Returns ``(prod(shape), 3)`` when ``flatten`` else ``(*shape, 3)``.
    """
    axes = [axis_centres(int(n), dtype) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return grid.reshape(-1, len(shape)) if flatten else grid


def normalised_to_index(coords, n):
    """Continuous voxel index of a normalised coordinate (voxel centres at integers)."""
    return ((np.asarray(coords) + 1.0) * np.asarray(n) - 1.0) / 2.0


def index_to_normalised(index, n):
    """Normalised coordinate of a continuous voxel index; inverse of normalised_to_index."""
    return (2.0 * np.asarray(index) + 1.0) / np.asarray(n) - 1.0
