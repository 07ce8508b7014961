"""Many scans in one run (`upsample IN... --out-dir`, Upsampler) and a CLI that starts fast."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from arssr_jax import ArSSRError, Upsampler, inference
from arssr_jax.cli import build_parser, main, output_name
from arssr_jax.weights import read_model_dir
from arssr_jax.weights import model_dir


def scan(path, shape=(6, 7, 5), seed=0):
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return str(path)


def test_many_inputs_one_model_and_one_compile_per_shape(tmp_path, tiny_dir, capsys, monkeypatch):
    inputs = [scan(tmp_path / f"s{i}.nii.gz", seed=i) for i in range(3)] + [scan(tmp_path / "t.nii", (5, 5, 5))]
    loads = []
    real = model_dir.read_model_dir
    monkeypatch.setattr(model_dir, "read_model_dir", lambda *a: loads.append(a) or real(*a))
    encoders, decoders = inference._encode_one._cache_size(), inference._decode_chunk._cache_size()
    out = tmp_path / "out"  # created
    assert main(["upsample", *inputs, "--out-dir", str(out), "--scale", "2", "--model", tiny_dir, "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert sorted(os.listdir(out)) == ["s0_sr.nii.gz", "s1_sr.nii.gz", "s2_sr.nii.gz", "t_sr.nii.gz"]
    assert len(loads) == 1
    assert inference._encode_one._cache_size() - encoders <= 2  # two input shapes
    assert inference._decode_chunk._cache_size() - decoders <= 2
    # Each output equals the single-file form's.
    single = tmp_path / "single.nii.gz"
    assert main(["upsample", inputs[1], str(single), "--scale", "2", "--model", tiny_dir, "--quiet"]) == 0
    np.testing.assert_array_equal(nib.load(out / "s1_sr.nii.gz").get_fdata(), nib.load(single).get_fdata())
    np.testing.assert_array_equal(nib.load(out / "s1_sr.nii.gz").affine, nib.load(single).affine)


def test_a_scan_named_as_the_output_is_not_overwritten(tmp_path, tiny_dir, capsys):
    """`upsample a b` meant as two inputs must not replace scan b; a previous output is replaced silently."""
    a, b = scan(tmp_path / "a.nii.gz"), scan(tmp_path / "b.nii.gz", seed=1)
    before = Path(b).read_bytes()
    assert main(["upsample", a, b, "--scale", "2", "--model", tiny_dir, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "b.nii.gz exists and was not written by arssr-jax" in err and "--overwrite" in err
    assert Path(b).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.nii.gz"]
    # Batch mode refuses before any work; no output is written.
    out = tmp_path / "o"
    out.mkdir()
    foreign = scan(out / "b_sr.nii.gz", seed=2)
    assert main(["upsample", a, b, "--out-dir", str(out), "--scale", "2", "--model", tiny_dir, "--quiet"]) == 2
    assert "b_sr.nii.gz exists" in capsys.readouterr().err and sorted(os.listdir(out)) == ["b_sr.nii.gz"]
    # Its own output is marked, keeps the input's description after the mark, and is replaced on a rerun.
    image = nib.load(a)
    image.header["descrip"] = b"TE=4.2"
    nib.save(image, a)
    sr = tmp_path / "a_sr.nii.gz"
    for _ in range(2):
        assert main(["upsample", a, str(sr), "--scale", "2", "--model", tiny_dir, "--quiet"]) == 0
    assert bytes(nib.load(sr).header["descrip"]).rstrip(b"\0") == b"arssr-jax; TE=4.2"
    # --overwrite replaces a foreign file.
    assert main(["upsample", a, b, "--scale", "2", "--model", tiny_dir, "--quiet", "--overwrite"]) == 0
    assert nib.load(b).shape == (12, 14, 10) and Path(b).read_bytes() != before
    assert main(["upsample", a, b, "--out-dir", str(out), "--scale", "2", "--model", tiny_dir, "--quiet",
                 "--overwrite"]) == 0
    assert bytes(nib.load(foreign).header["descrip"]).startswith(b"arssr-jax")


def test_a_bad_input_is_reported_and_skipped(tmp_path, tiny_dir, capsys):
    good = [scan(tmp_path / "a.nii.gz"), scan(tmp_path / "c.nii.gz", seed=2)]
    bad = tmp_path / "b.nii.gz"
    bad.write_text("not an image")
    missing = tmp_path / "gone.nii.gz"
    out = tmp_path / "out"
    code = main(["upsample", good[0], str(bad), str(missing), good[1], "--out-dir", str(out),
                 "--pattern", "{stem}-x2.nii", "--scale", "2", "--model", tiny_dir])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in captured.err, captured.err
    assert str(bad) in lines[0] and str(missing) in lines[1]
    assert "2 of 4" in lines[2] and "failed" in lines[2]
    assert sorted(os.listdir(out)) == ["a-x2.nii", "c-x2.nii"]  # no temporaries, nothing for the bad ones
    assert captured.out.count("wrote ") == 2


@pytest.mark.parametrize("args, words", [
    (["--out-dir", "{out}", "--pattern", "same.nii.gz"], ["same output name", "{stem}"]),
    (["--out-dir", "{out}", "--pattern", "{stem}_{oops}.nii.gz"], ["--pattern", "{stem}"]),
    (["--out-dir", "{out}", "--pattern", "sub/{stem}.nii.gz"], ["not a file name"]),
    (["--out-dir", "{file}"], ["--out-dir", "existing file"]),
    (["--pattern", "{stem}.nii"], ["--out-dir"]),
    ([], ["IN OUT", "--out-dir"]),  # three paths and no --out-dir
])
def test_batch_usage_errors_are_one_line(tmp_path, tiny_dir, capsys, args, words):
    inputs = [scan(tmp_path / "a.nii.gz"), scan(tmp_path / "b.nii.gz"), scan(tmp_path / "c.nii.gz")]
    (tmp_path / "f").write_text("")
    args = [a.replace("{out}", str(tmp_path / "o")).replace("{file}", str(tmp_path / "f")) for a in args]
    assert main(["upsample", *inputs, *args, "--scale", "2", "--model", tiny_dir, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err, err
    for word in words:
        assert word in err, err


def test_same_stem_from_two_folders_is_refused_before_any_work(tmp_path, tiny_dir, capsys):
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    a, b = scan(tmp_path / "x" / "s.nii.gz"), scan(tmp_path / "y" / "s.nii")
    assert main(["upsample", a, b, "--out-dir", str(tmp_path / "o"), "--scale", "2", "--model", tiny_dir]) == 2
    assert "both be written" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "o")


def test_a_bad_model_fails_once(tmp_path, capsys):
    inputs = [scan(tmp_path / "a.nii.gz"), scan(tmp_path / "b.nii.gz")]
    assert main(["upsample", *inputs, "--out-dir", str(tmp_path / "o"), "--scale", "2",
                 "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err


def test_output_names():
    assert output_name("{stem}_sr.nii.gz", "/d/sub-01_T1w.nii.gz") == "sub-01_T1w_sr.nii.gz"
    assert output_name("{stem}.nii", "a.b.NII") == "a.b.nii"
    assert output_name("sr_{name}", "x/a.nii.gz") == "sr_a.nii.gz"
    with pytest.raises(ArSSRError, match="pattern"):
        output_name("{0}.nii", "a.nii")


def test_upsampler_matches_the_functions(tmp_path, tiny_dir):
    up = Upsampler(tiny_dir)
    volume = np.random.default_rng(3).random((6, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(up(volume, scale=2), inference.upsample(volume, tiny_dir, scale=2))
    np.testing.assert_array_equal(Upsampler(tiny_dir, normalize=False)(volume, shape=(9, 9, 9)),
                                  inference.upsample(volume, tiny_dir, shape=(9, 9, 9), normalize=False))
    path = scan(tmp_path / "in.nii.gz")
    written = up.nifti(path, tmp_path / "a.nii.gz", scale=1.5)
    inference.upsample_nifti(path, tmp_path / "b.nii.gz", tiny_dir, scale=1.5)
    np.testing.assert_array_equal(nib.load(tmp_path / "a.nii.gz").get_fdata(), nib.load(tmp_path / "b.nii.gz").get_fdata())
    assert written.shape == (9, 10, 7)
    with pytest.raises(ArSSRError, match="exactly one"):
        up(volume)
    assert Upsampler(up.model).config == up.config  # a (module, params) pair is a model too


def test_parameter_shapes_are_cached_and_still_checked(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("ARSSR_JAX_CACHE", str(tmp_path / "cache"))
    config, params, _ = read_model_dir(tiny_dir)
    (cached,) = os.listdir(tmp_path / "cache")
    assert cached.startswith("arssr-param-shapes-")
    params["decoder"]["stage_two_1"]["bias"] = np.zeros(3, np.float32)  # wrong shape, shapes now from the cache
    with pytest.raises(ArSSRError, match="do not fit"):
        model_dir.check_params(config, params, "m")
    (tmp_path / "cache" / cached).write_text("{damaged")  # recomputed
    assert model_dir.check_params(config, read_model_dir(tiny_dir)[1], "m") is None


def test_upsample_does_not_import_the_training_stack(tmp_path, tiny_dir):
    path = scan(tmp_path / "a.nii.gz")
    heavy = ["arssr_jax.training", "orbax.checkpoint", "optax", "grain", "matplotlib", "tensorstore"]
    code = (
        "import sys\nfrom arssr_jax.cli import main\n"
        f"assert main(['upsample', {path!r}, {str(tmp_path / 'o.nii.gz')!r}, '--scale', '2', '--model', {tiny_dir!r},"
        " '--quiet']) == 0\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "ARSSR_JAX_CACHE": "off", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_train_keeps_its_full_parser():
    train = build_parser("train")._subparsers._group_actions[0].choices["train"]
    assert any("--workdir" in a.option_strings for a in train._actions)
    assert "train" in build_parser("upsample").format_help()


def test_progress_bar_over_files_on_a_terminal(tmp_path, tiny_dir, capsys, monkeypatch):
    inputs = [scan(tmp_path / "a.nii.gz"), str(tmp_path / "missing.nii.gz"), scan(tmp_path / "c.nii.gz")]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code = main(["upsample", *inputs, "--out-dir", str(tmp_path / "o"), "--scale", "2", "--model", tiny_dir])
    captured = capsys.readouterr()
    assert code == 2
    assert "upsample" in captured.err and "scan" in captured.err  # the bar
    assert "missing.nii.gz" in captured.err and "1 of 3" in captured.err
    assert captured.out.count("wrote ") == 2
