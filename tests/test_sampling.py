"""Trilinear sampling equals torch grid_sample (align_corners=False) with our axis convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arssr_jax.coords import axis_centres, index_to_normalised, make_grid, normalised_to_index
from arssr_jax.sampling import sample_features, sample_features_batched


def torch_sample(features, coords, padding):
    """features (X, Y, Z, C), coords (K, 3) -> (K, C) via grid_sample (whose grid is (W, H, D))."""
    f = torch.from_numpy(np.ascontiguousarray(np.moveaxis(features, -1, 0)))[None]
    grid = torch.from_numpy(coords[:, ::-1].copy()).view(1, 1, 1, -1, 3)
    out = F.grid_sample(f, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.view(features.shape[-1], -1).T.numpy()


def probe_points(rng, shape):
    """Random points inside and well outside the cube, on its faces and at voxel centres."""
    inside = rng.uniform(-1, 1, (200, 3))
    outside = rng.uniform(-1.6, 1.6, (200, 3))
    faces = rng.uniform(-1, 1, (60, 3))
    faces[np.arange(60), np.arange(60) % 3] = np.where(np.arange(60) % 2, 1.0, -1.0)
    half_voxel = rng.uniform(-1, 1, (30, 3))
    half_voxel[:, 0] = 1 - 0.5 / shape[0]  # exactly the outer voxel centre
    centres = make_grid(shape)[rng.choice(np.prod(shape), 40)]
    return np.concatenate([inside, outside, faces, half_voxel, centres]).astype(np.float32)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_matches_grid_sample(padding):
    rng = np.random.default_rng(0)
    shape = (5, 7, 9)
    features = rng.normal(size=shape + (4,)).astype(np.float32)
    coords = probe_points(rng, shape)
    ours = np.asarray(sample_features(jnp.asarray(features), jnp.asarray(coords), padding))
    np.testing.assert_allclose(ours, torch_sample(features, coords, padding), atol=2e-6, rtol=1e-5)


def test_voxel_centres_return_voxels_exactly():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(3, 4, 6, 2)).astype(np.float32)
    out = sample_features(jnp.asarray(features), jnp.asarray(make_grid((3, 4, 6))))
    np.testing.assert_allclose(np.asarray(out).reshape(features.shape), features, atol=1e-6)


def test_zeros_padding_darkens_outer_half_voxel_and_border_does_not():
    features = jnp.ones((4, 4, 4, 1))
    face = jnp.array([[1.0, 0.0, 0.0]])  # outer face of axis 0: halfway to a missing voxel
    assert float(sample_features(features, face, "zeros")[0, 0]) == pytest.approx(0.5)
    assert float(sample_features(features, face, "border")[0, 0]) == pytest.approx(1.0)


def test_jit_vmap_and_gradients():
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 3)).astype(np.float32))
    coords = jnp.asarray(rng.uniform(-1, 1, (2, 6, 3)).astype(np.float32))
    batched = jax.jit(sample_features_batched)(features, coords)
    for n in range(2):
        np.testing.assert_allclose(batched[n], sample_features(features[n], coords[n]), atol=1e-6)
    # Gradient in the features is the trilinear weights: a linear map, checked against a
    # finite difference; gradient in the coordinates is finite.
    loss = lambda f, c: jnp.sum(sample_features_batched(f, c) ** 2)
    grad_f, grad_c = jax.grad(loss, argnums=(0, 1))(features, coords)
    assert np.all(np.isfinite(grad_c)) and np.any(grad_c != 0)
    direction = jnp.asarray(rng.normal(size=features.shape).astype(np.float32))
    eps = 1e-3
    numeric = (loss(features + eps * direction, coords) - loss(features - eps * direction, coords)) / (2 * eps)
    assert float(jnp.sum(grad_f * direction)) == pytest.approx(float(numeric), rel=1e-3)


def test_coordinate_helpers_are_inverse_and_centred():
    np.testing.assert_allclose(axis_centres(4), [-0.75, -0.25, 0.25, 0.75])
    idx = np.array([0.0, 1.5, 3.0])
    np.testing.assert_allclose(normalised_to_index(index_to_normalised(idx, 4), 4), idx)
    grid = make_grid((2, 3, 4), flatten=False)
    assert grid.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(grid[1, 2, 3], [0.5, 2 / 3, 0.75], rtol=1e-6)
