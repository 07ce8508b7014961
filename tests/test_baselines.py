"""Baselines: interpolation on the voxel-centre grid, the fixed-scale CNNs, training, model dirs."""

import os

import jax
import jax.numpy as jnp
import nibabel
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics import psnr
from arssr_jax.models import baselines as B
from arssr_jax.models.arssr import count_params

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
TINY = {
    "SRCNN3D": {"kernels": (3, 1, 3), "filters": (8, 4)},
    "DCSRN": {"growth": 4, "num_units": 2},
    "ResCNN": {"num_features": 4, "num_blocks": 1, "convs_per_block": 2},
}


def random_params(module, seed=0):
    """Parameters of ``module`` drawn with numpy (JAX's RNG compiles slowly on a small CPU)."""
    shapes = jax.eval_shape(lambda: B.init_baseline(module, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return jnp.asarray(rng.normal(0.0, fan_in ** -0.5, leaf.shape) if len(leaf.shape) > 1
                           else 0.01 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map(draw, shapes)


def anatomical():
    data = nibabel.load(ANATOMICAL).get_fdata()
    return ((data - data.min()) / (data.max() - data.min())).astype(np.float32)


# ------------------------------------------------------------------ interpolation


def test_tricubic_reproduces_a_linear_ramp_in_the_interior():
    n, m = (16, 14, 12), (37, 33, 25)
    index = np.meshgrid(*[np.arange(k, dtype=np.float64) for k in n], indexing="ij")
    ramp = lambda p: 0.3 * p[0] - 0.2 * p[1] + 0.1 * p[2] + 1.0
    out = B.tricubic(ramp(index), shape=m)
    assert out.shape == m and out.dtype == np.float32
    positions = [B.hr_positions(a, b) for a, b in zip(n, m)]
    # HR voxel i of m over n LR voxels sits at LR index (i + 0.5) n / m - 0.5.
    np.testing.assert_allclose(positions[0][:2], [0.5 * 16 / 37 - 0.5, 1.5 * 16 / 37 - 0.5])
    expected = ramp(np.meshgrid(*positions, indexing="ij"))
    # The boundary's influence on the spline coefficients decays like 0.268^d; 4 LR voxels in it is < 1e-3.
    inner = np.ix_(*[(p >= 4) & (p <= k - 5) for p, k in zip(positions, n)])
    np.testing.assert_allclose(out[inner], expected[inner], atol=5e-4)


@pytest.mark.parametrize("shape", [(20, 24, 18), (25, 30, 22)])  # x2 and x2.5
def test_tricubic_matches_scipy_zoom_grid_mode(shape):
    lr = np.random.default_rng(0).random((10, 12, 9))
    zoom = shape[0] / 10
    expected = ndimage.zoom(lr, zoom, order=3, grid_mode=True, mode="reflect")
    if expected.shape != shape:
        pytest.skip("zoom rounds to another shape")
    np.testing.assert_allclose(B.tricubic(lr, shape=shape), expected, atol=1e-5)


def test_tricubic_equals_3d_map_coordinates_and_accepts_a_scale():
    lr = np.random.default_rng(1).random((7, 9, 8))
    shape = (17, 20, 11)
    points = np.meshgrid(*[B.hr_positions(n, m) for n, m in zip(lr.shape, shape)], indexing="ij")
    expected = ndimage.map_coordinates(lr, points, order=3, mode="reflect", prefilter=True)
    np.testing.assert_allclose(B.tricubic(lr, shape=shape), expected, atol=1e-5)
    assert B.tricubic(lr, scale=2.5).shape == (17, 22, 20)  # int(n * s), as ArSSR's grid
    assert B.nearest(lr, shape=shape).shape == shape
    with pytest.raises(ArSSRError):
        B.tricubic(lr[0], shape=(4, 4))


def test_tricubic_beats_nearest_neighbour():
    from arssr_jax.evaluation.simulate import simulate_lr

    hr = anatomical()
    lr = simulate_lr(hr, 2.0)
    assert psnr(B.tricubic(lr, shape=hr.shape), hr) > psnr(B.nearest(lr, shape=hr.shape), hr) + 1.0


# ------------------------------------------------------------------ networks


@pytest.mark.parametrize("name", sorted(B.BASELINES))
def test_baseline_forward_shape(name):
    module = B.build_baseline(name, TINY[name])
    params = random_params(module)
    x = jnp.asarray(np.random.default_rng(0).random((2, 10, 9, 7, 1)), jnp.float32)
    assert module.apply({"params": params}, x).shape == x.shape
    # The default (paper) sizes, by shape inference only.
    full = B.build_baseline(name)
    shapes = jax.eval_shape(lambda: B.init_baseline(full, jax.random.key(0)))
    assert jax.eval_shape(lambda p: full.apply({"params": p}, x), shapes).shape == x.shape


def test_default_sizes():
    counts = {name: count_params(jax.eval_shape(lambda: B.init_baseline(B.build_baseline(name), jax.random.key(0))))
              for name in B.BASELINES}
    # SRCNN3D 9-1-5, 64/32: 729*64+64 + 64*32+32 + 125*32+1.
    assert counts["SRCNN3D"] == 729 * 64 + 64 + 64 * 32 + 32 + 125 * 32 + 1
    # DCSRN k=24: 1->48, then 48, 72, 96, 120 -> 24 (3^3), then 1^3 144 -> 1.
    assert counts["DCSRN"] == 27 * 48 + 48 + sum(27 * c * 24 + 24 for c in (48, 72, 96, 120)) + 144 + 1
    # ResCNN: the ArSSR encoder's 2,214,912 with conv_end 64 -> 1 instead of 64 -> 128.
    assert counts["ResCNN"] == 2_214_912 - 27 * 64 * 127 - 127


def test_rescnn_with_zero_last_layer_is_the_identity():
    module = B.build_baseline("ResCNN", TINY["ResCNN"])
    params = random_params(module)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "conv_end" in jax.tree_util.keystr(path) else x, params)
    x = jnp.asarray(np.random.default_rng(0).random((1, 9, 8, 7, 1)), jnp.float32)
    np.testing.assert_allclose(module.apply({"params": params}, x), x, atol=0)


def test_tiled_application_equals_the_whole_volume():
    module = B.build_baseline("ResCNN", TINY["ResCNN"])
    params = random_params(module, 1)
    volume = np.random.default_rng(2).random((23, 17, 12)).astype(np.float32)
    whole = np.asarray(module.apply({"params": params}, volume[None, ..., None]))[0, ..., 0]
    np.testing.assert_allclose(B.apply_baseline(module, params, volume, tile=5), whole, atol=1e-5)


# ------------------------------------------------------------------ training and model directories


def test_training_lowers_the_loss_and_round_trips(tmp_path):
    hr = anatomical()
    start = random_params(B.build_baseline("SRCNN3D", TINY["SRCNN3D"]))
    module, params, losses = B.train_baseline("SRCNN3D", [hr], 2.0, 30, options=TINY["SRCNN3D"], patch_size=12,
                                              batch_size=2, learning_rate=3e-3, seed=0, params=start)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])

    path = B.save_baseline(tmp_path / "srcnn_x2", "SRCNN3D", 2.0, params, TINY["SRCNN3D"], {"steps": 30})
    assert B.is_baseline_dir(path)
    loaded, loaded_params, document = B.load_baseline(path)
    assert loaded == module and document["scale"] == 2.0 and document["metadata"]["steps"] == 30
    lr = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    np.testing.assert_array_equal(B.run_baseline(loaded, loaded_params, lr, (16, 18, 14)),
                                  B.run_baseline(module, params, lr, (16, 18, 14)))


def test_loading_bad_baseline_directories(tmp_path):
    with pytest.raises(ArSSRError, match="not a baseline model directory"):
        B.load_baseline(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "arssr-jax-model/1"}')
    (tmp_path / "params.msgpack").write_bytes(b"")
    with pytest.raises(ArSSRError, match="not a baseline config"):
        B.load_baseline(tmp_path)
    other = random_params(B.build_baseline("DCSRN", TINY["DCSRN"]))
    B.save_baseline(tmp_path / "m", "DCSRN", 3.0, other, {"growth": 5, "num_units": 2})
    with pytest.raises(ArSSRError, match="do not fit"):
        B.load_baseline(tmp_path / "m")
    with pytest.raises(ArSSRError, match="unknown baseline"):
        B.build_baseline("EDSR")
