import math
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics import (
    dice,
    fit_tissue_model,
    lpc_si,
    psi,
    psnr,
    segment,
    slicewise,
    slicewise_per_axis,
    ssim,
    ssim_factors,
)
from arssr_jax.metrics.reference import _ssim_factor_maps

ANAT = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0)


@pytest.fixture(scope="module")
def anat():
    return np.asarray(nib.load(ANAT).dataobj)  # int16, (33, 41, 25)


@pytest.fixture(scope="module")
def mni():
    datasets = pytest.importorskip("nilearn.datasets")
    return datasets.load_mni152_template(resolution=1).get_fdata()  # (197, 233, 189), offline


def _blur(img, sigma):
    return img if sigma == 0 else gaussian_filter(img, sigma)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_closed_form():
    gt = np.linspace(-2.0, 8.0, 4 * 5 * 6).reshape(4, 5, 6)  # range exactly 10
    pred = gt + 0.5  # MSE exactly 0.25
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(100 / 0.25), abs=1e-12)
    # range comes from the ground truth, not from the prediction
    pred2 = gt.copy()
    pred2[0, 0, 0] += 100.0
    mse = 100.0 ** 2 / gt.size
    assert psnr(pred2, gt) == pytest.approx(10 * math.log10(100 / mse), abs=1e-9)
    assert psnr(gt, gt) == math.inf


@pytest.mark.parametrize("shape", [(20, 17, 15), (9, 30, 11), (40, 33)])
def test_ssim_matches_skimage_random(shape):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(sum(shape))
    gt = rng.random(shape) * 3.0 - 1.0
    pred = gt + 0.3 * rng.standard_normal(shape)
    ref = skm.structural_similarity(pred, gt, data_range=gt.max() - gt.min())
    assert abs(ssim(pred, gt) - ref) <= 1e-6
    # explicit data_range is honoured
    ref2 = skm.structural_similarity(pred, gt, data_range=7.0)
    assert abs(ssim(pred, gt, data_range=7.0) - ref2) <= 1e-6


def test_ssim_matches_skimage_real(anat, mni):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    gt = anat.astype(np.float64)
    cases = [
        (gaussian_filter(gt, 1.0), gt),
        (gt + rng.normal(0, 400, gt.shape), gt),
    ]
    crop = mni[60:120, 80:150, 60:110]
    cases.append((gaussian_filter(crop, 0.8) + rng.normal(0, 0.01, crop.shape), crop))
    for pred, g in cases:
        ref = skm.structural_similarity(pred, g, data_range=g.max() - g.min())
        assert abs(ssim(pred, g) - ref) <= 1e-6
    # integer input (as stored in the file) is handled like skimage's float64 path
    pred_i = np.round(gaussian_filter(gt, 0.7)).astype(np.int16)
    ref = skm.structural_similarity(
        pred_i.astype(np.float64), gt, data_range=gt.max() - gt.min()
    )
    assert abs(ssim(pred_i, anat) - ref) <= 1e-6


def _brute_force_factors(pred, gt, win, c1, c2):
    """SSIM's factors at every interior voxel, one window at a time (numpy only)."""
    pad = win // 2
    out = []
    for i in range(pad, gt.shape[0] - pad):
        for j in range(pad, gt.shape[1] - pad):
            for k in range(pad, gt.shape[2] - pad):
                box = (slice(i - pad, i + pad + 1), slice(j - pad, j + pad + 1), slice(k - pad, k + pad + 1))
                x, y = pred[box].ravel(), gt[box].ravel()
                sx, sy = x.std(ddof=1), y.std(ddof=1)
                sxy = np.cov(x, y, ddof=1)[0, 1]
                out.append(((2 * x.mean() * y.mean() + c1) / (x.mean() ** 2 + y.mean() ** 2 + c1),
                            (2 * sx * sy + c2) / (sx * sx + sy * sy + c2),
                            (sxy + c2 / 2) / (sx * sy + c2 / 2)))
    return np.mean(out, axis=0)


def test_ssim_factors_match_one_window_at_a_time_and_multiply_to_ssim():
    rng = np.random.default_rng(3)
    gt = gaussian_filter(rng.random((11, 10, 9)), 1.0)
    pred = 0.6 * gt + 0.05 * rng.standard_normal(gt.shape)
    rng_gt = gt.max() - gt.min()
    c1, c2 = (0.01 * rng_gt) ** 2, (0.03 * rng_gt) ** 2
    got = ssim_factors(pred, gt, win_size=5)
    want = _brute_force_factors(pred, gt, 5, c1, c2)
    np.testing.assert_allclose([got["luminance"], got["contrast"], got["structure"]], want, rtol=1e-9)
    # per voxel, luminance x contrast x structure is the SSIM map
    lum, con, struct = _ssim_factor_maps(pred, gt, rng_gt, 5, 0.01, 0.03)
    assert (lum * con * struct)[2:-2, 2:-2, 2:-2].mean() == pytest.approx(ssim(pred, gt, win_size=5), rel=1e-12)


def test_ssim_scores_equal_separate_ssim_and_factor_calls():
    """One pass over the windows gives exactly what ssim (whole, masked) and ssim_factors give."""
    from arssr_jax.metrics import ssim_scores

    rng = np.random.default_rng(5)
    gt = gaussian_filter(rng.random((14, 12, 11)), 1.0)
    pred = 0.7 * gt + 0.03 * rng.standard_normal(gt.shape)
    head = gt > np.median(gt)
    got = ssim_scores(pred, gt, data_range=1.0, masks={"ssim": None, "ssim_head": head}, factors=True)
    assert got["ssim"] == ssim(pred, gt, data_range=1.0)
    assert got["ssim_head"] == ssim(pred, gt, data_range=1.0, mask=head)
    assert {k: got[k] for k in ("luminance", "contrast", "structure")} == ssim_factors(pred, gt, data_range=1.0)
    assert set(ssim_scores(pred, gt)) == {"ssim"}
    with pytest.raises(ArSSRError, match="mask"):
        ssim_scores(pred, gt, masks={"ssim": head[:-1]})


def test_ssim_factors_tell_a_smooth_copy_from_a_wrong_one(anat):
    gt = anat.astype(np.float64)
    same = ssim_factors(gt, gt)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in same.values())
    # halving the detail around the mean keeps the structure (a positive affine map of the
    # truth correlates perfectly) and costs contrast
    halved = ssim_factors(0.5 * gt + 0.5 * gt.mean(), gt)
    assert halved["structure"] == pytest.approx(1.0, abs=1e-9)
    assert halved["contrast"] < 0.95
    # added noise keeps most of the contrast and costs structure
    rng = np.random.default_rng(0)
    noisy = ssim_factors(gt + rng.normal(0, 0.5 * gt.std(), gt.shape), gt)
    assert noisy["structure"] < 0.9 < noisy["contrast"]
    # the mask selects like ssim's
    mask = gt > np.median(gt)
    assert set(ssim_factors(gt, gt, mask=mask)) == {"luminance", "contrast", "structure"}


def test_identical_images(anat):
    gt = anat.astype(np.float64)
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert ssim(gt[:, :, 10], gt[:, :, 10]) == pytest.approx(1.0, abs=1e-12)
    d = dice(gt, gt)
    assert set(d) == {"csf", "gm", "wm", "mean"}
    assert all(v == 1.0 for v in d.values())


# ------------------------------------------------------------------ PSI / LPC-SI


def test_psi_closed_form_edges():
    step = np.zeros((96, 96))
    step[48:] = 1.0
    assert psi(step) == pytest.approx(1.0)  # one-pixel edge, no JNB correction
    assert psi(step.T) == 0.0  # as PSI.m: only horizontal edges (gradient near +-90 deg) are measured
    rows = np.arange(96)[:, None] * np.ones((1, 96))
    ramp = np.clip((rows - 40) / 6.0, 0.0, 1.0)  # width 6 >= w_JNB: 6 - slope(1/6)
    assert psi(ramp) == pytest.approx(1.0 / (6.0 - 1.0 / 6.0))
    assert psi(1.0 - ramp) == pytest.approx(1.0 / (6.0 - 1.0 / 6.0))  # gradient at -90 deg
    assert psi(np.full((64, 64), 3.0)) == 0.0
    # PSI.m pools only the inner blocks: the edge must lie in rows 32..63 of a 96-row image,
    # and an image with fewer than 3 whole blocks per side scores 0.
    assert psi(np.roll(step, 20, axis=0)) == 0.0  # edge at row 68: in the outer ring of blocks
    assert psi(step[:95]) == 0.0
    assert psi(np.pad(step, ((0, 31), (0, 31)), mode="edge")) == pytest.approx(1.0)  # partial blocks ignored


def _mni_slices(mni):
    return [mni[:, :, 90], mni[:, 110, :], mni[98, :, :]]


def test_lpc_si_strictly_decreases_with_blur(mni):
    for sl in _mni_slices(mni):
        scores = [lpc_si(_blur(sl, s)) for s in SIGMAS]
        assert all(np.isfinite(scores))
        assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_psi_ranks_sharp_above_blurred(mni):
    # The original PSI.m is not monotone under small blur steps on these slices (it pools the
    # sharpest 22 % of a few dozen blocks): e.g. the axial slice scores 0.319, 0.264, 0.298,
    # 0.253, 0.093 for sigma 0, 0.5, 1, 1.5, 2. What holds: the sharp slice scores highest and
    # sigma 2 scores below every sigma <= 1.
    for sl in _mni_slices(mni):
        scores = dict((s, psi(_blur(sl, s))) for s in SIGMAS)
        assert scores[0.0] == max(scores.values()), scores
        assert all(scores[2.0] < scores[s] for s in (0.0, 0.5, 1.0)), scores


def test_lpc_si_range(mni):
    sl = mni[:, :, 90]
    assert 0.0 <= lpc_si(sl) <= 1.0
    assert lpc_si(np.zeros((40, 40))) == 0.0
    # intensity scale does not matter (normalised to the image's range by default)
    assert lpc_si(sl * 1000.0 + 5.0) == pytest.approx(lpc_si(sl), rel=1e-9)
    assert psi(sl * 1000.0 + 5.0) == pytest.approx(psi(sl), rel=1e-9)


# ---------------------------------------------------------------------- slicewise


def test_slicewise_skips_empty_slices(anat):
    vol = anat.astype(np.float64)
    vol -= vol.min()  # background 0
    padded = np.pad(vol, ((0, 0), (0, 0), (6, 6)))  # 12 empty axial slices
    value = slicewise(lpc_si, padded)
    assert np.isfinite(value)
    per_axis = slicewise_per_axis(lpc_si, padded)
    assert set(per_axis) == {0, 1, 2}
    assert value == pytest.approx(np.mean(list(per_axis.values())))
    # the empty slices along k are not scored: same mean as without padding
    assert per_axis[2] == pytest.approx(slicewise_per_axis(lpc_si, vol, axes=(2,))[2])
    # with an explicit mask, exactly the slices with foreground fraction >= min_foreground are averaged
    mask = np.zeros(padded.shape, bool)
    mask[:, :, 6:-6] = vol > np.median(vol)
    mask[:, :, 8] = False  # a slice with too little foreground ...
    mask[10:13, 10:13, 8] = True  # ... (9 voxels) is skipped, not scored
    kept = [k for k in range(padded.shape[2]) if mask[:, :, k].mean() >= 0.2]
    assert 5 not in kept and 8 not in kept and 6 in kept and len(kept) > 5
    manual = np.mean([lpc_si(padded[:, :, k]) for k in kept])
    got = slicewise_per_axis(lpc_si, padded, mask=mask, axes=(2,), min_foreground=0.2)[2]
    assert got == pytest.approx(manual)


def test_slicewise_reference_metric(anat):
    gt = np.pad(anat.astype(np.float64) - anat.min(), 4)
    pred = gaussian_filter(gt, 1.0)
    s = slicewise(ssim, pred, gt)
    assert np.isfinite(s) and 0 < s < 1
    p = slicewise(psnr, pred, gt)
    assert np.isfinite(p)
    assert slicewise(ssim, gt, gt) == pytest.approx(1.0)
    with pytest.raises(ArSSRError):
        slicewise(lpc_si, gt, mask=np.zeros(gt.shape, bool))


# ----------------------------------------------------------------------------- Dice


def test_dice_perturbations(anat):
    gt = anat.astype(np.float64)
    blurred = dice(gaussian_filter(gt, 1.0), gt)
    assert all(0.0 <= v < 1.0 for v in blurred.values())
    # the segmentation is fitted on the ground truth only: a rescaled prediction
    # is classified with the ground truth's thresholds and loses agreement
    scaled = dice(gt * 1.1, gt)
    assert scaled["mean"] < 0.9
    assert scaled == dice(gt * 1.1, gt, model=fit_tissue_model(gt))
    # (had each image been segmented with its own fit, scaling would change nothing)
    own = segment(gt * 1.1, fit_tissue_model(gt * 1.1))
    assert np.mean(own == segment(gt, fit_tissue_model(gt))) > 0.999
    mild = dice(gt + np.random.default_rng(1).normal(0, 100, gt.shape), gt)
    strong = dice(gt + np.random.default_rng(1).normal(0, 800, gt.shape), gt)
    assert 1.0 > mild["mean"] > strong["mean"]


def test_segmentation_classes_ordered(anat):
    gt = anat.astype(np.float64)
    model = fit_tissue_model(gt)
    labels = segment(gt, model)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    means = [gt[labels == k].mean() for k in range(4)]
    assert means == sorted(means)


# ---------------------------------------------------------------------- errors


def _raises(fn, *args, match=None, **kwargs):
    with pytest.raises(ArSSRError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_user_errors():
    rng = np.random.default_rng(0)
    a = rng.random((10, 11, 12))
    b = rng.random((10, 11, 13))
    nan = a.copy()
    nan[1, 2, 3] = np.nan
    inf = a.copy()
    inf[0, 0, 0] = np.inf
    for fn in (psnr, ssim, dice):
        _raises(fn, a, b, match="shape")
        _raises(fn, nan, a, match="NaN")
        _raises(fn, a, inf, match="NaN or infinite")
        _raises(fn, a.astype(complex), a, match="dtype")
        _raises(fn, a, a > 0.5, match="dtype")
        _raises(fn, np.array(["x"] * a.size).reshape(a.shape), a, match="dtype")
    _raises(psnr, a, np.ones_like(a), match="constant")
    _raises(ssim, a, np.ones_like(a), match="constant")
    _raises(ssim, a[None], a[None], match="4D")
    _raises(ssim, a[:5], a[:5], match="window")
    _raises(psi, a, match="3D")
    _raises(psi, a[:, :, 0], match="block")
    _raises(lpc_si, a[:5, :5, 0], match="small")
    _raises(lpc_si, nan[:, :, 3], match="NaN")
    _raises(slicewise, lpc_si, a[:, :, 0], match="2D")
    _raises(slicewise, lpc_si, a, b, match="shape")
    _raises(slicewise, "psi", a, match="callable")
    _raises(dice, a, np.zeros_like(a), match="constant")


def test_no_jax_or_skimage_at_runtime():
    src = pathlib.Path(__file__).resolve().parents[1] / "arssr_jax" / "metrics"
    for path in src.glob("*.py"):
        text = path.read_text()
        assert "import jax" not in text and "from jax" not in text, path
        assert "import skimage" not in text and "from skimage" not in text, path
    code = "import sys, arssr_jax.metrics; assert 'skimage' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(src.parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
