"""Adapting a model to one scan (arssr_jax.adapt) and the slice profiles it degrades with."""

import math
import os

import jax
import nibabel
import numpy as np
import pytest

from arssr_jax.adapt import AdaptConfig, _Anisotropic, _Isotropic, adapt, scan_mode
from arssr_jax.coords import centre_positions
from arssr_jax.slice_profile import apply_profile, profile_margin, profile_matrix, thick_slices
from arssr_jax.errors import ArSSRError

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")

# The shipped model (a compact RDN, tricubic residual): adaptation starts from its prior. One
# compilation serves every test (arssr_jax.adapt caches the step per module; the learning
# rate lives in the optimiser state); small pairs keep each run to seconds.
FAST = AdaptConfig(steps=16, learning_rate=3e-4, batch_size=2, lr_patch=4, inplane_patch=12, samples=384,
                   validation_pairs=6, checkpoints=4)


@pytest.fixture(scope="module")
def shipped():
    from arssr_jax.weights import load_model

    module, params, _ = load_model(None)
    return module, params


@pytest.fixture(scope="module")
def thick():
    """nibabel's anatomical.nii (2 mm) made thick: each slice along k the mean of three, 2 x 2 x 6 mm."""
    data = np.asarray(nibabel.load(ANATOMICAL).get_fdata(), np.float32)
    data = (data - data.min()) / (data.max() - data.min())
    return thick_slices(data[:, :, :24], 2, 3)


def same_tree(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# --------------------------------------------------------------------------- slice profiles


def test_box_profile_is_the_block_mean_and_centred():
    hr = np.random.default_rng(0).random((5, 12, 3))
    lr = apply_profile(hr, 1, 3, 4.0)
    np.testing.assert_allclose(lr, hr.reshape(5, 3, 4, 3).mean(axis=2), rtol=1e-6)
    w = profile_matrix(3, 12, 4.0)
    # each slice's centre of mass is the LR voxel centre of the [-1, 1] cube convention
    np.testing.assert_allclose(w @ np.arange(12.0), centre_positions(3, 12), atol=1e-12)
    assert thick_slices(hr, 1, 4).shape == (5, 3, 3)


def test_box_profile_non_integer_ratio_gap_and_gaussian():
    w = profile_matrix(2, 5, 2.5)
    np.testing.assert_allclose(w, [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]], atol=1e-12)
    gap = profile_matrix(2, 8, 4.0, "box", width=2.0)  # 2 mm slices every 4 mm: the middle two voxels
    np.testing.assert_allclose(gap, [[0, 0.5, 0.5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.5, 0.5, 0]], atol=1e-12)
    margin = profile_margin("gaussian", 4.0, 4.0)
    g = profile_matrix(2, 8 + 2 * margin, 4.0, "gaussian", width=4.0, offset=margin)
    np.testing.assert_allclose(g.sum(axis=1), 1.0)
    np.testing.assert_allclose(g[0], g[1][::-1], atol=1e-12)  # symmetric about the stack's middle
    np.testing.assert_allclose(g @ np.arange(g.shape[1]) - margin, [1.5, 5.5], atol=2e-3)  # tails cut at 3 sigma
    with pytest.raises(ValueError):
        profile_matrix(2, 8, 4.0, "triangle")


# --------------------------------------------------------------------------- the mode


def test_scan_mode_tells_the_thick_axis():
    assert scan_mode((1, 1, 4)) == ("anisotropic", 2)
    assert scan_mode((3, 0.9, 1)) == ("anisotropic", 0)
    assert scan_mode((2, 2, 2.2)) == ("isotropic", None)
    assert scan_mode((1, 3, 3.5), scales=(1, 1, 3.5)) == ("anisotropic", 2)
    for spacing, scales in (((1, 3, 3.5), None), ((1, 3, 3.5), (1, 3, 3)), ((1, 3, 4), (1, 1, 1))):
        with pytest.raises(ArSSRError, match="cannot tell the thick axis") as info:
            scan_mode(spacing, scales)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes, word", [
    (dict(steps=0), "steps"), (dict(thickness=-1.0), "thickness"), (dict(learning_rate=0.0), "learning_rate"),
    (dict(profile="triangle"), "profile"), (dict(fwhm=float("nan")), "fwhm"), (dict(batch_size=1.5), "batch_size"),
    (dict(time_budget=0), "time_budget"), (dict(isotropic="yes"), "isotropic"),
])
def test_bad_config_values_raise_one_line(changes, word):
    with pytest.raises(ArSSRError, match=word) as info:
        AdaptConfig(**changes)
    assert "\n" not in str(info.value)


def test_adapt_refuses_an_undecidable_or_tiny_scan(shipped, thick):
    module, params = shipped
    with pytest.raises(ArSSRError, match="cannot tell the thick axis"):
        adapt(module, params, thick, (2, 6, 6), (1, 3, 3), FAST)
    with pytest.raises(ArSSRError, match="too small"):
        adapt(module, params, thick[:4, :4, :2], (2, 2, 6), (1, 1, 3), FAST)
    with pytest.raises(ArSSRError, match="voxel size"):
        adapt(module, params, thick, (2, -2, 6), (1, 1, 3), FAST)


# --------------------------------------------------------------------------- pairs


def test_anisotropic_pairs_put_the_slices_where_the_thick_axis_is(thick):
    """Every LR voxel of a pair is the mean of the targets inside it: the coordinates, flips and
    the permutation agree with the LR (all targets of the pair drawn)."""
    config = FAST.replace(lr_patch=3, inplane_patch=5)
    source = _Anisotropic(thick, (2.0, 2.0, 6.0), 2, config)
    assert source.volume.shape == (33, 41, 24)  # the thick axis brought to the in-plane spacing
    layout = source.layout
    rng = np.random.default_rng(0)
    for _ in range(6):
        count = layout.n * 3 * layout.p * layout.q
        lr, coords, values = source.pair(layout.train, rng, count)
        lr = lr[..., 0]
        assert lr.shape == (layout.p, layout.q, layout.n)  # the degraded axis is axis 2
        index = np.floor((coords.astype(np.float64) + 1.0) / 2.0 * np.asarray(lr.shape)).astype(int)
        sums = np.zeros(lr.shape)
        counts = np.zeros(lr.shape)
        np.add.at(sums, tuple(index.T), values[:, 0])
        np.add.at(counts, tuple(index.T), 1)
        assert np.all(counts == 3)  # three HR voxels per slice, one each elsewhere
        np.testing.assert_allclose(sums / counts, lr, atol=1e-5)


def test_isotropic_pairs_are_voxel_centred(thick):
    volume = np.asarray(nibabel.load(ANATOMICAL).get_fdata(), np.float32)
    volume = volume / volume.max()
    source = _Isotropic(volume, 2.0, FAST)
    rng = np.random.default_rng(1)
    n = source.layout.n
    lr, coords, values = source.pair(source.layout.train, rng, (2 * n) ** 3, scale=2.0, box=True)
    index = np.floor((coords.astype(np.float64) + 1.0) / 2.0 * n).astype(int)
    sums = np.zeros((n, n, n))
    np.add.at(sums, tuple(index.T), values[:, 0])
    np.testing.assert_allclose(sums / 8.0, lr[..., 0], atol=1e-5)


# --------------------------------------------------------------------------- adaptation


def test_adaptation_improves_the_scans_held_out_pairs_deterministically(shipped, thick):
    module, params = shipped
    first = adapt(module, params, thick, (2.0, 2.0, 6.0), (1, 1, 3), FAST)
    assert first.mode == "anisotropic" and first.thick_axis == 2 and math.isclose(first.ratio, 3.0)
    assert not first.kept_start, first.message
    assert first.adapted_score["psnr"] > first.start_score["psnr"] + 0.05, first.history
    assert first.adapted_score["l1"] < first.start_score["l1"]
    assert first.steps_run == FAST.steps and len(first.losses) == FAST.steps
    assert [h[0] for h in first.history] == [0, 4, 8, 12, 16]
    assert "held-out pairs" in first.message and "\n" not in first.message
    again = adapt(module, params, thick, (2.0, 2.0, 6.0), (1, 1, 3), FAST)
    assert same_tree(first.params, again.params)  # same seed: bitwise the same parameters
    assert first.history == again.history
    other = adapt(module, params, thick, (2.0, 2.0, 6.0), (1, 1, 3), FAST.replace(seed=1, steps=4, checkpoints=1))
    assert not same_tree(first.params, other.params)


def test_a_step_that_cannot_help_keeps_the_start_model(shipped, thick):
    module, params = shipped
    result = adapt(module, params, thick, (2.0, 2.0, 6.0), (1, 1, 3),
                   FAST.replace(steps=4, learning_rate=0.5, checkpoints=2))  # a step size that wrecks it
    assert result.kept_start and result.best_step == 0
    assert result.params is params
    assert result.adapted_score == result.start_score
    assert not any(psnr >= result.start_score["psnr"] for _, psnr, _ in result.history[1:])  # worse or NaN
    assert "keeping the start model" in result.message and "\n" not in result.message


def test_time_budget_stops_early(shipped, thick):
    module, params = shipped
    result = adapt(module, params, thick, (2.0, 2.0, 6.0), (1, 1, 3),
                   FAST.replace(steps=10_000, time_budget=1e-3))
    assert result.steps_run == 1 and [h[0] for h in result.history] == [0, 1]


def test_isotropic_scans_keep_the_start_model_unless_asked(shipped):
    from arssr_jax.adapt import Adaptation
    from arssr_jax.inference import Upsampler

    module, params = shipped
    volume = np.asarray(nibabel.load(ANATOMICAL).get_fdata(), np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    left = adapt(module, params, volume, (2.0, 2.0, 2.0), (2, 2, 2), FAST)
    assert left.mode == "isotropic" and left.kept_start and left.steps_run == 0 and left.params is params
    assert "isotropic scan: not adapted" in left.message and "\n" not in left.message
    messages = []
    out = Upsampler(shipped)(volume, scale=2, adapt=Adaptation(FAST, log=messages.append))
    np.testing.assert_array_equal(out, Upsampler(shipped)(volume, scale=2))
    assert messages == [left.message]
    forced = adapt(module, params, volume, (2.0, 2.0, 2.0), (2, 2, 2), FAST.replace(steps=4, checkpoints=2, isotropic=True))
    assert forced.mode == "isotropic" and forced.thick_axis is None and forced.ratio == 2.0
    assert [h[0] for h in forced.history] == [0, 2, 4] and forced.steps_run == 4


# --------------------------------------------------------------------------- in the pipeline and the CLI


def test_evaluation_adapted_row_adapts_each_input_as_upsample_does(shipped):
    from arssr_jax import upsample
    from arssr_jax.adapt import Adaptation
    from arssr_jax.evaluation.runners import arssr_runner

    volume = np.asarray(nibabel.load(ANATOMICAL).get_fdata(), np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    config = FAST.replace(steps=4, checkpoints=2, isotropic=True)
    runner = arssr_runner(shipped, adapt=config)
    assert runner.label.endswith(" adapted") and runner.info["adapt"]["steps"] == 4
    shape = tuple(2 * n for n in volume.shape)
    adaptation = Adaptation(config)
    expected = upsample(volume, shipped, shape=shape, adapt=adaptation)
    assert adaptation.results[0].mode == "isotropic" and not adaptation.results[0].kept_start
    np.testing.assert_array_equal(runner(volume, shape), expected)
    plain = arssr_runner(shipped)(volume, shape)
    assert np.abs(plain - expected).max() > 1e-4  # the adapted row is not the plain one
    # a scan too small to cut pairs from: the row decodes it with the start model, and says so
    tiny = volume[:6, :6, :6]
    np.testing.assert_array_equal(runner(tiny, (12, 12, 12)), arssr_runner(shipped)(tiny, (12, 12, 12)))
    assert [why for _, why in runner.info["skipped"]] and "too small" in runner.info["skipped"][0][1]


def test_adaptation_in_the_pipeline_decodes_with_the_adapted_model_and_the_slice_profile(shipped, thick):
    from arssr_jax.adapt import Adaptation
    from arssr_jax.inference import Upsampler

    volume = thick * 900 + 100  # any intensity scale: normalised for the network as upsample does
    messages = []
    adaptation = Adaptation(FAST, log=messages.append)
    out = Upsampler(shipped)(volume, scale=(1, 1, 3), lr_voxel_size=(2, 2, 6), adapt=adaptation)
    [result] = adaptation.results
    assert result.mode == "anisotropic" and messages == [result.message] and not result.kept_start
    expected = Upsampler((shipped[0], result.params), slice_profile="box")(volume, scale=(1, 1, 3),
                                                                          lr_voxel_size=(2, 2, 6))
    np.testing.assert_array_equal(out, expected)
    # the slices of the output, measured with the box, are the input's
    assert np.abs(apply_profile(out, 2, volume.shape[2], 3.0) - volume).max() < 1e-2 * np.ptp(volume)


def test_cli_adapts_saves_a_model_that_loads_and_refuses_bad_values_in_one_line(tmp_path, capsys):
    from arssr_jax.cli import main
    from arssr_jax.weights import load_model, load_options

    data = np.asarray(nibabel.load(ANATOMICAL).get_fdata(), np.float32)[:, :, :24]
    lr = thick_slices(data, 2, 3)
    nibabel.save(nibabel.Nifti1Image(lr, np.diag([2.0, 2.0, 6.0, 1.0])), tmp_path / "thick.nii.gz")
    out, saved = tmp_path / "sr.nii.gz", tmp_path / "adapted"
    assert main(["upsample", str(tmp_path / "thick.nii.gz"), str(out), "--scale", "1", "1", "3", "--adapt",
                 "--adapt-steps", "2", "--save-adapted", str(saved)]) == 0
    said = capsys.readouterr().out
    assert "held-out pairs" in said and f"wrote {out}" in said
    image = nibabel.load(out)
    assert image.shape == (33, 41, 24) and np.allclose(image.header.get_zooms(), (2, 2, 2))
    assert load_model(saved)[2] == load_model(None)[2] and load_options(saved) == load_options(None)
    for argv, words in ((["--adapt", "--adapt-steps", "0"], "steps"), (["--slice-thickness", "-1"], "slice-thickness"),
                        (["--adapt-seconds", "5"], "add --adapt"), (["--save-adapted", str(tmp_path / "m")], "add --adapt"),
                        (["--adapt-isotropic"], "add --adapt")):
        bad = tmp_path / "bad.nii.gz"
        assert main(["upsample", str(tmp_path / "thick.nii.gz"), str(bad), "--scale", "1", "1", "3", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and not bad.exists(), err
