"""Data consistency (back-projection): scipy as the independent reference, closed-form
cases, and the option saved with the model and applied by inference."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.cli import main
from arssr_jax.consistency import (back_project, back_project_slices, grid_scale, is_super_resolution, points_inside,
                                   resample, slices_measurable)
from arssr_jax.coords import TargetGrid, grid_along_line, grid_for_region, grid_for_scale, grid_for_shape
from arssr_jax.errors import ArSSRError
from arssr_jax.evaluation.simulate import simulate_lr
from arssr_jax.inference import Upsampler, upsample
from arssr_jax.interpolation import tricubic
from arssr_jax.metrics import psnr
from arssr_jax.options import InferenceOptions, schedule_from_words
from arssr_jax.slice_profile import apply_profile
from arssr_jax.training.config import load_config
from arssr_jax.weights import load_model, load_options, save_model

from scripts import ROOT, load_script  # noqa: E402  (tests/ is on sys.path: conftest.py)
from tiny_model import TINY, tiny_model  # noqa: E402


def smooth_volume(shape, seed=0):
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.gaussian_filter(noise, 1.5).astype(np.float32) * 4


def sampled_at_lr_centres(sr, lr_shape):
    """The training degradation of ``sr`` (the evaluation's simulate_lr)."""
    return simulate_lr(sr, [m / n for m, n in zip(sr.shape, lr_shape)])


def test_resampling_is_the_training_degradation_and_tricubic():
    hr = smooth_volume((20, 17, 24))
    lr_shape = (8, 7, 11)
    grid = grid_for_shape(lr_shape, hr.shape)
    down = resample(hr, np.linalg.inv(grid.index_map), lr_shape)
    np.testing.assert_allclose(down, simulate_lr(hr, [m / n for m, n in zip(hr.shape, lr_shape)]), atol=2e-5)
    lr = smooth_volume(lr_shape, seed=1)
    up = resample(lr, grid.index_map, hr.shape)
    np.testing.assert_allclose(up, tricubic(lr, shape=hr.shape), atol=2e-5)


def test_oblique_resampling_equals_scipy_and_the_separable_path():
    volume = smooth_volume((9, 10, 11))
    swap = np.eye(4)[[1, 0, 2, 3]]  # target (i, j, k) -> source (j, i, k): not diagonal
    swap[:3, 3] = [0.25, -0.5, 0.0]
    out = resample(volume, swap, (12, 9, 11))
    index = np.indices((12, 9, 11)).reshape(3, -1).astype(np.float64)
    points = swap[:3, :3] @ index + swap[:3, 3:]
    expected = ndimage.map_coordinates(volume.astype(np.float64), points, order=3, mode="reflect")
    np.testing.assert_allclose(out.ravel(), expected, atol=1e-5)
    # the same map written diagonally on the transposed volume takes the separable path
    diagonal = np.eye(4)
    diagonal[:3, 3] = [-0.5, 0.25, 0.0]
    separable = resample(volume.transpose(1, 0, 2), diagonal, (12, 9, 11))
    np.testing.assert_allclose(out, separable, atol=1e-5)
    seen = points_inside(swap, (12, 9, 11), volume.shape)
    assert seen[:11].all() and not seen[11:].any()  # target row i is source index i - 0.5 on an axis of 10


def test_step_zero_leaves_the_output_as_it_is():
    sr, lr = smooth_volume((16, 16, 16)), smooth_volume((8, 8, 8), seed=1)
    assert np.array_equal(back_project(sr, lr, grid_for_scale(lr.shape, 2), 0.0), sr)


def test_a_consistent_output_is_not_changed():
    # At x3 every LR centre is an HR centre and the tricubic interpolant passes through the samples.
    lr = smooth_volume((7, 8, 6))
    sr = tricubic(lr, scale=3)
    np.testing.assert_allclose(sampled_at_lr_centres(sr, lr.shape), lr, atol=1e-5)
    np.testing.assert_allclose(back_project(sr, lr, grid_for_scale(lr.shape, 3), 1.0), sr, atol=1e-5)


@pytest.mark.parametrize("step", [0.5, 1.0])
def test_each_step_removes_that_fraction_of_the_disagreement(step):
    hr = smooth_volume((24, 20, 28))
    lr = sampled_at_lr_centres(hr, (10, 8, 11))
    wrong = hr + 0.3 * smooth_volume(hr.shape, seed=2)  # a network's output with low-frequency errors
    before = float(np.abs(sampled_at_lr_centres(wrong, lr.shape) - lr).mean())
    fixed = back_project(wrong, lr, grid_for_shape(lr.shape, hr.shape), step)
    after = float(np.abs(sampled_at_lr_centres(fixed, lr.shape) - lr).mean())
    assert after == pytest.approx((1 - step) * before, abs=0.1 * before)
    assert np.abs(fixed - hr).mean() < np.abs(wrong - hr).mean()  # closer to the truth, too


def test_input_outside_a_region_grid_is_not_compared():
    lr = smooth_volume((12, 12, 12))
    grid = grid_for_region((3, 4, 2), (9, 10, 8), 2)
    sr = tricubic(lr, scale=2)[6:18, 8:20, 4:16] + 0.1
    other = lr.copy()
    other[:2], other[10:], other[:, :3] = 5.0, -5.0, 7.0  # LR voxels whose centres the region does not contain
    np.testing.assert_array_equal(back_project(sr, lr, grid, 1.0), back_project(sr, other, grid, 1.0))
    assert not np.allclose(back_project(sr, lr, grid, 1.0), sr)


def test_line_profiles_and_downsampling_are_returned_as_decoded():
    lr = smooth_volume((8, 8, 8))
    line = grid_along_line((0, 0, 0), (7, 7, 7), 30)
    assert not is_super_resolution(line) and not is_super_resolution(grid_for_scale(lr.shape, 0.5))
    assert is_super_resolution(grid_for_scale(lr.shape, (2, 1, 3.5)))
    profile = smooth_volume(line.shape)
    assert np.array_equal(back_project(profile, lr, line, 1.0), profile)
    rotated = TargetGrid((8, 8, 8), np.eye(4)[[1, 2, 0, 3]])
    assert is_super_resolution(rotated)


# ------------------------------------------------------------------ saved with the model, applied by inference


def test_upsample_applies_the_models_step_and_an_override(tmp_path):
    module, params = tiny_model()
    lr = smooth_volume((9, 8, 10)) / 4
    raw = upsample(lr, (module, params), scale=2, normalize=False)
    grid = grid_for_scale(lr.shape, 2)
    save_model(tmp_path / "m", TINY, params, options=InferenceOptions(consistency=0.5))
    assert load_options(tmp_path / "m").consistency == 0.5
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    assert document["inference"] == {"consistency": 0.5} and "consistency" not in document["model"]
    np.testing.assert_allclose(upsample(lr, tmp_path / "m", scale=2, normalize=False),
                               back_project(raw, lr, grid, 0.5), atol=1e-6)
    np.testing.assert_array_equal(upsample(lr, tmp_path / "m", scale=2, normalize=False, consistency=0.0), raw)
    np.testing.assert_array_equal(Upsampler(tmp_path / "m", consistency=0.0, normalize=False)(lr, scale=2), raw)


def test_grid_scale_is_the_geometric_mean_of_the_axes_scales():
    assert grid_scale(grid_for_scale((10, 12, 8), 2)) == pytest.approx(2.0)
    assert grid_scale(grid_for_scale((10, 12, 8), (1, 2, 4))) == pytest.approx(2.0)
    assert grid_scale(grid_for_scale((10, 10, 10), (1, 1, 4))) == pytest.approx(4 ** (1 / 3))
    turned = np.eye(4)
    turned[:3, :3] = np.array([[0.0, 0.5, 0.0], [0.0, 0.0, -0.25], [0.5, 0.0, 0.0]])  # axes permuted, one flipped
    assert grid_scale(TargetGrid((8, 8, 8), turned)) == pytest.approx(16 ** (1 / 3))  # x2, x4, x2


def test_a_step_per_scale_is_saved_and_applied_by_the_grids_scale(tmp_path):
    """(scale, step) pairs: the step at a grid's scale, linear in between, held beyond the ends."""
    module, params = tiny_model()
    lr = smooth_volume((9, 8, 10)) / 4
    save_model(tmp_path / "m", TINY, params, options=InferenceOptions(consistency={3: 0.0, 2: 1.0}))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["inference"]["consistency"] == [[2.0, 1.0], [3.0, 0.0]]
    assert load_options(tmp_path / "m").consistency == ((2.0, 1.0), (3.0, 0.0))
    up = Upsampler(tmp_path / "m", normalize=False)
    for scale in (2, 2.5, 3, 4, (1, 1, 2)):
        grid = grid_for_scale(lr.shape, scale)
        hr_per_lr = np.prod(1 / np.diag(grid.index_map)[:3]) ** (1 / 3)
        step = float(np.clip(3 - hr_per_lr, 0, 1))  # 1 at x2 and below, 0 from x3
        raw = upsample(lr, (module, params), grid=grid, normalize=False)
        np.testing.assert_allclose(up(lr, grid=grid), back_project(raw, lr, grid, step), atol=1e-6)
        np.testing.assert_array_equal(up(lr, grid=grid), upsample(lr, tmp_path / "m", grid=grid, normalize=False))
    # an override is one step at every scale
    np.testing.assert_array_equal(Upsampler(tmp_path / "m", consistency=0.0, normalize=False)(lr, scale=2),
                                  upsample(lr, (module, params), scale=2, normalize=False))


def test_shipped_model_has_the_step_and_converted_models_have_none(tmp_path, capsys):
    assert load_options("default").consistency == ((2.0, 0.75), (3.0, 0.25))
    # the recipe that reproduces it builds the same network; the step is exported beside it
    assert load_config(str(ROOT / "train" / "configs" / "default_model.py")).model == load_model("default")[2]
    assert InferenceOptions().consistency == 0.0  # converted reference weights: the paper's output
    # a config.json written before the options had their own block: the step moves over, the
    # removed dim damping is ignored with one line
    module, params = tiny_model()
    save_model(tmp_path / "old", TINY, params)
    document = json.loads((tmp_path / "old" / "config.json").read_text())
    del document["inference"]
    document["model"].update(consistency=[[2, 0.5]], dim_damping=0.8, dim_band=[0.07, 0.1, 0.2, 0.23])
    (tmp_path / "old" / "config.json").write_text(json.dumps(document))
    capsys.readouterr()
    assert load_options(tmp_path / "old").consistency == ((2.0, 0.5),)
    assert load_model(tmp_path / "old")[2] == TINY
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes and all("ignoring dim_damping, dim_band" in line for line in notes)


def test_free_memory_is_checked_for_the_steps_arrays_too(monkeypatch):
    from arssr_jax import inference

    lr, grid = smooth_volume((8, 8, 8)), grid_for_scale((8, 8, 8), 2)
    # 80 kB free: the 16^3 output and the 8^3 x 8 feature map fit (49 kB), with the step's two
    # more output-sized arrays (82 kB) they do not
    monkeypatch.setattr(inference, "available_memory_bytes", lambda: 80_000)
    inference.check_fits_in_memory(lr.shape, grid, TINY)
    with pytest.raises(ArSSRError, match="free"):
        upsample(lr, tiny_model(), scale=2, consistency=0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "half", [], [(0.5, 0.2)], [(2, 0.2), (2.0, 0.3)],
                                 [(2, 1.2)], [(2,)], {2: True}, {float("inf"): 0.5}, ["2:0.5", "x"]])
def test_a_bad_step_is_refused(bad):
    with pytest.raises(ArSSRError, match="consistency"):
        InferenceOptions(consistency=bad)
    with pytest.raises(ArSSRError, match="consistency"):
        upsample(smooth_volume((6, 6, 6)), tiny_model(), scale=2, consistency=bad)


def test_a_schedule_is_interpolated_by_scale_and_held_beyond_its_ends():
    options = InferenceOptions(consistency=["3:0.25", "2:0.75"])  # as the command line gives it
    assert options.consistency == ((2.0, 0.75), (3.0, 0.25))
    steps = [options.step_for(s) for s in (1.5, 2.0, 2.5, 2.8, 3.0, 4.0)]
    np.testing.assert_allclose(steps, np.interp([1.5, 2.0, 2.5, 2.8, 3.0, 4.0], [2, 3], [0.75, 0.25]))
    assert InferenceOptions(consistency=0.3).step_for(7.0) == 0.3


def test_cli_refuses_a_bad_step_before_writing(tmp_path, capsys):
    nib.save(nib.Nifti1Image(smooth_volume((8, 8, 8)), np.eye(4)), tmp_path / "lr.nii.gz")
    out = tmp_path / "sr.nii.gz"
    assert main(["upsample", str(tmp_path / "lr.nii.gz"), str(out), "--scale", "2", "--consistency", "2",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--consistency takes a step from 0 to 1" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("antialias", [False, True])
def test_sweep_script_scores_each_step_and_picks_the_best(tmp_path, capsys, antialias):
    """eval/consistency_sweep.py: each column is the PSNR of the model's output back-projected
    with that step, recomputed here from upsample and back_project; the best step is the
    column with the highest mean. --antialias: the LR averages over its voxels."""
    module, params = tiny_model()
    save_model(tmp_path / "m", TINY, params)
    volume = smooth_volume((20, 18, 16))
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "hr.nii.gz")
    sweep = load_script("eval/consistency_sweep.py")
    steps = [0.0, 0.5, 1.0]
    assert sweep.main([str(tmp_path / "hr.nii.gz"), "--model", str(tmp_path / "m"), "--scales", "2", "3",
                       "--steps", *map(str, steps)] + ["--antialias"] * antialias) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[3:-1] for line in out.splitlines() if line.startswith(f"| {tmp_path}")]
    printed = np.array([[float(v) for v in row] for row in rows])
    hr = (volume - volume.min()) / (volume.max() - volume.min())
    expected = []
    for scale in (2.0, 3.0):
        lr = np.maximum(simulate_lr(hr, scale, antialias=antialias), 0.0)
        grid = grid_for_shape(lr.shape, hr.shape)
        raw = upsample(lr, (module, params), grid=grid, consistency=0.0)
        expected.append([psnr(back_project(raw, lr, grid, step), hr) for step in steps])
    np.testing.assert_allclose(printed, expected, atol=0.011)
    assert f"best step: {steps[int(np.argmax(np.mean(expected, axis=0)))]:g}" in out


def test_sweep_script_picks_a_step_per_scale_from_the_mean_over_volumes(tmp_path, capsys, monkeypatch):
    """The per-scale choice averages each scale's row over the volumes; the overall choice
    averages everything (here they differ: x2 prefers step 1, x3 step 0, overall 0.5)."""
    module, params = tiny_model()
    save_model(tmp_path / "m", TINY, params)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(smooth_volume((8, 8, 8)), np.eye(4)), tmp_path / f"{name}.nii.gz")
    tables = iter([np.array([[20.0, 21.0, 23.0], [22.0, 21.5, 19.0]]),   # volume a: rows x2, x3
                   np.array([[20.0, 21.0, 20.5], [22.0, 21.5, 20.0]])])  # volume b
    sweep = load_script("eval/consistency_sweep.py")
    monkeypatch.setattr(sweep, "sweep", lambda *args: next(tables))
    assert sweep.main([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--model", str(tmp_path / "m"),
                       "--scales", "2", "3", "--steps", "0", "0.5", "1"]) == 0
    out = capsys.readouterr().out
    assert "best step: 0.5" in out and "best step per scale: x2 1, x3 0" in out
    words = out.split("export with: --consistency ")[1].splitlines()[0].split()
    assert schedule_from_words(words) == ((2.0, 1.0), (3.0, 0.0))


# ------------------------------------------------------------------ thick-slice inputs: the slice profile


@pytest.mark.parametrize("profile, width", [("box", None), ("box", 3.0), ("gaussian", 5.0)])
def test_slice_back_projection_makes_the_slices_agree_and_leaves_an_agreeing_output(profile, width):
    """After the step the output, measured by the profile, is much closer to the input (box: to
    under 0.4 % of its range); an output whose slices already agree is left as it is."""
    hr = smooth_volume((10, 9, 32))
    lr = apply_profile(hr, 2, 8, 4.0, profile, width)
    grid = grid_for_scale(lr.shape, (1, 1, 4))
    assert slices_measurable(grid, lr.shape, 2) and not slices_measurable(grid_for_scale(lr.shape, 2), lr.shape, 2)
    start = tricubic(lr, shape=hr.shape)
    agreed = back_project_slices(start, lr, grid, 2, profile, width)
    before, after = (np.abs(apply_profile(v, 2, 8, 4.0, profile, width) - lr).max() / np.ptp(lr) for v in (start, agreed))
    assert after < 0.25 * before and (profile == "gaussian" or after < 4e-3), (before, after)
    np.testing.assert_allclose(back_project_slices(hr, lr, grid, 2, profile, width), hr, atol=1e-4 * np.ptp(hr))


def test_a_thick_slice_input_agrees_with_its_slices_through_the_pipeline(tmp_path):
    """--slice-profile: the thick axis from the voxel size, the thickness in mm, the step along it."""
    module, params = tiny_model()
    hr = smooth_volume((8, 7, 24)) / 4
    lr = apply_profile(hr, 2, 6, 4.0, "box", 2.0)  # 1 x 1 x 4 mm slices 2 mm thick (a gap)
    out = Upsampler((module, params), normalize=False, slice_profile="box", slice_thickness=2.0)(
        lr, scale=(1, 1, 4), lr_voxel_size=(1, 1, 4))
    plain = upsample(lr, (module, params), scale=(1, 1, 4), normalize=False)
    after, before = (np.abs(apply_profile(v, 2, 6, 4.0, "box", 2.0) - lr).max() for v in (out, plain))
    assert after < 0.25 * before, (before, after)
    for bad in ({"slice_profile": "triangle"}, {"slice_thickness": -1.0}, {"slice_thickness": 0}):
        with pytest.raises(ArSSRError, match="slice"):
            InferenceOptions(**bad)
