"""Evaluation: LR simulation, the evaluate.py CLI end to end (simulated and real-scan), tables."""

import csv
import math
import os
import subprocess
import sys

import jax
import nibabel
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.coords import centre_positions
from arssr_jax.data.degrade import degrade
from arssr_jax.errors import ArSSRError
from arssr_jax.evaluation import edges, protocol, tables
from arssr_jax.evaluation.cli import main
from arssr_jax.evaluation.simulate import lr_shape_for, simulate, simulate_lr
from arssr_jax.metrics import psnr, ssim_factors
from arssr_jax import interpolation as interp
from arssr_jax.models import ModelConfig, baselines as B, build_model, init_params
from arssr_jax.weights.baseline_dir import save_baseline
from arssr_jax.weights import save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
SRCNN_TINY = {"kernels": [3, 1, 3], "filters": [8, 4]}


def numpy_params(init, seed=0):
    """Random parameters with the shapes ``init()`` would give, drawn with numpy (fast on a small CPU)."""
    shapes = jax.eval_shape(init)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        values = rng.normal(0.0, fan_in ** -0.5, leaf.shape) if len(leaf.shape) > 1 else 0.01 * rng.normal(size=leaf.shape)
        return np.asarray(values, np.float32)

    return jax.tree_util.tree_map(draw, shapes)


def normalised_anatomical():
    data = nibabel.load(ANATOMICAL).get_fdata()
    return ((data - data.min()) / (data.max() - data.min())).astype(np.float32)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    config = ModelConfig(encoder="ResCNN", feature_dim=8, decoder_depth=4, decoder_width=16,
                         encoder_options={"num_features": 4, "num_blocks": 1, "convs_per_block": 1})
    params = numpy_params(lambda: init_params(build_model(config), jax.random.key(0)))
    arssr = save_model(root / "arssr_tiny", config, params)
    module = B.build_baseline("SRCNN3D", SRCNN_TINY)
    baseline = save_baseline(root / "srcnn_x2", "SRCNN3D", 2.0,
                               numpy_params(lambda: B.init_baseline(module, jax.random.key(0))), SRCNN_TINY)
    return {"arssr": str(arssr), "baseline": str(baseline), "root": root}


# ------------------------------------------------------------------ simulation


def test_lr_shape_rounds_half_up_and_checks_the_scale():
    assert lr_shape_for((33, 41, 25), 2) == (17, 21, 13)
    assert lr_shape_for((33, 41, 25), 3.5) == (9, 12, 7)
    with pytest.raises(ArSSRError):
        lr_shape_for((10, 10, 10), 0.5)
    with pytest.raises(ArSSRError, match="unknown degradation"):
        simulate_lr(np.zeros((8, 8, 8)), 2, "bicubic")


def test_centred_simulation_samples_the_lr_voxel_centres():
    hr = np.random.default_rng(0).random((21, 17, 12)).astype(np.float32)
    lr = simulate_lr(hr, 2.5, "centred")
    assert lr.shape == (8, 7, 5)
    points = np.meshgrid(*[centre_positions(n, m) for m, n in zip(hr.shape, lr.shape)], indexing="ij")
    expected = ndimage.map_coordinates(hr.astype(np.float64), points, order=3, mode="reflect")
    np.testing.assert_allclose(lr, expected, atol=1e-6)
    cube = hr[:12, :12, :12]  # a cube goes through the training pipeline's degrade() itself
    np.testing.assert_array_equal(simulate_lr(cube, 3, "centred"), degrade(cube, 4, "centred"))
    case = simulate(hr, 2.5)
    assert case.realised == (21 / 8, 17 / 7, 12 / 5)


def test_reference_simulation_is_scipy_zoom():
    hr = np.random.default_rng(1).random((20, 16, 12)).astype(np.float32)
    lr = simulate_lr(hr, 2, "reference")
    np.testing.assert_allclose(lr, ndimage.zoom(hr, 0.5, order=3), atol=1e-6)


# ------------------------------------------------------------------ evaluate.py, simulated mode


@pytest.fixture(scope="module")
def simulated(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    rc = main([ANATOMICAL, "--out", str(out), "--scales", "2,3", "--arssr", f"tiny={models['arssr']}",
               "--baseline", f"SRCNN3D:{models['baseline']}", "--quiet"])
    assert rc == 0
    return out


def test_simulated_tables_have_the_paper_layout(simulated):
    rows = read_csv(simulated / "results.csv")
    assert [(r["scale"], r["model"]) for r in rows] == [
        ("", "ground truth"), ("2", "tricubic"), ("2", "SRCNN3D"), ("2", "tiny"), ("3", "tricubic"), ("3", "tiny")]
    header = list(rows[0])
    assert header[:4] == ["scale", "model", "kind", "n_volumes"]
    for metric in ("psnr", "ssim", "psi", "lpc_si", "dice", "dice_csf", "dice_gm", "dice_wm"):
        assert metric in header and f"{metric}_std" in header
    assert rows[0]["psnr"] == "" and float(rows[0]["lpc_si"]) > 0  # the ground truth: no-reference only
    assert all(np.isfinite(float(r["psnr"])) and 0 <= float(r["dice"]) <= 1 for r in rows[1:])
    # The table's tricubic row is the metric of the tricubic upsampling of the simulated LR.
    hr = normalised_anatomical()
    direct = psnr(interp.tricubic(simulate_lr(hr, 2.0), shape=hr.shape), hr)
    assert float(rows[1]["psnr"]) == pytest.approx(direct, abs=1e-6)

    assert "| anatomical.nii | ×3 | tiny |" in (simulated / "versus_tricubic.md").read_text()
    md = (simulated / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ×")]
    assert len(table) == 5 and table[0].startswith("| ×2 | tricubic |")
    assert "| Scale | Model | PSNR (dB) | SSIM | PSI | LPC-SI | Dice |" in md
    per_volume = read_csv(simulated / "results_per_volume.csv")
    assert len(per_volume) == 6 and per_volume[1]["volume"] == ANATOMICAL


def test_simulated_figures_are_pngs(simulated):
    for name in ("slices_x3.png", "profile_x3.png", "errors_x3.png"):
        assert (simulated / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ evaluate.py, real-scan mode


def test_real_scan_mode_reports_only_no_reference_metrics(models, tmp_path):
    data = nibabel.load(ANATOMICAL).get_fdata()[4:24, 6:30, 4:21]  # a small LR "scan", 20x24x17
    scan = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data.astype(np.float32), np.eye(4)), scan)
    out = tmp_path / "real"
    rc = main(["--real", str(scan), "--out", str(out), "--scales", "2", "--arssr", models["arssr"],
               "--baseline", f"SRCNN3D:{models['baseline']}", "--quiet"])
    assert rc == 0
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == ["scale", "model", "kind", "n_volumes", "psi", "psi_std", "lpc_si", "lpc_si_std"]
    assert [r["model"] for r in rows] == ["tricubic", "SRCNN3D", "ArSSR-ResCNN"]
    # 40 x 48 x 34 outputs: no slice reaches PSI.m's 96 px (it would score 0), so PSI is n/a
    assert all(float(r["lpc_si"]) > 0 and r["psi"] == "" for r in rows)
    md = (out / "results.md").read_text()
    assert "PSNR" not in md and "no-reference" in md
    assert (out / "slices_x2.png").exists() and not (out / "errors_x2.png").exists()
    assert not (out / "versus_tricubic.md").exists()  # no ground truth: nothing to be faithful to


# ------------------------------------------------------------------ user errors


@pytest.mark.parametrize("args, message", [
    (["/no/such/file.nii"], "no such file"),
    ([ANATOMICAL, "--scales", "0.5"], "scale"),
    ([ANATOMICAL, "--real", ANATOMICAL], "not both"),
    ([ANATOMICAL, "--metrics", "psnr,lpips"], "unknown metric"),
    (["--real", ANATOMICAL, "--metrics", "psnr"], "no ground truth"),
    ([ANATOMICAL, "--arssr", "default", "--adapt-steps", "0"], "adapt steps"),
])
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_baseline_for_another_scale_is_refused(models, tmp_path, capsys):
    assert main([ANATOMICAL, "--out", str(tmp_path), "--scales", "3", "--baseline",
                 f"SRCNN3D:{models['baseline']}", "--quiet"]) == 2
    assert "trained for scale 2" in capsys.readouterr().err


def test_script_exits_non_zero_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval", "evaluate.py"), str(tmp_path / "missing.nii"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "missing.nii" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ tables


def test_tables_show_mean_and_std_over_volumes():
    records = [dict(volume=v, scale=2.0, model="tricubic", kind="interpolation", psnr=p, ssim=s)
               for v, p, s in (("a", 30.0, 0.9), ("b", 32.0, 0.8))]
    results = protocol.Results(records, ["tricubic"], [2.0], ("psnr", "ssim"), "simulated", "centred")
    rows = tables.aggregate(results)
    assert rows[0]["psnr"] == 31.0 and rows[0]["psnr_std"] == pytest.approx(np.sqrt(2.0))
    assert "| ×2 | tricubic | 31.00 ± 1.41 | 0.8500 ± 0.0707 |" in tables.markdown(results)


def test_versus_tricubic_counts_each_comparison_against_tricubic_on_the_same_volume_and_scale():
    nan = float("nan")
    bands = lambda *v: {f"mae_band_{k}": x for k, x in enumerate(v)}  # noqa: E731
    records = [
        dict(volume="d/a.nii", scale=2.0, model="tricubic", kind="interpolation", psnr=30.0, ssim=0.90, **bands(0.010, 0.020)),
        dict(volume="d/a.nii", scale=2.0, model="M", kind="arssr", psnr=31.0, ssim=0.89, **bands(0.011, 0.010)),
        dict(volume="d/b.nii", scale=2.0, model="tricubic", kind="interpolation", psnr=20.0, ssim=0.50, **bands(0.010, nan)),
        dict(volume="d/b.nii", scale=2.0, model="M", kind="arssr", psnr=nan, ssim=0.50, **bands(0.012, 0.001)),
    ]
    results = protocol.Results(records, ["tricubic", "M"], [2.0], ("psnr", "ssim", "bands"), "simulated", "centred")
    a, b = tables.versus_tricubic(results)
    # a: PSNR +1 met, SSIM -0.01 missed, worst band 0.011 / 0.010 = 1.10 met (the target is inclusive)
    assert (a["psnr"], a["ssim"], a["worst_band"]) == pytest.approx((1.0, -0.01, 1.1))
    assert (a["wins"], a["checks"]) == (2, 3)
    # b: PSNR not scored (not counted), SSIM equal (met), band 1 not scored by tricubic, band 0 1.2 (missed)
    assert math.isnan(b["psnr"]) and b["worst_band"] == pytest.approx(1.2) and (b["wins"], b["checks"]) == (1, 2)
    md = tables.versus_tricubic_markdown(results)
    assert "| a.nii | ×2 | M | +1.00 | -0.0100 | 1.100 | 2 of 3 |" in md
    assert "| b.nii | ×2 | M | n/a | +0.0000 | 1.200 | 1 of 2 |" in md
    assert "M: 3 of 5 met (2 volume-scale pairs)." in md
    assert tables.versus_tricubic_markdown(protocol.Results(records[:1], ["tricubic"], [2.0], ("psnr",),
                                                            "simulated", "centred")) == ""


def test_antialias_scores_an_lr_blurred_before_sampling(tmp_path, capsys):
    hr = normalised_anatomical()[:, :, :16]
    nibabel.save(nibabel.Nifti1Image(hr, np.eye(4)), tmp_path / "hr.nii.gz")
    out = tmp_path / "aa"
    assert main([str(tmp_path / "hr.nii.gz"), "--out", str(out), "--scales", "3", "--metrics", "psnr", "--antialias",
                 "--no-figures", "--quiet"]) == 0
    assert "HR blurred before sampling" in (out / "results.md").read_text()
    score = float(read_csv(out / "results.csv")[0]["psnr"])
    blurred = interp.tricubic(simulate_lr(hr, 3.0, antialias=True), shape=hr.shape)
    assert score == pytest.approx(psnr(blurred, hr), rel=1e-5)
    assert score != pytest.approx(psnr(interp.tricubic(simulate_lr(hr, 3.0), shape=hr.shape), hr), rel=1e-3)
    assert main([str(tmp_path / "hr.nii.gz"), "--out", str(out), "--antialias", "--degradation", "reference",
                 "--quiet"]) == 2
    assert "--antialias" in capsys.readouterr().err


def test_heldout_options_head_bands_clip_and_one_table_per_volume(tmp_path):
    """The model card's protocol: --clip-lr, --by-volume, psnr_head/ssim_head and bands, ArSSR as a user runs it."""
    data = normalised_anatomical()
    volumes = []
    for name, crop in (("first", data[:, :, :20]), ("second", data[:, :, 5:])):
        volumes.append(tmp_path / f"{name}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(crop, np.eye(4)), volumes[-1])
    out = tmp_path / "heldout"
    rc = main([str(v) for v in volumes] + ["--out", str(out), "--scales", "2", "--arssr", "ArSSR=default",
                                            "--metrics", "psnr,ssim_head,psnr_head,ssim_factors,bands", "--clip-lr",
                                            "--by-volume", "--no-figures", "--quiet"])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert md.count("### ") == 2 and "### first.nii.gz" in md and "LR clipped at 0" in md
    assert "PSNR head (dB)" in md and "SSIM contrast" in md and "worst / tricubic" in md
    rows = read_csv(out / "results_per_volume.csv")
    assert {"psnr_head", "ssim_head", "ssim_contrast", "mae_band_0", "mae_band_9"} <= set(rows[0])
    cubic = [r for r in rows if r["model"] == "tricubic"][0]
    hr = data[:, :, :20]
    lr = np.maximum(simulate_lr(hr, 2.0), 0.0)  # --clip-lr: the same LR the rows were scored on
    sr = interp.tricubic(lr, shape=hr.shape)
    head = protocol.head_mask(hr)
    assert float(cubic["psnr_head"]) == pytest.approx(psnr(sr, hr, mask=head), rel=1e-5)
    assert float(cubic["mae_band_0"]) == pytest.approx(protocol.band_errors(sr, hr)["mae_band_0"], rel=1e-5)
    factors = ssim_factors(sr, hr)
    for name in ("luminance", "contrast", "structure"):
        assert float(cubic[f"ssim_{name}"]) == pytest.approx(factors[name], rel=1e-5)
    # versus_tricubic.md: the model card's checks, from the same records
    versus = (out / "versus_tricubic.md").read_text()
    for volume in ("first", "second"):
        own = {r["model"]: r for r in rows if r["volume"].endswith(f"{volume}.nii.gz") and r["scale"] == "2"}
        beaten = [float(own["ArSSR"][m]) >= float(own["tricubic"][m]) for m in ("psnr", "psnr_head", "ssim_head")]
        worst = max(float(own["ArSSR"][k]) / float(own["tricubic"][k]) for k in own["ArSSR"]
                    if k.startswith("mae_band_") and own["ArSSR"][k] and own["tricubic"][k])
        line = [x for x in versus.splitlines() if x.startswith(f"| {volume}.nii.gz | ×2 | ArSSR |")]
        assert len(line) == 1 and line[0].endswith(f"| {worst:.3f} | {sum(beaten) + (worst <= 1.10)} of 4 |")


# ------------------------------------------------------------------ errors by depth below a mask's edge


def masked_cube(side=12, cube=8, rim=0.15, core=0.95):
    """Zeros with a centred cube: its outer layer at ``rim``, the rest at ``core``."""
    gt = np.zeros((side,) * 3, np.float32)
    start = (side - cube) // 2
    gt[start:start + cube, start:start + cube, start:start + cube] = rim
    gt[start + 1:start + cube - 1, start + 1:start + cube - 1, start + 1:start + cube - 1] = core
    return gt


def test_depth_labels_count_each_layer_of_a_cube():
    labels = edges.depth_labels(masked_cube(side=9, cube=5), deepest=4)
    assert (labels == edges.OUTSIDE).sum() == 6 * 25  # the background voxels sharing a face with the cube
    assert [(labels == k).sum() for k in (1, 2, 3, 4)] == [5 ** 3 - 3 ** 3, 3 ** 3 - 1, 1, 0]
    assert (edges.depth_labels(masked_cube(side=9, cube=5), deepest=2) == 2).sum() == 27


def test_edge_tables_need_a_masked_volume():
    with pytest.raises(ArSSRError, match="masked"):
        edges.depth_labels(np.random.default_rng(0).random((8, 8, 8)))


def test_edge_tables_give_each_layer_and_band_its_own_errors():
    gt = masked_cube()
    labels = edges.depth_labels(gt)
    reference = gt + 0.1  # the first output: the ratios are taken against it
    better_rim = gt + np.where(labels == 1, -0.05, 0.2)
    table = edges.edge_tables({"cubic": reference, "model": better_rim}, gt, protocol.band_index(gt)).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows["inside, layer 1"] == "| inside, layer 1 | 296 | +0.1000 | 0.1000 | -0.0500 | 0.0500 | 0.50 |"
    assert rows["inside, layer 2"].endswith("| 2.00 |")
    assert rows["background touching the mask"].startswith("| background touching the mask | 384 |")
    assert list(rows)[5:] == ["outer layer, band 1 (0.1-0.2)", "below it, band 9 (0.9-1.0)"]
    assert rows["outer layer, band 1 (0.1-0.2)"].startswith("| outer layer, band 1 (0.1-0.2) | 296 | +0.1000")
    assert rows["below it, band 9 (0.9-1.0)"].startswith("| below it, band 9 (0.9-1.0) | 216 | +0.1000")
    assert not any("outer layer, band 9" in line for line in table)


def test_thick_slice_script_reads_adapt_fields_by_their_types():
    sys.path.insert(0, os.path.join(ROOT, "eval"))
    try:
        import argparse

        from thick_slice import adapt_fields
    finally:
        sys.path.pop(0)
    parser = argparse.ArgumentParser()
    fields = adapt_fields(parser, ["lr_patch=12", "learning_rate=1e-3", "fwhm=2.5", "profile=gaussian",
                                   "isotropic=false"])
    assert fields == {"lr_patch": 12, "learning_rate": 1e-3, "fwhm": 2.5, "profile": "gaussian", "isotropic": False}
    assert type(fields["lr_patch"]) is int and type(fields["fwhm"]) is float
    assert adapt_fields(parser, ["isotropic=True"]) == {"isotropic": True}
    for bad in (["nosuch=1"], ["steps"], ["steps="], ["isotropic=yes"]):
        with pytest.raises(SystemExit):
            adapt_fields(parser, bad)


def test_edge_errors_script_scores_tricubic_and_the_model_as_upsample_runs_it(tmp_path):
    data = normalised_anatomical()[:, :, :20]
    masked = np.where(protocol.head_mask(data), data, 0.0).astype(np.float32)
    path = tmp_path / "masked.nii.gz"
    nibabel.save(nibabel.Nifti1Image(masked, np.eye(4)), path)
    script = os.path.join(ROOT, "eval", "edge_errors.py")
    done = subprocess.run([sys.executable, script, str(path), "--scales", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lr = np.maximum(simulate_lr(masked, 2.0), 0.0)
    cubic = interp.tricubic(lr, shape=masked.shape)
    labels = edges.depth_labels(masked)
    count, mean, mae = edges.region_errors(cubic, masked, labels == 1)
    assert f"| inside, layer 1 | {count} | {mean:+.4f} | {mae:.4f} |" in done.stdout
    assert "ArSSR MAE / tricubic's" in done.stdout
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "head.nii.gz")  # noisy background: refused
    done = subprocess.run([sys.executable, script, str(tmp_path / "head.nii.gz")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "masked" in done.stderr
