"""Whole-volume super-resolution: equality with the reference, geometry, tiling, bad input."""

import os

import jax
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

from arssr_jax import inference, tiling
from arssr_jax.cli import main
from arssr_jax.coords import grid_for_scale, grid_for_voxel_size, grid_like, make_grid
from arssr_jax.inference import encode_volume, upsample, upsample_nifti
from arssr_jax.models import receptive_radius
from arssr_jax.models import ModelConfig, build_model, init_params, predict
from arssr_jax.weights import convert_state_dict, save_model
from arssr_jax.testing.torch_reference import make_reference

from tiny_model import TINY  # noqa: E402  (tests/ is on sys.path: conftest.py)


def rng_volume(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# ------------------------------------------------------------------- equals the reference


@pytest.mark.parametrize("encoder", ["ResCNN", "RDN"])
def test_upsample_equals_the_reference_mirror(encoder):
    reference = make_reference(encoder, seed=5)
    config, params = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, encoder)
    volume = rng_volume((7, 9, 11))
    ours = upsample(volume, (build_model(config), params), scale=2.5, normalize=False, chunk=97)
    hr = tuple(int(n * 2.5) for n in volume.shape)
    assert ours.shape == hr
    with torch.no_grad():  # the reference sees the transposed (SimpleITK-order) volume
        out = reference(torch.from_numpy(volume.T.copy())[None, None], torch.from_numpy(make_grid(hr[::-1]))[None])
    expected = out.numpy()[0, :, 0].reshape(hr[::-1]).T
    assert expected.std() > 1e-4
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-5


def test_integer_scale_grid_is_the_reference_grid():
    grid = grid_for_scale((10, 12, 7), 2)
    from arssr_jax.coords import index_map_to_normalised

    ijk = np.stack(np.meshgrid(*[np.arange(m) for m in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    coords = apply_affine(index_map_to_normalised(grid.index_map, (10, 12, 7)), ijk)
    np.testing.assert_allclose(coords, make_grid((20, 24, 14)), atol=1e-6)


# ------------------------------------------------------------------- geometry


def oblique_affine():
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 1.5, 3.0])
    affine[:3, 3] = [-40.0, 12.0, 7.5]
    return affine


@pytest.mark.parametrize("scale", [2.0, 3.2, (2.0, 1.5, 3.0)])
def test_output_affine_places_voxels_where_they_were_sampled(scale):
    lr_shape, lr_affine = (10, 11, 7), oblique_affine()
    grid = grid_for_scale(lr_shape, scale)
    hr_affine = grid.affine(lr_affine)
    scales = np.broadcast_to(scale, (3,))
    for axis, (n, m, s) in enumerate(zip(lr_shape, grid.shape, scales)):
        assert m == int(n * s)
        # The first HR centre lies half an HR voxel inside the LR field of view's face...
        first = np.zeros(3)
        lr_index = np.linalg.solve(lr_affine, np.append(apply_affine(hr_affine, first), 1))[:3]
        assert lr_index[axis] == pytest.approx(-0.5 + 0.5 * n / m)
        # ...so with s integer it is (s - 1) / (2 s) LR voxels before the first LR centre.
        if float(s).is_integer():
            assert lr_index[axis] == pytest.approx(-(s - 1) / (2 * s))
        # and the HR spacing is n * spacing / m, not spacing / s.
        lr_spacing = np.linalg.norm(lr_affine[:3, axis])
        assert np.linalg.norm(hr_affine[:3, axis]) == pytest.approx(n * lr_spacing / m)
    # The outer faces of both grids coincide: the field of view is unchanged.
    lr_far = apply_affine(lr_affine, np.array(lr_shape) - 0.5)
    hr_far = apply_affine(hr_affine, np.array(grid.shape) - 0.5)
    np.testing.assert_allclose(lr_far, hr_far, atol=1e-9)


def test_voxel_size_grid_has_that_voxel_size_and_the_same_centre():
    lr_shape, lr_affine = (10, 11, 7), oblique_affine()
    grid = grid_for_voxel_size(lr_shape, [2.0, 1.5, 3.0], [0.7, 0.7, 1.1])
    hr_affine = grid.affine(lr_affine)
    np.testing.assert_allclose(np.linalg.norm(hr_affine[:3, :3], axis=0), [0.7, 0.7, 1.1])
    centre = lambda a, shape: apply_affine(a, (np.array(shape) - 1) / 2)
    np.testing.assert_allclose(centre(lr_affine, lr_shape), centre(hr_affine, grid.shape), atol=1e-9)


def test_like_decodes_directly_on_an_oblique_grid(tiny):
    model, params = tiny
    volume = rng_volume((9, 10, 8), seed=2)
    lr_affine = oblique_affine()
    ref_affine = lr_affine @ np.array(
        [[0.4, 0.1, 0.0, 1.2], [-0.1, 0.45, 0.05, 0.7], [0.0, 0.0, 0.5, 1.9], [0, 0, 0, 1]]
    )
    grid = grid_like(lr_affine, (7, 6, 5), ref_affine)
    np.testing.assert_allclose(grid.affine(lr_affine), ref_affine, atol=1e-12)
    ours = upsample(volume, tiny, grid=grid, normalize=False, chunk=50)
    # Independent route: world point of each target voxel -> LR index -> normalised -> predict.
    ijk = np.stack(np.meshgrid(*[np.arange(m) for m in (7, 6, 5)], indexing="ij"), -1).reshape(-1, 3)
    lr_index = apply_affine(np.linalg.inv(lr_affine), apply_affine(ref_affine, ijk))
    coords = (2 * lr_index + 1) / np.array(volume.shape) - 1
    expected = np.asarray(predict(model, params, volume[None, ..., None], coords[None].astype(np.float32)))
    np.testing.assert_allclose(ours.ravel(), expected[0, :, 0], rtol=1e-5, atol=1e-6)


def test_like_with_an_upsampled_grid_equals_scale(tiny, tmp_path):
    lr_affine = oblique_affine()
    volume = rng_volume((8, 9, 7), seed=3) * 300 + 20
    nib.save(nib.Nifti1Image(volume, lr_affine), tmp_path / "lr.nii.gz")
    model_dir = str(save_model(tmp_path / "model", TINY, tiny[1]))
    by_scale = upsample_nifti(tmp_path / "lr.nii.gz", tmp_path / "s.nii.gz", model_dir, scale=2.0)
    nib.save(nib.Nifti1Image(np.zeros(by_scale.shape, np.float32), by_scale.affine), tmp_path / "ref.nii.gz")
    by_like = upsample_nifti(tmp_path / "lr.nii.gz", tmp_path / "l.nii.gz", model_dir, like=tmp_path / "ref.nii.gz")
    np.testing.assert_allclose(by_like.data, by_scale.data, rtol=1e-5, atol=1e-4)
    written = nib.load(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(written.affine, by_scale.affine, atol=1e-5)
    np.testing.assert_allclose(written.get_fdata(), by_scale.data, rtol=1e-6)


def test_normalisation_restores_the_input_range(tiny):
    """The model sees the percentile-normalised input, and the output goes back to the input's
    scale: rescaling the input rescales the output the same way."""
    from arssr_jax.intensity import Normalisation

    volume = rng_volume((8, 8, 8), seed=4)
    norm = Normalisation.of(volume)
    raw = norm.undo(upsample(norm.apply(volume), tiny, scale=2, normalize=False))
    np.testing.assert_allclose(upsample(volume, tiny, scale=2), raw, rtol=1e-5, atol=1e-5)
    scaled = upsample(volume * 1000 + 50, tiny, scale=2)
    np.testing.assert_allclose(scaled, raw * 1000 + 50, rtol=1e-5, atol=1e-2)


# ------------------------------------------------------------------- efficiency


@pytest.mark.parametrize(
    "config",
    [TINY, ModelConfig(encoder="ResCNN", feature_dim=4, decoder_depth=4, decoder_width=8,
                       encoder_options={"num_blocks": 2, "convs_per_block": 2, "num_features": 4}),
     ModelConfig(encoder="SRResNet", feature_dim=4, decoder_depth=4, decoder_width=8,
                 encoder_options={"num_blocks": 2, "num_features": 4})],
    ids=["RDN", "ResCNN", "SRResNet"],
)
def test_tiled_encoding_equals_untiled(config):
    model = build_model(config)
    params = init_params(model, jax.random.key(1))
    volume = rng_volume((28, 26, 12), seed=5)
    tiles = tiling.plan_tiles(volume.shape, (6, 5, 12), receptive_radius(config))
    assert len(tiles) == 30 and tiles[0].read[0].stop < 28 and tiles[0].read[1].stop < 26  # real halos
    before = inference._encode_one._cache_size()
    tiled = encode_volume(model, params, volume, tile=(6, 5, 12))
    assert inference._encode_one._cache_size() == before + 1  # one shape for every tile
    whole = encode_volume(model, params, volume)
    assert np.abs(tiled - whole).max() / np.abs(whole).max() <= 1e-5


def test_receptive_radius_is_exact():
    """Perturbing one voxel changes features exactly within the receptive radius."""
    model = build_model(TINY)
    params = init_params(model, jax.random.key(2))
    volume = rng_volume((25, 9, 9), seed=6)
    bumped = volume.copy()
    bumped[12, 4, 4] += 1.0
    diff = np.abs(encode_volume(model, params, bumped) - encode_volume(model, params, volume)).max(axis=(1, 2, 3))
    changed = np.nonzero(diff > 0)[0]
    radius = receptive_radius(TINY)
    assert changed.min() == 12 - radius and changed.max() == 12 + radius


def test_decoding_compiles_once_for_all_chunks(tiny):
    volume = rng_volume((6, 7, 8), seed=7)
    grid = grid_for_scale(volume.shape, 2.7)
    features = encode_volume(*tiny, volume)
    before = inference._decode_chunk._cache_size()
    chunked = inference.decode_grid(*tiny, features, grid, chunk=333)  # does not divide the total
    assert inference._decode_chunk._cache_size() == before + 1
    whole = inference.decode_grid(*tiny, features, grid, chunk=grid.num_voxels)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)


def test_decoding_in_blocks_within_chunks(tiny):
    volume = rng_volume((6, 7, 8), seed=8)
    grid = grid_for_scale(volume.shape, 2.7)  # 16 x 18 x 21 = 6048 voxels
    features = encode_volume(*tiny, volume)
    whole = inference.decode_grid(*tiny, features, grid, chunk=grid.num_voxels, block=grid.num_voxels)
    blocked = inference.decode_grid(*tiny, features, grid, chunk=1000, block=64)
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("total, asked, block, expected", [
    (884736, 65536, 4096, (49152, 4096)),  # 96^3: 216 blocks = 18 chunks of 12, no padding
    (6048, 1000, 64, (768, 64)),           # 95 blocks: 8 chunks of 12 (at most 15), one block padding
    (6048, 333, 4096, (333, 333)),         # a block never exceeds the chunk
    (100, 65536, 4096, (100, 100)),        # nor the grid
    (6048, 1000, None, (1000, 1000)),      # no block size: the whole chunk
    (10, 1, 1, (1, 1)),
])
def test_chunk_layout(total, asked, block, expected):
    chunk, got_block = inference.chunk_layout(total, asked, block)
    assert (chunk, got_block) == expected
    assert chunk % got_block == 0 and chunk <= asked


# ------------------------------------------------------------------- bad input via the CLI


@pytest.fixture
def lr_file(tmp_path):
    path = tmp_path / "lr.nii.gz"
    nib.save(nib.Nifti1Image(rng_volume((8, 9, 7)), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def run_cli_error(capsys, args, out, match):
    assert main(["upsample", *map(str, args), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err and match in err, err
    assert not os.path.exists(out)
    folder = os.path.dirname(out) or "."
    assert not os.path.isdir(folder) or not [p for p in os.listdir(folder) if ".tmp" in p]


def test_cli_writes_output(capsys, lr_file, tiny_dir, tmp_path):
    out = tmp_path / "hr.nii.gz"
    assert main(["upsample", str(lr_file), str(out), "--scale", "2", "1.5", "3", "--model", tiny_dir]) == 0
    image = nib.load(out)
    assert image.shape == (16, 13, 21)
    np.testing.assert_allclose(image.header.get_zooms(), [1.0, 2 * 9 / 13, 2 * 7 / 21], rtol=1e-6)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no such file"),
        ("not_nifti", "lr.nii"),
        ("two_d", "2D"),
        ("four_d", "--volume-index"),
        ("nan", "NaN"),
        ("zero_scale", "positive"),
        ("nan_scale", "finite"),
        ("huge", "voxels"),
        ("no_parent", "does not exist"),
        ("same_path", "input"),
    ],
)
def test_cli_bad_input(case, match, capsys, tmp_path, lr_file, tiny_dir):
    out, src, extra = tmp_path / "out.nii.gz", lr_file, ["--scale", "2"]
    bad = tmp_path / "bad.nii"
    if case == "missing":
        src = tmp_path / "absent.nii.gz"
    elif case == "not_nifti":
        bad.write_text("not an image")
        src, match = bad, "bad.nii"
    elif case == "two_d":
        nib.save(nib.Nifti1Image(rng_volume((8, 9)), np.eye(4)), bad)
        src = bad
    elif case == "four_d":
        nib.save(nib.Nifti1Image(rng_volume((8, 9, 7, 2)), np.eye(4)), bad)
        src = bad
    elif case == "nan":
        data = rng_volume((8, 9, 7))
        data[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), bad)
        src = bad
    elif case == "zero_scale":
        extra = ["--scale", "0"]
    elif case == "nan_scale":
        extra = ["--scale", "nan"]
    elif case == "huge":
        extra = ["--scale", "10000"]
    elif case == "no_parent":
        out = tmp_path / "missing" / "out.nii.gz"
    elif case == "same_path":
        out = lr_file
    args = [src, out, *extra, "--model", tiny_dir]
    if case == "same_path":
        assert main(["upsample", *map(str, args), "--quiet"]) == 2
        assert match in capsys.readouterr().err
        return
    run_cli_error(capsys, args, str(out), match)


def test_four_d_with_volume_index(capsys, tmp_path, tiny_dir):
    data = rng_volume((8, 9, 7, 2))
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "4d.nii.gz")
    out = tmp_path / "o.nii.gz"
    assert main(["upsample", str(tmp_path / "4d.nii.gz"), str(out), "--scale", "2", "--volume-index", "1",
                 "--model", tiny_dir, "--quiet"]) == 0
    assert nib.load(out).shape == (16, 18, 14)


def test_missing_model_is_a_clear_error(capsys, lr_file, tmp_path):
    run_cli_error(capsys, [lr_file, tmp_path / "o.nii.gz", "--scale", "2", "--model", tmp_path / "nope"],
                  str(tmp_path / "o.nii.gz"), "not found")


def test_tile_choice_fits_the_budget_without_drowning_in_halos():
    shape, halo, budget = (91, 109, 91), 28, 650_000
    tiles = tiling.plan_tiles(shape, tiling.choose_tile_core(shape, halo, budget), halo)
    windows = [int(np.prod([s.stop - s.start for s in t.read])) for t in tiles]
    assert max(windows) <= budget
    assert sum(windows) <= 4 * np.prod(shape)  # small cubes would re-encode halos ~40 times over
    covered = np.zeros(shape, int)
    for t in tiles:
        covered[t.core] += 1
    assert np.all(covered == 1)
    assert tiling.choose_tile_core(shape, halo, 10**7) == shape


def test_bfloat16_compute_stays_within_one_percent_of_float32():
    """The bf16 compute option (float32 parameters, bf16 products) on the shipped model and
    a real T1 crop at x2: relative L2 error < 1e-2, and 99.9 % of voxels within 1e-2 of
    the intensity range (a few isolated voxels at strong edges reach ~1.4e-2)."""
    import dataclasses

    from arssr_jax.weights import load_model

    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    volume = np.asarray(nib.load(path).get_fdata(), np.float32)[4:28, 8:32, 2:22]
    module, params, _ = load_model("default")
    bf16 = build_model(dataclasses.replace(module.config, compute_dtype="bfloat16"))
    full = upsample(volume, (module, params), scale=2)
    half = upsample(volume, (bf16, params), scale=2)
    assert full.dtype == half.dtype == np.float32
    error = np.abs(half - full)
    assert np.linalg.norm(error) / np.linalg.norm(full) < 1e-2
    assert np.quantile(error, 0.999) < 1e-2 * np.ptp(full)
    assert 0 < error.max()  # bf16 really was used


def test_a_window_that_spans_an_axis_is_one_tile_along_it():
    tiles = tiling.plan_tiles((10, 40, 7), 4, 3)
    assert len(tiles) == 1 * 10 * 1  # 4 + 2*3 = 10 spans axis 0 (and 7), not axis 1
    covered = np.zeros((10, 40, 7), int)
    for t in tiles:
        covered[t.core] += 1
        assert [s.stop - s.start for s in t.read] == [10, 10, 7]
    assert np.all(covered == 1)


def test_tiled_apply_equals_the_whole_volume_for_a_local_operator():
    from scipy import ndimage

    volume = rng_volume((23, 17, 9), seed=3)
    box = lambda v: ndimage.uniform_filter(np.asarray(v, np.float64), size=5, mode="constant")  # radius 2
    whole = box(volume)
    tiled = tiling.tiled_apply(box, volume, (5, 4, 3), halo=2)
    np.testing.assert_allclose(tiled, whole, rtol=1e-6, atol=1e-7)
    assert np.abs(tiling.tiled_apply(box, volume, (5, 4, 3), halo=1) - whole).max() > 1e-3  # too small a halo shows
