"""Tests of the training input pipeline (arssr_jax.data). Small sizes: runs in seconds."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.coords import axis_centres, make_grid, normalised_to_index
from arssr_jax.data import (
    AugmentConfig,
    DataConfig,
    degrade_centred,
    degrade_reference,
    draw_scales,
    load_volumes,
    make_patch,
    make_sample,
    make_train_iterator,
    validation_samples,
)
from arssr_jax.data.pipeline import volume_for_sample
from arssr_jax.data.samples import sample_coords
from arssr_jax.errors import ArSSRError

# Small geometry: lr 6, scales [2, 4] -> HR 12..24 voxels, patch 24, K <= 12^3.
SMALL = dict(patch_size=24, lr_size=6, samples_per_step=500, batch_size=4,
             min_foreground=0.0)


def smooth_volume(shape=(30, 32, 28), seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)


@pytest.fixture(scope="module")
def volumes():
    return load_volumes([smooth_volume(seed=0), smooth_volume((26, 40, 30), seed=1)])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def iterator(volumes, process_index=0, process_count=1, make_example=make_sample, **overrides):
    config = DataConfig(**{**SMALL, **overrides})
    return make_train_iterator(config, volumes, make_example=make_example, process_index=process_index,
                               process_count=process_count)


# -- samples -----------------------------------------------------------------

@pytest.mark.parametrize("degrade", ["centred", "reference"])
@pytest.mark.parametrize("anisotropic", [False, True])
def test_sample_shapes_coords_values(volumes, degrade, anisotropic):
    config = DataConfig(**SMALL, degrade=degrade, anisotropic=anisotropic)
    vol = volumes.arrays[0]
    sample = make_sample(vol, config, np.random.default_rng(3))
    assert sample["lr"].shape == (6, 6, 6, 1) and sample["lr"].dtype == np.float32
    assert sample["coords"].shape == (500, 3) and sample["coords"].dtype == np.float32
    assert sample["values"].shape == (500, 1) and sample["values"].dtype == np.float32

    # The same draws, split: HR patch first, then coordinates.
    rng = np.random.default_rng(3)
    hr, lr, scales = make_patch(vol, config, rng)
    assert hr.shape == tuple(int(6 * s) for s in scales)
    np.testing.assert_array_equal(lr[..., None], sample["lr"])
    coords = sample["coords"]
    assert np.all(np.abs(coords) < 1)
    index = normalised_to_index(coords.astype(np.float64), np.array(hr.shape))
    rounded = np.rint(index)
    np.testing.assert_allclose(index, rounded, atol=1e-4)
    rounded = rounded.astype(int)
    assert np.all(rounded >= 0) and np.all(rounded < np.array(hr.shape))
    flat = np.ravel_multi_index(tuple(rounded.T), hr.shape)
    assert len(np.unique(flat)) == 500  # distinct
    np.testing.assert_array_equal(sample["coords"], make_grid(hr.shape)[flat])
    np.testing.assert_array_equal(sample["values"][:, 0], hr.reshape(-1)[flat])
    c2, v2 = sample_coords(hr, 500, rng)
    np.testing.assert_array_equal(c2, sample["coords"])
    np.testing.assert_array_equal(v2, sample["values"])


def test_batch_shapes_and_epoch_balance(volumes):
    it = iterator(volumes)
    batch = next(it)
    assert batch["lr"].shape == (4, 6, 6, 6, 1)
    assert batch["coords"].shape == (4, 500, 3)
    assert batch["values"].shape == (4, 500, 1)
    assert all(v.dtype == np.float32 for v in batch.values())
    it.close()
    # each volume gives samples_per_volume patches per epoch
    counts = np.bincount([volume_for_sample(7, g, 3, 5) for g in range(15)], minlength=3)
    np.testing.assert_array_equal(counts, [5, 5, 5])


def test_scale_distribution():
    rng = np.random.default_rng(0)
    config = DataConfig(**SMALL)
    s = np.array([draw_scales(rng, config) for _ in range(4000)])
    assert np.all(s[:, 0] == s[:, 1]) and np.all(s[:, 0] == s[:, 2])
    assert 2.0 <= s.min() and s.max() <= 4.0 and abs(s.mean() - 3.0) < 0.05

    ref = DataConfig(**{**SMALL, "rounding": "reference"})
    r = np.array([draw_scales(rng, ref)[0] for _ in range(4000)])
    np.testing.assert_allclose(r * 10, np.rint(r * 10), atol=1e-9)
    assert r.min() == 2.0 and r.max() == 4.0 and abs(r.mean() - 3.0) < 0.06

    aniso = DataConfig(**{**SMALL, "anisotropic": True})
    a = np.array([draw_scales(rng, aniso) for _ in range(2000)])
    assert np.all(a[:, 0] != a[:, 1]) and np.all(a >= 2) and np.all(a <= 4)
    assert abs(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) < 0.1


# -- degradation --------------------------------------------------------------

def test_reference_mode_is_scipy_zoom(volumes):
    config = DataConfig(**{**SMALL, "degrade": "reference", "rounding": "reference"})
    for seed in range(6):
        hr, lr, scales = make_patch(volumes.arrays[seed % 2], config, np.random.default_rng(seed))
        expected = ndimage.zoom(hr, 1 / scales, order=3)
        np.testing.assert_array_equal(lr, expected)
    # every reference scale at the real sizes gives 10^3 voxels, equal to zoom(hr, 1/s)
    big = smooth_volume((40, 40, 40))
    for s in np.round(np.arange(2.0, 4.01, 0.1), 1):
        m = int(10 * s)
        hr = big[:m, :m, :m]
        np.testing.assert_array_equal(degrade_reference(hr, 10), ndimage.zoom(hr, 1 / s, order=3))


def test_centred_mode_on_linear_ramp():
    m, n = (40, 30, 24), 10  # scales 4, 3, 2.4
    slope = np.array([0.01, -0.02, 0.015])
    idx = np.meshgrid(*[np.arange(k, dtype=np.float64) for k in m], indexing="ij")
    hr = (0.3 + sum(a * i for a, i in zip(slope, idx))).astype(np.float32)
    lr = degrade_centred(hr, n)
    assert lr.shape == (n, n, n) and lr.dtype == np.float32
    # closed form: LR voxel j's centre c_j maps to HR index ((c_j + 1) m - 1) / 2
    centres = [normalised_to_index(axis_centres(n, np.float64), k) for k in m]
    expected = 0.3 + sum(a * c for a, c in
                         zip(slope, np.meshgrid(*centres, indexing="ij")))
    inner = (slice(2, -2),) * 3  # away from the spline boundary
    np.testing.assert_allclose(lr[inner], expected[inner], atol=1e-4)
    # make_patch in centred mode uses exactly this resampling
    vol = smooth_volume((30, 30, 30))
    config = DataConfig(**SMALL, anisotropic=True)
    hr, lr, _ = make_patch(vol, config, np.random.default_rng(1))
    np.testing.assert_array_equal(lr, degrade_centred(hr, 6))
    # the anti-alias option smooths (lower variance) and keeps the shape
    aa = degrade_centred(hr, 6, antialias=True)
    assert aa.shape == lr.shape and aa.std() < lr.std()


def test_baseline_samples_are_tricubic_input_and_hr_target(volumes):
    """The baselines' example maker (training.examples.make_tricubic_pair), through the same
    pipeline: input = the LR patch tricubic-upsampled onto the HR patch's grid (the same LR and
    HR an ArSSR sample is cut from), target = that HR patch."""
    from arssr_jax.interpolation import tricubic
    from arssr_jax.training.examples import make_tricubic_pair

    config = DataConfig(**{**SMALL, "scale_min": 2.5, "scale_max": 2.5})
    sample = make_tricubic_pair(volumes.arrays[0], config, np.random.default_rng(3))
    hr, lr, scales = make_patch(volumes.arrays[0], config, np.random.default_rng(3))
    assert set(sample) == {"input", "target"} and hr.shape == (15, 15, 15) and lr.shape == (6, 6, 6)
    np.testing.assert_array_equal(sample["target"][..., 0], hr)
    np.testing.assert_array_equal(sample["input"][..., 0], tricubic(lr, shape=hr.shape))
    # interpolation, not the target: the input is smoother than the HR patch but close to it
    assert 0 < np.mean(np.abs(sample["input"] - sample["target"])) < 0.1 * np.ptp(hr)
    batch = next(iterator(volumes, scale_min=2.5, scale_max=2.5, make_example=make_tricubic_pair))
    assert batch["input"].shape == batch["target"].shape == (4, 15, 15, 15, 1)
    with pytest.raises(ArSSRError, match="one isotropic scale"):
        make_tricubic_pair.validate(DataConfig(**SMALL))
    with pytest.raises(ArSSRError, match="one isotropic scale"):
        iterator(volumes, make_example=make_tricubic_pair)
    # it draws no points: K larger than the HR patch is no error for it, but is for make_sample
    few_voxels = DataConfig(**{**SMALL, "scale_min": 2.5, "scale_max": 2.5, "samples_per_step": 16 ** 3})
    assert make_tricubic_pair.validate(few_voxels) is few_voxels
    with pytest.raises(ArSSRError, match="samples_per_step"):
        make_sample.validate(few_voxels)


# -- pipeline -----------------------------------------------------------------

def test_determinism_and_seed(volumes):
    a = take(iterator(volumes, seed=1), 2)
    b = take(iterator(volumes, seed=1), 2)
    c = take(iterator(volumes, seed=2), 2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["lr"], c[0]["lr"])
    assert not np.array_equal(a[0]["lr"], a[1]["lr"])


def test_process_sharding(volumes):
    single = take(iterator(volumes), 2)
    parts = [take(iterator(volumes, p, 2), 2) for p in range(2)]
    assert parts[0][0]["lr"].shape[0] == 2
    joined = [{k: np.concatenate([parts[0][t][k], parts[1][t][k]]) for k in single[t]}
              for t in range(2)]
    assert_batches_equal(single, joined)
    with pytest.raises(ArSSRError, match="batch_size"):
        iterator(volumes, 0, 3)


def test_state_save_restore(volumes):
    it = iterator(volumes)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    after = take(it, 3)
    it.close()
    fresh = iterator(volumes)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), after)
    assert fresh.get_state()["step"] == 6
    with pytest.raises(ArSSRError, match="seed"):
        iterator(volumes, seed=5).set_state(state)


def test_worker_processes_match_in_process(volumes):
    expected = take(iterator(volumes, num_steps=4), 4)
    it = iterator(volumes, worker_count=2, num_steps=4)
    try:
        got = list(it)
    finally:
        it.close()
    assert_batches_equal(got, expected)


def test_augmentations(volumes):
    vol = volumes.arrays[0]
    plain = DataConfig(**SMALL)
    shuffle = DataConfig(**SMALL, augment=AugmentConfig(flip=True, permute=True))
    hr0, _, _ = make_patch(vol, plain, np.random.default_rng(4))
    hr1, _, _ = make_patch(vol, shuffle, np.random.default_rng(4))
    np.testing.assert_array_equal(np.sort(hr0.ravel()), np.sort(hr1.ravel()))
    everything = DataConfig(**SMALL, augment=AugmentConfig(
        flip=True, permute=True, gamma=0.3, intensity_scale=0.2, bias_field=0.3,
        noise_std=0.05))
    for seed in range(4):
        sample = make_sample(vol, everything, np.random.default_rng(seed))
        assert sample["lr"].shape == (6, 6, 6, 1)
        assert all(np.all(np.isfinite(v)) for v in sample.values())


def test_validation_samples(volumes):
    config = DataConfig(**SMALL)
    val = validation_samples(volumes, config, scales=(2.0, 3.0, 4.0), seed=3)
    assert len(val) == 2 * 3
    for item in val:
        m = int(6 * item["scale"][0])
        assert item["hr"].shape == (m, m, m, 1) and item["lr"].shape == (6, 6, 6, 1)
        np.testing.assert_array_equal(item["coords"], make_grid((m, m, m)))
        np.testing.assert_array_equal(item["lr"][..., 0], degrade_centred(item["hr"][..., 0], 6))
    # same patch position at every scale: the smaller HR is a corner of the bigger
    np.testing.assert_array_equal(val[0]["hr"], val[2]["hr"][:12, :12, :12])
    again = validation_samples(volumes, config, scales=(2.0, 3.0, 4.0), seed=3)
    assert_batches_equal(val, again)


def test_real_nifti_and_reference_config(tmp_path):
    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    vols = load_volumes(path)
    assert vols.names == (path,) and vols.arrays[0].dtype == np.float32
    # the inference rule: 0.5th / 99.5th percentiles at 0 / 1, nothing clipped
    np.testing.assert_allclose(np.percentile(vols.arrays[0], [0.5, 99.5]), [0.0, 1.0], atol=1e-5)
    assert vols.arrays[0].max() > 1.0
    batch = next(iterator(vols, min_foreground=0.25, margin=4))
    assert batch["lr"].shape == (4, 6, 6, 6, 1)
    assert batch["values"].max() > 0
    ref = DataConfig.reference("somewhere").validate()
    assert ref.samples_per_step == 8000 and ref.hr_size_bounds() == (20, 40)
    # directory and list-file sources
    for i in range(2):
        nib.save(nib.Nifti1Image(smooth_volume(seed=i), np.eye(4)), tmp_path / f"v{i}.nii.gz")
    (tmp_path / "list.txt").write_text("# training set\nv1.nii.gz\n\nv0.nii.gz\n")
    assert [os.path.basename(n) for n in load_volumes(tmp_path).names] == ["v0.nii.gz", "v1.nii.gz"]
    assert [os.path.basename(n) for n in load_volumes(tmp_path / "list.txt").names] == \
        ["v1.nii.gz", "v0.nii.gz"]


# -- errors -------------------------------------------------------------------

def save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), path)
    return str(path)


def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArSSRError, match="empty"):
        load_volumes(empty)
    bad = tmp_path / "four_d.nii.gz"
    save(bad, np.ones((8, 8, 8, 2)))
    with pytest.raises(ArSSRError, match="four_d.nii.gz.*not a 3D"):
        load_volumes(bad)
    flat = tmp_path / "flat.nii"
    save(flat, np.ones((8, 8, 1)) * np.arange(8)[:, None, None])
    with pytest.raises(ArSSRError, match="flat.nii.*single 2D slice"):  # the reader inference uses
        load_volumes(flat)
    small = save(tmp_path / "small.nii", smooth_volume()[:8, :8, :8])
    with pytest.raises(ArSSRError, match="small.nii.*smaller than the patch"):
        make_train_iterator(DataConfig(**SMALL), small, process_index=0, process_count=1)
    nan = smooth_volume()
    nan[3, 4, 5] = np.nan
    with pytest.raises(ArSSRError, match="nan.nii.gz.*NaN"):
        load_volumes(save(tmp_path / "nan.nii.gz", nan))
    with pytest.raises(ArSSRError, match="const.nii.gz.*constant"):
        load_volumes(save(tmp_path / "const.nii.gz", np.full((30, 30, 30), 2.0)))
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ArSSRError, match="junk.nii.*could not be read"):
        load_volumes(junk)
    (tmp_path / "list.txt").write_text("missing.nii.gz\n")
    with pytest.raises(ArSSRError, match="missing.nii.gz"):
        load_volumes(tmp_path / "list.txt")
    with pytest.raises(ArSSRError, match="samples_per_step"):
        DataConfig(**{**SMALL, "samples_per_step": 12 ** 3 + 1}).validate()
    with pytest.raises(ArSSRError, match="patch_size"):
        DataConfig(**{**SMALL, "patch_size": 20}).validate()
