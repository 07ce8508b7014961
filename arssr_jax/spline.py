"""Cubic B-spline interpolation of a volume at normalised coordinates, in JAX.

The same interpolant as ``scipy.ndimage.map_coordinates(order=3, mode='reflect')``
(and so as :func:`arssr_jax.interpolation.tricubic`): the volume is first turned into
B-spline coefficients (the spline "prefilter"), then each query blends the 4 x 4 x 4
coefficients around it with the cubic B-spline weights. Boundaries are half-sample
symmetric (the signal mirrored about the outer voxel faces, the faces of the [-1, 1]
cube), as in the centred LR simulation.

The prefilter is the inverse of the sampled B-spline [1, 4, 1] / 6, an infinite
impulse response sqrt(3) * z^|n| with z = sqrt(3) - 2. It is applied here as a
symmetric FIR truncated at |n| <= PREFILTER_RADIUS, where |z|^n < 1e-9: equal to
scipy's recursive filter to float32 rounding, and local, so a volume encoded in tiles
with at least that halo gets the whole volume's coefficients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

POLE = math.sqrt(3.0) - 2.0
PREFILTER_RADIUS = 16


def _prefilter_taps() -> np.ndarray:
    n = np.arange(-PREFILTER_RADIUS, PREFILTER_RADIUS + 1)
    return (math.sqrt(3.0) * POLE ** np.abs(n)).astype(np.float32)


def _reflect_index(index, n):
    """Half-sample symmetric extension: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ... (any integer)."""
    index = jnp.mod(index, 2 * n)
    return jnp.where(index >= n, 2 * n - 1 - index, index)


def prefilter(volume):
    """Cubic B-spline coefficients of ``volume`` (..., X, Y, Z) along its last three axes."""
    volume = volume.astype(jnp.float32)
    taps = jnp.asarray(_prefilter_taps())
    for axis in range(volume.ndim - 3, volume.ndim):
        n = volume.shape[axis]
        positions = jnp.arange(n)[:, None] + jnp.arange(-PREFILTER_RADIUS, PREFILTER_RADIUS + 1)[None, :]
        window = jnp.take(volume, _reflect_index(positions, n), axis=axis)  # (..., n, taps, ...)
        volume = jnp.tensordot(window, taps, axes=([axis + 1], [0]))
    return volume


def _weights(t):
    """Cubic B-spline weights of the neighbours at offsets -1, 0, 1, 2 for fraction t."""
    t2, t3 = t * t, t * t * t
    return (
        (1.0 - t) ** 3 / 6.0,
        (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
        t3 / 6.0,
    )


def sample_cubic(coefficients, coords):
    """The spline with ``coefficients`` (X, Y, Z) at ``coords`` (..., 3) in [-1, 1] -> (...).

    A normalised coordinate c along an axis of n voxels is the continuous index
    p = ((c + 1) n - 1) / 2, voxel centres at integer p (as :mod:`arssr_jax.sampling`).
    """
    shape = coefficients.shape
    flat = coefficients.reshape(-1)
    coords = coords.astype(jnp.float32)
    indices, weights = [], []
    for axis in range(3):
        n = shape[axis]
        p = ((coords[..., axis] + 1.0) * n - 1.0) / 2.0
        base = jnp.floor(p)
        weights.append(_weights(p - base))
        base = base.astype(jnp.int32)
        indices.append([_reflect_index(base + offset, n) for offset in (-1, 0, 1, 2)])
    out = jnp.zeros(coords.shape[:-1], jnp.float32)
    for a in range(4):
        for b in range(4):
            row = indices[0][a] * (shape[1] * shape[2]) + indices[1][b] * shape[2]
            wab = weights[0][a] * weights[1][b]
            for c in range(4):
                out = out + wab * weights[2][c] * jnp.take(flat, row + indices[2][c])
    return out


def sample_cubic_batched(coefficients, coords):
    """Batched :func:`sample_cubic`: (N, X, Y, Z), (N, K, 3) -> (N, K)."""
    return jax.vmap(sample_cubic)(coefficients, coords)


def local_range(volume):
    """max - min of each voxel's 3 x 3 x 3 neighbourhood (edges repeated), (..., X, Y, Z).

    Zero wherever the volume is flat: the residual decoder's correction is scaled by it,
    so it can add detail only where the input shows some.
    """
    volume = volume.astype(jnp.float32)
    window = (1,) * (volume.ndim - 3) + (3, 3, 3)
    pad = [(0, 0)] * (volume.ndim - 3) + [(1, 1)] * 3
    padded = jnp.pad(volume, pad, mode="edge")
    strides = (1,) * volume.ndim
    high = jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, window, strides, "VALID")
    low = jax.lax.reduce_window(padded, jnp.inf, jax.lax.min, window, strides, "VALID")
    return high - low
