"""Trilinear sampling of a channels-last feature map at normalised coordinates.

The rules are PyTorch ``grid_sample(mode='bilinear', align_corners=False)`` on a 5D
input, but with coordinate entry k indexing array axis k (no (W, H, D) flip):

- a normalised coordinate c along an axis of n voxels is the continuous index
  p = ((c + 1) * n - 1) / 2, voxel centres at integer p;
- the value is the trilinear blend of the 8 neighbouring voxels;
- ``padding="zeros"``: a neighbour outside the volume contributes zero (the
  reference's behaviour: features darken within half a voxel of the border);
  ``padding="border"``: p is first clamped to [0, n - 1], so samples beyond the
  border repeat the edge voxel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PADDING_MODES = ("zeros", "border")


def _corner_indices_and_weights(p, n, padding):
    """Per axis: lower/upper integer neighbours, their weights and validity masks."""
    if padding == "border":
        p = jnp.clip(p, 0.0, n - 1.0)
    lower = jnp.floor(p)
    frac = p - lower
    lower = lower.astype(jnp.int32)
    upper = lower + 1
    weights = (1.0 - frac, frac)
    corners = (lower, upper)
    valid = tuple((c >= 0) & (c <= n - 1) for c in corners)
    clipped = tuple(jnp.clip(c, 0, n - 1) for c in corners)
    return clipped, weights, valid


def sample_features(features, coords, padding: str = "zeros"):
    """Trilinearly sample ``features`` (X, Y, Z, C) at ``coords`` (..., 3) in [-1, 1].

    Returns (..., C). Differentiable in ``features`` and ``coords``; jit/vmap safe.
    Use ``jax.vmap`` (or :func:`sample_features_batched`) for a batch.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    shape = features.shape[:3]
    channels = features.shape[3]
    flat = features.reshape(-1, channels)
    coords = coords.astype(features.dtype)
    per_axis = []
    for axis in range(3):
        n = shape[axis]
        p = ((coords[..., axis] + 1.0) * n - 1.0) / 2.0
        per_axis.append(_corner_indices_and_weights(p, n, padding))

    (ix, wx, vx), (iy, wy, vy), (iz, wz, vz) = per_axis
    stride_x, stride_y = shape[1] * shape[2], shape[2]
    out = jnp.zeros(coords.shape[:-1] + (channels,), features.dtype)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                weight = wx[a] * wy[b] * wz[c]
                weight = jnp.where(vx[a] & vy[b] & vz[c], weight, 0.0)
                index = ix[a] * stride_x + iy[b] * stride_y + iz[c]
                out = out + weight[..., None] * jnp.take(flat, index, axis=0)
    return out


def sample_features_batched(features, coords, padding: str = "zeros"):
    """Batched :func:`sample_features`: features (N, X, Y, Z, C), coords (N, K, 3) -> (N, K, C)."""
    return jax.vmap(lambda f, c: sample_features(f, c, padding))(features, coords)
