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
from arssr_jax.coords import centre_positions
from arssr_jax import interpolation as interp
from arssr_jax.models import baselines as B
from arssr_jax.weights import baseline_dir
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
    out = interp.tricubic(ramp(index), shape=m)
    assert out.shape == m and out.dtype == np.float32
    positions = [centre_positions(b, a) for a, b in zip(n, m)]
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
    np.testing.assert_allclose(interp.tricubic(lr, shape=shape), expected, atol=1e-5)


def test_tricubic_equals_3d_map_coordinates_and_accepts_a_scale():
    lr = np.random.default_rng(1).random((7, 9, 8))
    shape = (17, 20, 11)
    points = np.meshgrid(*[centre_positions(m, n) for n, m in zip(lr.shape, shape)], indexing="ij")
    expected = ndimage.map_coordinates(lr, points, order=3, mode="reflect", prefilter=True)
    np.testing.assert_allclose(interp.tricubic(lr, shape=shape), expected, atol=1e-5)
    assert interp.tricubic(lr, scale=2.5).shape == (17, 22, 20)  # int(n * s), as ArSSR's grid
    assert interp.nearest(lr, shape=shape).shape == shape
    with pytest.raises(ArSSRError):
        interp.tricubic(lr[0], shape=(4, 4))


def test_tricubic_beats_nearest_neighbour():
    from arssr_jax.evaluation.simulate import simulate_lr

    hr = anatomical()
    lr = simulate_lr(hr, 2.0)
    assert psnr(interp.tricubic(lr, shape=hr.shape), hr) > psnr(interp.nearest(lr, shape=hr.shape), hr) + 1.0


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


def small_baseline_config(name="SRCNN3D", scale=2.0, **changes):
    """The 'baseline' preset shrunk to seconds: tiny network, LR 6^3 -> HR 12^3, batch 2."""
    import dataclasses

    from arssr_jax.training import baseline

    config = baseline(name, scale, data_paths=(ANATOMICAL,), options=TINY[name])
    data = dataclasses.replace(config.data, lr_size=6, patch_size=int(6 * scale), batch_size=2, samples_per_volume=20)
    val = dataclasses.replace(config.val, patches_per_volume=2, every_steps=10)
    optim = dataclasses.replace(config.optim, learning_rate=3e-3)
    return config.replace(data=data, val=val, optim=optim, log_every=1, **changes)


def test_baseline_trains_through_the_training_system(tmp_path):
    """`arssr-jax train --baseline`: the same loop, checkpoints and log as ArSSR; the loss
    falls; the workdir and its export serve evaluation at the trained scale only."""
    import json

    from arssr_jax.cli import main as cli_main
    from arssr_jax.evaluation.runners import baseline_runner
    from arssr_jax.training import train

    workdir = tmp_path / "srcnn_x2"
    result = train(small_baseline_config(), workdir, steps=30, quiet=True)
    assert result.step == 30 and result.best_step in (10, 20, 30)
    assert set(result.validation) >= {"val_l1", "val_psnr"} and set(result.interpolation) >= {"val_l1", "val_psnr"}
    records = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert records[0]["interpolation_name"] == "tricubic"

    assert cli_main(["export", str(workdir), str(tmp_path / "exported"), "--quiet"]) == 0
    module, params, document = baseline_dir.load_baseline(tmp_path / "exported")
    assert document["scale"] == 2.0 and document["metadata"]["step"] == result.best_step
    run_module, run_params, _ = baseline_dir.load_baseline(workdir)
    assert run_module == module
    lr = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    expected = B.run_baseline(module, params, lr, (16, 18, 14))
    np.testing.assert_array_equal(B.run_baseline(run_module, run_params, lr, (16, 18, 14)), expected)
    runner = baseline_runner(f"SRCNN3D:{workdir}")
    assert runner.serves(2.0) and not runner.serves(2.5)
    np.testing.assert_array_equal(runner(lr, (16, 18, 14)), expected)


def test_baseline_config_errors(tmp_path):
    import dataclasses

    from arssr_jax.cli import main as cli_main
    from arssr_jax.training import train
    from arssr_jax.weights import load_inference_params

    config = small_baseline_config()
    with pytest.raises(ArSSRError, match="scale_min == scale_max"):
        config.replace(data=dataclasses.replace(config.data, scale_max=3.0)).validate()
    with pytest.raises(ArSSRError, match=r"val.scales=\(2,\)"):
        config.replace(val=dataclasses.replace(config.val, scales=(2.0, 3.0))).validate()
    with pytest.raises(ArSSRError, match="one isotropic scale"):
        config.replace(data=dataclasses.replace(config.data, anisotropic=True)).validate()
    with pytest.raises(ArSSRError, match="bad options"):
        small_baseline_config(baseline=dataclasses.replace(config.baseline, options={"width": 3})).validate()
    train(config, tmp_path / "run", steps=10, quiet=True)
    with pytest.raises(ArSSRError, match="not ArSSR"):
        load_inference_params(tmp_path / "run")
    with pytest.raises(ArSSRError, match="not a baseline"):
        baseline_dir.load_baseline_run(_arssr_run(tmp_path / "arssr"))
    assert cli_main(["train", "--workdir", str(tmp_path / "x"), "--scale", "2", "--quiet"]) == 2
    assert cli_main(["train", "--workdir", str(tmp_path / "x"), "--baseline", "DCSRN", "--quiet"]) == 2
    assert not (tmp_path / "x").exists()


def _arssr_run(workdir):
    from arssr_jax.training import tiny, train

    train(tiny(data_paths=(ANATOMICAL,)), workdir, steps=3, quiet=True)
    return workdir


def test_loading_bad_baseline_directories(tmp_path):
    with pytest.raises(ArSSRError, match="not a baseline model directory"):
        baseline_dir.load_baseline(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "arssr-jax-model/1"}')
    (tmp_path / "params.msgpack").write_bytes(b"")
    with pytest.raises(ArSSRError, match="not a baseline config"):
        baseline_dir.load_baseline(tmp_path)
    other = random_params(B.build_baseline("DCSRN", TINY["DCSRN"]))
    baseline_dir.save_baseline(tmp_path / "m", "DCSRN", 3.0, other, {"growth": 5, "num_units": 2})
    with pytest.raises(ArSSRError, match="do not fit"):
        baseline_dir.load_baseline(tmp_path / "m")
    with pytest.raises(ArSSRError, match="unknown baseline"):
        B.build_baseline("EDSR")
