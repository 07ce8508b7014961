"""The pieces that make the shipped model generalise: the tricubic-residual decoder, the
JAX cubic B-spline, the robust normalisation shared by training and inference, the
domain-randomising augmentations, and the held-out evaluation's masks and bands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.data import AugmentConfig, DataConfig
from arssr_jax.data.samples import make_patch, random_contrast, rician
from arssr_jax.data.reading import normalise_volume
from arssr_jax.errors import ArSSRError
from arssr_jax.evaluation.protocol import band_errors, band_index, head_mask
from arssr_jax.inference import upsample
from arssr_jax.models import receptive_radius
from arssr_jax.intensity import Normalisation
from arssr_jax.interpolation import tricubic
from arssr_jax.metrics import psnr, ssim
from arssr_jax.models import ModelConfig, build_model, init_params
from arssr_jax.spline import PREFILTER_RADIUS, local_range, prefilter, sample_cubic
from arssr_jax.training.state import set_output_layer
from arssr_jax.weights import load_model, save_model

from scripts import load_script  # noqa: E402  (tests/ is on sys.path: conftest.py)

TINY_RESIDUAL = ModelConfig(encoder="RDN", feature_dim=8, decoder_depth=4, decoder_width=16, padding="border",
                            encoder_options={"num_blocks": 1, "num_layers": 1, "num_features": 8, "growth": 8},
                            residual="tricubic")


# --------------------------------------------------------------------------- the cubic B-spline


@pytest.mark.parametrize("shape", [(10, 10, 10), (7, 12, 5), (5, 9, 20)])
def test_prefilter_equals_scipy_spline_filter(shape):
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    ours = np.asarray(prefilter(jnp.asarray(volume)))
    scipy_coefficients = ndimage.spline_filter(volume.astype(np.float64), 3, mode="reflect")
    np.testing.assert_allclose(ours, scipy_coefficients, atol=5e-6)


@pytest.mark.parametrize("shape", [(3, 4, 2), (1, 6, 3)])
def test_spline_interpolates_short_axes_exactly(shape):
    """On axes of 1-4 voxels scipy's reflect-mode prefilter is approximate (up to 5e-4 here);
    ours is exact there too: the spline passes through every voxel value."""
    volume = np.random.default_rng(12).random(shape).astype(np.float32)
    centres = np.stack(np.meshgrid(*[-1 + (2 * np.arange(n) + 1) / n for n in shape], indexing="ij"), -1)
    got = sample_cubic(prefilter(jnp.asarray(volume)), jnp.asarray(centres, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), volume, atol=1e-6)


@pytest.mark.parametrize("shape", [(10, 10, 10), (6, 11, 5)])
def test_sample_cubic_equals_map_coordinates(shape):
    rng = np.random.default_rng(1)
    volume = rng.random(shape).astype(np.float32)
    coords = rng.uniform(-1.1, 1.1, size=(400, 3))
    index = ((coords + 1) * np.asarray(shape) - 1) / 2
    expected = ndimage.map_coordinates(volume.astype(np.float64), index.T, order=3, mode="reflect")
    got = sample_cubic(prefilter(jnp.asarray(volume)), jnp.asarray(coords, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=5e-6)


def test_local_range_is_the_3x3x3_max_minus_min():
    volume = np.random.default_rng(2).random((6, 7, 5)).astype(np.float32)
    expected = (ndimage.maximum_filter(volume, size=3, mode="nearest")
                - ndimage.minimum_filter(volume, size=3, mode="nearest"))
    np.testing.assert_allclose(np.asarray(local_range(jnp.asarray(volume))), expected, atol=1e-7)


# --------------------------------------------------------------------------- the residual model


def _zero_output_model(config=TINY_RESIDUAL):
    model = build_model(config)
    return model, set_output_layer(init_params(model, jax.random.key(0)), 0.0)


@pytest.mark.parametrize("tile", [None, 5])
def test_residual_model_with_zero_last_layer_is_exactly_tricubic(tile):
    """The residual model starts from scipy's tricubic, tiled or not, at any target shape."""
    volume = np.random.default_rng(3).random((21, 17, 12)).astype(np.float32) * 300 + 40
    pair = _zero_output_model()
    out = upsample(volume, pair, shape=(50, 31, 29), tile=tile)
    expected = tricubic(volume, shape=(50, 31, 29))
    np.testing.assert_allclose(out, expected, atol=2e-5 * 300)


def test_residual_correction_is_bounded_by_the_local_contrast():
    """Whatever the decoder says, a value moves from tricubic by at most the local 3^3 range."""
    model = build_model(TINY_RESIDUAL)
    params = init_params(model, jax.random.key(4))
    params = set_output_layer(params, 100.0)  # a huge positive correction everywhere
    volume = np.random.default_rng(13).random((8, 9, 10)).astype(np.float32)
    out = upsample(volume, (model, params), scale=2, normalize=False)
    excess = out - tricubic(volume, scale=2)
    assert excess.min() >= -1e-5 and excess.max() <= (volume.max() - volume.min()) + 1e-5


def test_residual_correction_vanishes_where_the_input_is_flat():
    """Random (non-zero) decoder weights: a flat input stays exactly flat."""
    model = build_model(TINY_RESIDUAL)
    params = init_params(model, jax.random.key(4))
    volume = np.full((12, 12, 12), 7.0, np.float32)
    volume[:3] = 1.0  # one edge: a correction is allowed near it only
    out = upsample(volume, (model, params), scale=2, normalize=False)
    far = slice(12, None)  # HR voxels whose 4^3 LR neighbourhood is flat: tricubic (its own ringing) only
    np.testing.assert_allclose(out[far], tricubic(volume, scale=2)[far], atol=1e-5)
    assert np.abs(out[4:8] - tricubic(volume, scale=2)[4:8]).max() > 1e-4  # near the edge it corrects


def test_residual_receptive_radius_covers_the_prefilter():
    assert receptive_radius(TINY_RESIDUAL) == PREFILTER_RADIUS
    assert receptive_radius(TINY_RESIDUAL.replace(residual="none")) == 5


def test_residual_options_are_saved_and_restored(tmp_path):
    model, params = _zero_output_model()
    save_model(tmp_path / "m", TINY_RESIDUAL, params)
    loaded, loaded_params, config = load_model(tmp_path / "m")
    assert config == TINY_RESIDUAL and config.residual == "tricubic" and config.padding == "border"
    volume = np.random.default_rng(5).random((9, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(upsample(volume, (loaded, loaded_params), scale=2),
                                  upsample(volume, (model, params), scale=2))


def test_unknown_residual_mode_is_refused():
    with pytest.raises(ValueError, match="residual"):
        ModelConfig(residual="trilinear")


# --------------------------------------------------------------------------- normalisation


def test_normalisation_ignores_a_few_outliers():
    rng = np.random.default_rng(6)
    volume = rng.random((30, 30, 30)) * 100
    clean = Normalisation.of(volume)
    hot = volume.copy()
    hot[0, 0, 0] = 1e6
    hot[1, 1, 1] = -5e3
    spiked = Normalisation.of(hot)
    assert abs(spiked.low - clean.low) < 1 and abs(spiked.high - clean.high) < 1
    np.testing.assert_allclose(spiked.undo(spiked.apply(hot)), hot, rtol=1e-5, atol=1e-3)


def test_normalisation_falls_back_to_min_max_and_refuses_constant():
    sparse = np.zeros((20, 20, 20))
    sparse[0, 0, :3] = [1, 2, 3]  # 99.9 % zeros: both percentiles are 0
    assert Normalisation.of(sparse) == Normalisation(0.0, 3.0)
    with pytest.raises(ArSSRError, match="constant"):
        Normalisation.of(np.ones((4, 4, 4)))


def test_training_volumes_get_the_inference_normalisation():
    volume = np.random.default_rng(7).random((10, 10, 10)) * 50 + 3
    np.testing.assert_allclose(normalise_volume(volume, "v"), Normalisation.of(volume).apply(volume), rtol=1e-6)


def test_upsample_output_follows_the_input_scale():
    """A model that is exactly tricubic gives tricubic of the raw input, whatever its scale."""
    pair = _zero_output_model()
    volume = np.random.default_rng(8).random((10, 11, 12)).astype(np.float32)
    volume[0, 0, 0] = 50.0  # one hot voxel
    for factor in (1.0, 1000.0):
        out = upsample(volume * factor, pair, scale=2)
        np.testing.assert_allclose(out, tricubic(volume * factor, scale=2), rtol=1e-4, atol=1e-4 * factor)


# --------------------------------------------------------------------------- augmentations


def test_new_augmentations_are_deterministic_finite_and_change_the_patch():
    volume = normalise_volume(np.random.default_rng(9).random((30, 30, 30)), "v")
    base = dict(patch_size=24, lr_size=6, scale_min=2.0, scale_max=4.0, samples_per_step=64, batch_size=2,
                min_foreground=0.0)
    plain = DataConfig(**base)
    everything = DataConfig(**base, augment=AugmentConfig(contrast=1.0, rician_noise=0.05, bright_spots=1.0,
                                                          blur=1.0, mask_cut=1.0, clip_lr=1.0))
    hr0, lr0, _ = make_patch(volume, plain, np.random.default_rng(1))
    hr1, lr1, _ = make_patch(volume, everything, np.random.default_rng(1))
    hr2, lr2, _ = make_patch(volume, everything, np.random.default_rng(1))
    np.testing.assert_array_equal(hr1, hr2)
    np.testing.assert_array_equal(lr1, lr2)
    assert hr1.shape == hr0.shape and not np.allclose(hr1, hr0)
    assert np.all(np.isfinite(hr1)) and lr1.min() >= 0.0
    spots = DataConfig(**base, augment=AugmentConfig(bright_spots=1.0))
    hr3, _, _ = make_patch(volume, spots, np.random.default_rng(1))
    assert np.all(hr3 >= hr0 - 1e-6) and (hr3 - hr0).max() > 0.2  # blobs only add intensity
    holes = DataConfig(**base, augment=AugmentConfig(dark_spots=1.0))
    hr4, _, _ = make_patch(volume, holes, np.random.default_rng(1))
    # holes scale towards 0 (the percentile normalisation leaves a few voxels slightly below 0)
    assert np.all(np.abs(hr4) <= np.abs(hr0) + 1e-6) and (hr0 - hr4).max() > 0.2


def test_dark_spots_are_gaussian_holes_reaching_at_most_zero():
    from arssr_jax.data.samples import dark_spots

    hr = np.full((24, 24, 24), 0.8)
    out = dark_spots(hr, np.random.default_rng(3))
    factor = out / hr
    assert factor.min() >= 0.0 and factor.max() <= 1.0
    assert factor.min() < 0.5  # a hole of depth >= 0.5 has its centre inside the patch or near it
    assert np.mean(factor > 0.999) > 0.5  # small holes: most of the patch is untouched
    # Deterministic in the generator; none at all on a zero patch (holes scale, they do not subtract).
    np.testing.assert_array_equal(out, dark_spots(hr, np.random.default_rng(3)))
    assert np.all(dark_spots(np.zeros((8, 8, 8)), np.random.default_rng(3)) == 0.0)


def test_random_contrast_and_rician_noise():
    rng = np.random.default_rng(10)
    ramp = np.linspace(0, 1.2, 1000)
    mapped = random_contrast(ramp, rng)
    assert mapped.min() >= 0 and mapped.max() <= 1 and mapped[-1] == mapped[-50]  # constant past the knots
    noisy = rician(np.zeros(100_000), 0.1, rng)
    np.testing.assert_allclose(noisy.mean(), 0.1 * np.sqrt(np.pi / 2), rtol=0.02)  # Rayleigh mean


@pytest.mark.parametrize("field, value", [("contrast", 1.5), ("bright_spots", -0.1), ("dark_spots", 1.2),
                                          ("rician_noise", -1.0)])
def test_bad_augmentation_values_are_refused(field, value):
    with pytest.raises(ArSSRError, match=field):
        DataConfig(patch_size=24, lr_size=6, samples_per_step=64,
                   augment=AugmentConfig(**{field: value})).validate()


# --------------------------------------------------------------------------- evaluation pieces


def test_head_mask_fills_enclosed_dark_regions():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[4:16, 4:16, 4:16] = 1.0
    volume[8:12, 8:12, 8:12] = 0.0  # a dark ventricle inside
    mask = head_mask(volume)
    assert mask[10, 10, 10] and mask[5, 5, 5] and not mask[1, 1, 1]


def test_band_errors_by_ground_truth_intensity():
    gt = np.repeat(np.linspace(0, 1, 10), 100).reshape(10, 10, 10)
    bands = band_index(gt)
    assert bands.min() == 0 and bands.max() == 9
    error = band_errors(gt + 0.01 * (bands + 1), gt)
    np.testing.assert_allclose([error[f"mae_band_{k}"] for k in range(10)], 0.01 * np.arange(1, 11))


def test_masked_psnr_and_ssim():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(11)
    gt = rng.random((16, 16, 16))
    pred = gt + 0.05 * rng.random(gt.shape)
    mask = np.zeros(gt.shape, bool)
    mask[4:12, 4:12, 4:12] = True
    mse = np.mean((pred - gt)[mask] ** 2)
    assert psnr(pred, gt, mask=mask) == pytest.approx(10 * np.log10((gt.max() - gt.min()) ** 2 / mse))
    _, full = structural_similarity(pred, gt, data_range=gt.max() - gt.min(), full=True)
    assert ssim(pred, gt, mask=mask) == pytest.approx(full[mask].mean(), rel=1e-9)


# --------------------------------------------------------------------------- the shipped model


def _min_max(data) -> np.ndarray:
    data = np.asarray(data, np.float64)
    return ((data - data.min()) / (data.max() - data.min())).astype(np.float32)


def _shipped_and_tricubic(hr, scale):
    """LR simulated from ``hr`` (clipped at 0, as a magnitude image), brought back to hr's grid
    by the shipped model as a user would (default normalisation) and by tricubic."""
    from arssr_jax.evaluation.simulate import simulate_lr

    lr = np.maximum(simulate_lr(hr, scale), 0.0)
    return upsample(lr, shape=hr.shape), tricubic(lr, shape=hr.shape)


def _assert_beats_tricubic(ours, cubic, hr, min_gain_db):
    head = head_mask(hr)
    assert psnr(ours, hr) > psnr(cubic, hr) + min_gain_db
    assert ssim(ours, hr) > ssim(cubic, hr)
    assert psnr(ours, hr, mask=head) > psnr(cubic, hr, mask=head) + min_gain_db
    assert ssim(ours, hr, mask=head) > ssim(cubic, hr, mask=head)
    ours_bands, cubic_bands = band_errors(ours, hr), band_errors(cubic, hr)
    for band, error in ours_bands.items():
        if not np.isnan(error):  # nothing erased: no band over 10 % worse than tricubic
            assert error <= 1.1 * cubic_bands[band], band


def test_shipped_model_beats_tricubic_on_a_real_scan_it_never_saw():
    """nibabel's anatomical.nii (a real 2 mm T1, not a training source): simulate 4 mm (LR
    clipped at 0, as a magnitude image), bring it back to 2 mm with the shipped model as a
    user would (default normalisation), and compare with tricubic from the same LR."""
    import nibabel

    from arssr_jax.demo import demo_input

    hr = _min_max(nibabel.load(demo_input()).get_fdata())
    ours, cubic = _shipped_and_tricubic(hr, 2.0)
    _assert_beats_tricubic(ours, cubic, hr, min_gain_db=0.1)
    dark = hr < 0.1  # the darkest voxels are not pushed towards 0 (the old model erased them)
    assert float(np.mean(ours[dark] - hr[dark])) > float(np.mean(cubic[dark] - hr[dark])) - 0.01


def test_shipped_model_beats_tricubic_on_another_contrast_it_never_saw():
    """nibabel's example4d.nii.gz (a real T2*-weighted EPI, brain-masked: CSF bright, white
    matter dark, the reverse of the T1 training subject), 2 mm simulated at 6 mm and brought back."""
    from pathlib import Path

    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    hr = _min_max(nibabel.load(path).dataobj[..., 0])
    ours, cubic = _shipped_and_tricubic(hr, 3.0)
    # At x3 every band is within the 10 % target (the model card's x3.5 / x4 are not; here the
    # worst is the third tenth: 1.06).
    _assert_beats_tricubic(ours, cubic, hr, min_gain_db=0.3)


def test_consistency_step_keeps_the_shipped_model_above_tricubic_on_an_lr_that_averages():
    """anatomical.nii at x3 with an anti-aliased LR (blurred before sampling, as an acquisition
    averages over its voxels; never seen in training): the network alone falls below tricubic's
    SSIM, the shipped model with its data-consistency step stays above it."""
    import nibabel

    from arssr_jax.demo import demo_input
    from arssr_jax.evaluation.simulate import simulate_lr

    hr = _min_max(nibabel.load(demo_input()).get_fdata())
    lr = np.maximum(simulate_lr(hr, 3.0, antialias=True), 0.0)
    cubic, network, shipped = (tricubic(lr, shape=hr.shape), upsample(lr, shape=hr.shape, consistency=0.0),
                               upsample(lr, shape=hr.shape))
    assert ssim(network, hr) < ssim(cubic, hr) < ssim(shipped, hr)
    assert psnr(shipped, hr) > psnr(cubic, hr)


def test_new_data_options_round_trip_through_the_saved_training_config():
    import json

    from arssr_jax.training.config import TrainConfig

    config = TrainConfig(model=TINY_RESIDUAL, data=DataConfig(
        augment=AugmentConfig(contrast=0.4, rician_noise=0.04, bright_spots=0.2, dark_spots=0.3, clip_lr=0.5)),
        init_output=0.0, loss="l2", loss_balance=0.5)
    again = TrainConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    assert again.model.residual == "tricubic" and again.data.augment.bright_spots == 0.2
    assert again.data.augment.dark_spots == 0.3 and again.loss_balance == 0.5
    # a saved config from before the option trains exactly as before
    old = json.loads(config.to_json())
    del old["loss_balance"], old["data"]["augment"]["dark_spots"]
    assert TrainConfig.from_dict(old).loss_balance == 0.0 and TrainConfig.from_dict(old).data.augment.dark_spots == 0.0
    for bad in (-0.1, 5.0, "0.5"):
        with pytest.raises(ArSSRError, match="loss_balance"):
            config.replace(loss_balance=bad).validate()


def _numpy_balance_weights(v, exponent):
    """Independent reference: tenths of the patch's range, weight (bin count) ** -exponent, mean 1."""
    bins = np.clip(((v - v.min()) / np.ptp(v) * 10).astype(int), 0, 9)
    w = np.bincount(bins, minlength=10)[bins] ** -float(exponent)
    return w / w.mean()


def test_intensity_balance_weights_give_every_occupied_tenth_the_same_share_at_exponent_one():
    from arssr_jax.training.step import intensity_balance_weights

    rng = np.random.default_rng(21)
    # patch 0: 90 targets at 0.1, 10 at 0.9; patch 1: constant; patch 2: random
    values = np.stack([np.r_[np.full(90, 0.1), np.full(10, 0.9)], np.full(100, 0.4), rng.random(100)])[..., None]
    w = np.asarray(intensity_balance_weights(jnp.asarray(values, jnp.float32), 1.0))
    np.testing.assert_allclose(w.mean(axis=1), 1.0, rtol=1e-6)  # mean 1 per patch
    np.testing.assert_allclose([w[0, :90].sum(), w[0, 90:].sum()], [50.0, 50.0], rtol=1e-5)
    np.testing.assert_allclose(w[1], 1.0, rtol=1e-6)  # one bin: nothing to balance
    np.testing.assert_allclose(w[2, :, 0], _numpy_balance_weights(values[2, :, 0], 1.0), rtol=1e-5)
    half = np.asarray(intensity_balance_weights(jnp.asarray(values, jnp.float32), 0.5))
    np.testing.assert_allclose(half[0, 0, 0] / half[0, -1, 0], np.sqrt(10 / 90), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(intensity_balance_weights(jnp.asarray(values, jnp.float32), 0.0)), 1.0,
                               rtol=1e-6)


def _random_batch(seed, k, values=None):
    """Two random LR patches (6^3), K random coordinates each, and their targets."""
    rng = np.random.default_rng(seed)
    values = rng.random((2, k, 1)) if values is None else values
    return {"lr": jnp.asarray(rng.random((2, 6, 6, 6, 1)), jnp.float32),
            "coords": jnp.asarray(rng.uniform(-1, 1, (2, k, 3)), jnp.float32),
            "values": jnp.asarray(values, jnp.float32)}


def test_balanced_l2_loss_is_the_weighted_mean_squared_error():
    from arssr_jax.models import predict
    from arssr_jax.training.step import arssr_loss

    model, params = _zero_output_model()
    rng = np.random.default_rng(22)
    values = np.where(rng.random((2, 40, 1)) < 0.8, 0.05, 0.7) + 0.01 * rng.random((2, 40, 1))
    batch = _random_batch(22, 40, values)
    error = (np.asarray(predict(model, params, batch["lr"], batch["coords"])) - values) ** 2
    weights = np.stack([_numpy_balance_weights(values[n, :, 0], 0.5) for n in range(2)])[..., None]
    want = np.mean(error * weights)
    assert float(arssr_loss(model, "l2", 0.5)(params, batch)) == pytest.approx(want, rel=1e-5)
    assert float(arssr_loss(model, "l2", 0.5)(params, batch)) != pytest.approx(np.mean(error), rel=1e-3)


def test_blur_smooths_the_hr_patch():
    volume = normalise_volume(np.random.default_rng(17).random((30, 30, 30)), "v")
    base = dict(patch_size=24, lr_size=6, scale_min=3.0, scale_max=3.0, samples_per_step=64, min_foreground=0.0)
    sharp, _, _ = make_patch(volume, DataConfig(**base), np.random.default_rng(2))
    smooth, _, _ = make_patch(volume, DataConfig(**base, augment=AugmentConfig(blur=1.0)), np.random.default_rng(2))
    assert np.std(np.diff(smooth, axis=0)) < 0.7 * np.std(np.diff(sharp, axis=0))
    assert abs(smooth.mean() - sharp.mean()) < 0.02


def test_mask_cut_zeroes_one_side_of_a_curved_surface():
    from arssr_jax.data.samples import mask_cut

    hr = np.random.default_rng(14).random((20, 20, 20)) + 0.5
    cut = mask_cut(hr, np.random.default_rng(15))
    kept = cut > 0
    assert 0.15 < kept.mean() < 0.85
    np.testing.assert_array_equal(cut[kept], hr[kept])


def test_mask_ramp_fades_the_tissue_towards_the_cut_and_keeps_it_further_in():
    from scipy import ndimage

    from arssr_jax.data.samples import mask_cut

    hr = np.ones((30, 30, 30))
    plain = mask_cut(hr, np.random.default_rng(15))
    ramped = mask_cut(hr, np.random.default_rng(15), ramp=True)
    np.testing.assert_array_equal(ramped > 0, plain > 0)  # the same surface
    distance = ndimage.distance_transform_edt(plain > 0)
    rim, deep = ramped[distance == 1], ramped[distance > 7.5]
    assert rim.size and deep.size
    assert rim.max() < 1.0 and np.allclose(deep, 1.0)  # widths are at most 6 voxels
    # monotone in the distance to the cut
    means = [ramped[(distance > d - 0.5) & (distance <= d + 0.5)].mean() for d in range(1, 8)]
    assert np.all(np.diff(means) >= -1e-12)


def test_l2_training_loss_is_the_mean_squared_error():
    from arssr_jax.models import predict
    from arssr_jax.training.step import arssr_loss

    model, params = _zero_output_model()
    batch = _random_batch(16, 30)
    pred = np.asarray(predict(model, params, batch["lr"], batch["coords"]))
    error = pred - np.asarray(batch["values"])
    assert float(arssr_loss(model, "l2")(params, batch)) == pytest.approx(np.mean(error ** 2), rel=1e-5)
    assert float(arssr_loss(model, "l1")(params, batch)) == pytest.approx(np.mean(np.abs(error)), rel=1e-5)


def _prepare_data_module():
    return load_script("train/prepare_data.py")


def test_block_average_is_a_coarser_acquisition_of_the_same_world():
    """A linear field in world coordinates, block-averaged, equals that field at the new
    voxels' world centres (closed form: the mean of a linear function over a block is its
    value at the block's centre); an incomplete last block is dropped."""
    import nibabel as nib
    prepare = _prepare_data_module()
    affine = np.array([[0.0, -1.2, 0, 30], [0.9, 0, 0, -20], [0, 0, 1.1, 5], [0, 0, 0, 1]])
    index = np.indices((9, 8, 7)).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:]
    field = (np.array([0.5, -2.0, 3.0]) @ world + 7.0).reshape(9, 8, 7)
    coarse = prepare.block_average(nib.Nifti1Image(field.astype(np.float32), affine), 2)
    assert coarse.shape == (4, 4, 3)
    index = np.indices(coarse.shape).reshape(3, -1)
    world = coarse.affine[:3, :3] @ index + coarse.affine[:3, 3:]
    expected = (np.array([0.5, -2.0, 3.0]) @ world + 7.0).reshape(coarse.shape)
    np.testing.assert_allclose(np.asarray(coarse.dataobj), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.abs(coarse.affine[:3, :3]).sum(0), [1.8, 2.4, 2.2])


# --------------------------------------------------------------------------- the SSIM term on cubes


def test_cube_samples_are_whole_cubes_of_neighbouring_voxels_with_their_values():
    from arssr_jax.coords import index_to_normalised
    from arssr_jax.data.samples import sample_cubes

    hr = np.random.default_rng(30).random((12, 9, 10)).astype(np.float32)
    coords, values = sample_cubes(hr, 5 * 27, 3, np.random.default_rng(31))
    assert coords.shape == (135, 3) and values.shape == (135, 1)
    # back to voxel indices: every run of 27 is one 3x3x3 cube, in C order, with hr's values
    n = np.asarray(hr.shape, np.float64)
    grid = [index_to_normalised(np.arange(m, dtype=np.float64), m) for m in hr.shape]
    index = np.stack([np.abs(coords[:, a, None] - grid[a][None]).argmin(1) for a in range(3)], -1)
    np.testing.assert_allclose(index_to_normalised(index.astype(np.float64), n), coords, atol=1e-6)
    np.testing.assert_array_equal(values[:, 0], hr[tuple(index.T)])
    cubes = index.reshape(5, 27, 3)
    offsets = np.stack(np.unravel_index(np.arange(27), (3, 3, 3)), -1)
    np.testing.assert_array_equal(cubes - cubes[:, :1], np.broadcast_to(offsets, cubes.shape))
    assert len({tuple(c[0]) for c in cubes}) == 5  # distinct cubes
    again = sample_cubes(hr, 5 * 27, 3, np.random.default_rng(31))
    np.testing.assert_array_equal(again[0], coords)


def test_point_examples_draw_cubes_when_asked_and_bad_cube_settings_are_refused():
    from arssr_jax.data import make_sample

    volume = normalise_volume(np.random.default_rng(32).random((30, 30, 30)), "v")
    config = DataConfig(patch_size=24, lr_size=6, scale_min=2.0, scale_max=3.0, samples_per_step=8 * 27,
                        sample_cube=3, min_foreground=0.0).validate()
    example = make_sample(volume, config, np.random.default_rng(3))
    spacing = np.abs(np.diff(example["coords"][:27], axis=0)).max()  # neighbours within a cube
    assert example["coords"].shape == (216, 3) and spacing < 2.5 * 2 / 12
    with pytest.raises(ArSSRError, match="whole number"):
        DataConfig(patch_size=24, lr_size=6, samples_per_step=100, sample_cube=3).validate()
    with pytest.raises(ArSSRError, match="whole number"):
        DataConfig(patch_size=24, lr_size=6, samples_per_step=216, sample_cube=3, cube_fraction=0.3).validate()
    with pytest.raises(ArSSRError, match="cube_fraction"):
        DataConfig(patch_size=24, lr_size=6, samples_per_step=216, sample_cube=3, cube_fraction=0.0).validate()
    with pytest.raises(ArSSRError, match="sample_cube"):
        DataConfig(patch_size=24, lr_size=6, samples_per_step=100, sample_cube=13).validate()


def test_a_cube_fraction_draws_the_first_targets_in_cubes_and_the_rest_scattered():
    from arssr_jax.data import make_sample

    volume = normalise_volume(np.random.default_rng(35).random((30, 30, 30)), "v")
    config = DataConfig(patch_size=24, lr_size=6, scale_min=2.0, scale_max=2.0, samples_per_step=8 * 27,
                        sample_cube=3, cube_fraction=0.5, min_foreground=0.0, seed=1).validate()
    assert config.cube_targets == 4 * 27
    example = make_sample(volume, config, np.random.default_rng(4))
    step = 2.0 / 12  # one HR voxel of the 12^3 patch in normalised coordinates
    index = np.rint((np.asarray(example["coords"], np.float64) + 1.0) / step - 0.5).astype(int)
    assert example["coords"].shape == (216, 3) and index.min() >= 0 and index.max() < 12
    cubes = index[:108].reshape(4, 27, 3)
    offsets = np.stack(np.unravel_index(np.arange(27), (3, 3, 3)), -1)
    np.testing.assert_array_equal(cubes - cubes[:, :1], np.broadcast_to(offsets, cubes.shape))
    scattered = index[108:]
    assert len({tuple(i) for i in scattered}) == 108  # distinct voxels
    # scattered, not cubes: consecutive draws are rarely neighbours
    assert np.mean(np.abs(np.diff(scattered, axis=0)).max(1) <= 1) < 0.2


def test_cube_ssim_is_the_evaluation_ssim_with_the_cube_as_its_window():
    from arssr_jax.training.step import cube_ssim

    rng = np.random.default_rng(33)
    truth = rng.random((2, 3, 5, 5, 5))  # 2 patches x 3 cubes of 5^3
    pred = 0.7 * truth + 0.2 * rng.random(truth.shape)
    got = np.asarray(cube_ssim(jnp.asarray(pred.reshape(2, 375, 1)), jnp.asarray(truth.reshape(2, 375, 1)), 125))
    # the metric's windowed SSIM of a 5^3 image with a 5-voxel window is that one window's SSIM
    want = [[ssim(pred[n, c], truth[n, c], data_range=1.0, win_size=5) for c in range(3)] for n in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cube_ssim(jnp.asarray(truth.reshape(2, 375, 1)),
                                                    jnp.asarray(truth.reshape(2, 375, 1)), 125)), 1.0, rtol=1e-6)


def test_ssim_term_adds_its_weight_times_one_minus_the_mean_cube_ssim():
    from arssr_jax.models import predict
    from arssr_jax.training.step import arssr_loss, cube_ssim

    model, params = _zero_output_model()
    batch = _random_batch(34, 54)
    pred = predict(model, params, batch["lr"], batch["coords"])
    penalty = float(np.mean(1.0 - np.asarray(cube_ssim(pred, batch["values"], 27))))
    plain = float(arssr_loss(model, "l2", 0.5)(params, batch))
    with_ssim = float(arssr_loss(model, "l2", 0.5, ssim_weight=0.3, cube=3)(params, batch))
    assert penalty > 0.1 and with_ssim == pytest.approx(plain + 0.3 * penalty, rel=1e-5)
    # only the first cube_targets targets are cubes: the term is over those alone
    first = float(np.mean(1.0 - np.asarray(cube_ssim(pred[:, :27], batch["values"][:, :27], 27))))
    partial = float(arssr_loss(model, "l2", 0.5, ssim_weight=0.3, cube=3, cube_targets=27)(params, batch))
    assert first != pytest.approx(penalty, rel=1e-3) and partial == pytest.approx(plain + 0.3 * first, rel=1e-5)


def test_ssim_options_round_trip_and_need_cubes():
    import json

    from arssr_jax.training.config import TrainConfig
    from arssr_jax.training.tasks import make_task

    data = DataConfig(patch_size=24, lr_size=6, samples_per_step=8 * 27, sample_cube=3, cube_fraction=0.25,
                      min_foreground=0.0)
    config = TrainConfig(model=TINY_RESIDUAL, data=data, init_output=0.0, loss="l2", ssim_weight=0.05).validate()
    again = TrainConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.ssim_weight == 0.05 and again.data.sample_cube == 3
    assert again.data.cube_fraction == 0.25
    task = make_task(again)
    assert task.ssim_weight == 0.05 and task.cube == 3 and task.cube_targets == 2 * 27
    old = json.loads(config.to_json())
    del old["ssim_weight"], old["data"]["sample_cube"], old["data"]["cube_fraction"]
    assert TrainConfig.from_dict(old).ssim_weight == 0.0 and TrainConfig.from_dict(old).data.sample_cube == 1
    assert TrainConfig.from_dict(old).data.cube_fraction == 1.0
    with pytest.raises(ArSSRError, match="sample_cube >= 2"):
        config.replace(data=DataConfig(patch_size=24, lr_size=6, samples_per_step=200)).validate()
    with pytest.raises(ArSSRError, match="ssim_weight"):
        config.replace(ssim_weight=-1.0).validate()
