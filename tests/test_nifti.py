import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from arssr_jax import nifti
from arssr_jax.errors import ArSSRError
from arssr_jax.nifti import Volume, check_output_path, load, save

ANAT = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")

# rotation + shear + anisotropic voxels + translation; float32-representable so NIfTI-1 keeps it bit-exact
OBLIQUE = np.array(
    [
        [0.9, 0.2, 0.1, -10.3],
        [-0.15, 1.1, 0.3, 5.7],
        [0.05, -0.2, 2.5, 3.25],
        [0.0, 0.0, 0.0, 1.0],
    ]
).astype(np.float32).astype(np.float64)


def _write(path, data, affine=None, dtype=None):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def _err(fn, *args, **kwargs):
    with pytest.raises(ArSSRError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_round_trip_oblique_exact(tmp_path, ext):
    data = _rand((5, 6, 7))
    out = tmp_path / f"out{ext}"
    save(Volume(data, OBLIQUE), out)
    v = load(out)
    assert v.data.dtype == np.float32 and v.data.shape == (5, 6, 7)
    np.testing.assert_array_equal(v.data, data)
    np.testing.assert_array_equal(v.affine, OBLIQUE)
    np.testing.assert_allclose(v.voxel_size, np.linalg.norm(OBLIQUE[:3, :3], axis=0))
    hdr = nib.load(str(out)).header
    assert hdr.get_data_dtype() == np.float32
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(hdr.get_zooms(), v.voxel_size, rtol=1e-6)
    # qform carries the same voxel sizes and translation (shear cannot be stored there)
    np.testing.assert_allclose(hdr.get_qform()[:3, 3], OBLIQUE[:3, 3], rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == [f"out{ext}"]


def test_gz_output_is_gzip_and_deterministic(tmp_path):
    v = Volume(_rand((4, 4, 4)), OBLIQUE)
    save(v, tmp_path / "a.nii.gz")
    save(v, tmp_path / "b.nii.gz")
    raw_a = (tmp_path / "a.nii.gz").read_bytes()
    assert raw_a[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw_a)[:4] == (348).to_bytes(4, "little")
    # gzip member is named after the final file, so outputs differ only by that name
    assert b".tmp-" not in raw_a
    assert gzip.decompress(raw_a) == gzip.decompress((tmp_path / "b.nii.gz").read_bytes())


def test_real_file_round_trip_keeps_header_fields(tmp_path):
    src = load(ANAT)
    img = nib.load(ANAT)
    np.testing.assert_array_equal(src.data, img.get_fdata(dtype=np.float32))
    out = tmp_path / "anat_copy.nii.gz"
    save(src, out)
    back = load(out)
    np.testing.assert_array_equal(back.data, src.data)
    np.testing.assert_array_equal(back.affine, src.affine)
    h0, h1 = img.header, back.header
    assert h1.get_xyzt_units() == h0.get_xyzt_units()
    assert h1["descrip"] == h0["descrip"]
    for code in ("qform_code", "sform_code"):
        assert int(h1[code]) == (int(h0[code]) or 1)


def test_like_header_codes_and_units(tmp_path):
    like = nib.Nifti1Header()
    like.set_xyzt_units("micron", "msec")
    like["descrip"] = b"hello"
    like.set_sform(np.eye(4), code=2)
    like.set_qform(np.eye(4), code=4)
    out = tmp_path / "o.nii"
    save(Volume(_rand((3, 4, 5)), OBLIQUE), out, like_header=like)
    h = nib.load(str(out)).header
    assert h.get_xyzt_units() == ("micron", "msec")
    assert bytes(h["descrip"]).rstrip(b"\0") == b"hello"
    assert int(h["sform_code"]) == 2 and int(h["qform_code"]) == 4
    np.testing.assert_array_equal(load(out).affine, OBLIQUE)


def test_scaling_is_applied(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.5, 10.0)
    p = tmp_path / "scaled.nii"
    nib.save(img, str(p))
    v = load(p)
    np.testing.assert_allclose(v.data, raw * 0.5 + 10.0)
    np.testing.assert_allclose(v.voxel_size, [2.0, 2.0, 3.0])


def test_trailing_singleton_dims_are_squeezed(tmp_path):
    data = _rand((3, 4, 5))
    p = _write(tmp_path / "5d.nii", data.reshape(3, 4, 5, 1, 1))
    np.testing.assert_array_equal(load(p).data, data)


def test_volume_index_picks_volume(tmp_path):
    data = _rand((3, 4, 5, 6))
    p = _write(tmp_path / "4d.nii.gz", data)
    for i in (0, 4, 5):
        np.testing.assert_array_equal(load(p, volume_index=i).data, data[..., i])
    # a 5D file with a singleton 4th axis and the series along the 5th
    p5 = _write(tmp_path / "5d.nii", data.reshape(3, 4, 5, 1, 6))
    np.testing.assert_array_equal(load(p5, volume_index=2).data, data[..., 2])


# --------------------------------------------------------------------------- load errors


def test_missing_file(tmp_path):
    msg = _err(load, tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in msg and "no such file" in msg


def test_directory(tmp_path):
    assert "directory" in _err(load, tmp_path)


def test_text_file_named_nii(tmp_path):
    p = tmp_path / "x.nii"
    p.write_text("this is not an image\n" * 40)
    msg = _err(load, p)
    assert "x.nii" in msg and "NIfTI" in msg
    q = tmp_path / "y.nii.gz"
    q.write_bytes(b"not gzip at all")
    assert "y.nii.gz" in _err(load, q)


def test_truncated_file(tmp_path):
    p = _write(tmp_path / "t.nii", _rand((8, 8, 8)))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 100])
    msg = _err(load, p)
    assert "t.nii" in msg and "corrupt" in msg


def test_2d_refused(tmp_path):
    msg = _err(load, _write(tmp_path / "flat.nii", _rand((6, 7))))
    assert "flat.nii" in msg and "2D" in msg and "3D" in msg


def test_single_slice_refused(tmp_path):
    msg = _err(load, _write(tmp_path / "slice.nii", _rand((6, 7, 1))))
    assert "slice" in msg and "3D" in msg


def test_4d_needs_volume_index(tmp_path):
    p = _write(tmp_path / "four.nii", _rand((3, 4, 5, 6)))
    msg = _err(load, p)
    assert "four.nii" in msg and "--volume-index" in msg and "6 volumes" in msg
    for bad in (6, -1):
        msg = _err(load, p, volume_index=bad)
        assert "out of range" in msg and "6 volume" in msg
    assert "out of range" in _err(load, _write(tmp_path / "three.nii", _rand((3, 4, 5))), volume_index=1)


def test_nan_inf_counted(tmp_path):
    data = _rand((4, 4, 4))
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    data[2, 2, 2] = -np.inf
    msg = _err(load, _write(tmp_path / "nan.nii", data))
    assert "3 NaN" in msg and "2 Inf" in msg


def test_complex_refused(tmp_path):
    data = (_rand((3, 4, 5)) + 1j * _rand((3, 4, 5), 1)).astype(np.complex64)
    msg = _err(load, _write(tmp_path / "cplx.nii", data))
    assert "complex" in msg


def test_rgb_refused(tmp_path):
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    msg = _err(load, _write(tmp_path / "rgb.nii", rgb))
    assert "non-numeric" in msg


def _raw(path, shape, data=b"", srow_y=(0, 1, 0, 0), gz=False):
    """A NIfTI-1 file written field by field (nibabel would refuse some of these headers): float32
    voxels ``data`` after a header claiming ``shape``, with ``srow_y`` as the sform's second row."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], list(srow_y), [0, 0, 1, 0]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["vox_offset"] = 352
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + data)
    return path


@pytest.mark.parametrize("srow_y", [[0, 0, 0, 0], [0, np.nan, 0, 0], [0, np.inf, 0, 0]], ids=["zero", "nan", "inf"])
def test_one_affine_rule_for_load_load_grid_and_save(tmp_path, srow_y):
    data = _rand((3, 4, 5))
    p = _raw(tmp_path / "deg.nii", data.shape, data.tobytes(order="F"), srow_y=srow_y)
    rule = "has a degenerate voxel-to-world affine"
    for msg in (_err(load, p), _err(nifti.load_grid, p)):
        assert "deg.nii" in msg and rule in msg and "pixdim / sform / qform" in msg
    affine = np.eye(4)
    affine[1] = srow_y
    msg = _err(save, Volume(data, affine), tmp_path / "out.nii")
    assert "out.nii" in msg and rule in msg
    assert os.listdir(tmp_path) == ["deg.nii"]


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_a_header_claiming_more_than_the_file_holds_is_damage_not_a_memory_problem(tmp_path, ext):
    p = _raw(tmp_path / f"huge{ext}", (5000, 5000, 5000), b"\0" * 16000, gz=ext.endswith(".gz"))  # 16 KB of voxels
    msg = _err(load, p)
    assert f"huge{ext}" in msg and "truncated or corrupt" in msg and "5000x5000x5000" in msg, msg
    assert "GiB" not in msg and "larger machine" not in msg, msg
    assert nifti.load_grid(p)[0] == (5000, 5000, 5000)  # the grid needs the header only


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_only_a_file_that_holds_its_voxels_gets_the_memory_message(tmp_path, monkeypatch, ext):
    from arssr_jax.nifti import reading

    monkeypatch.setattr(reading, "host_available_bytes", lambda: 1000)
    p = _write(tmp_path / f"real{ext}", _rand((8, 8, 8)))
    msg = _err(load, p)
    assert f"real{ext}" in msg and "GiB" in msg and "larger machine" in msg and "corrupt" not in msg, msg
    monkeypatch.setattr(reading, "_STREAM_CHECK_BYTES", 0)  # a compressed file is then counted first
    short = _raw(tmp_path / f"short{ext}", (20, 20, 20), b"\0" * 16000, gz=ext.endswith(".gz"))  # 32000 claimed
    msg = _err(load, short)
    assert "truncated or corrupt" in msg and "GiB" not in msg, msg


# --------------------------------------------------------------------------- atomic save


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("exc", [RuntimeError, OSError])
def test_save_failure_leaves_nothing(tmp_path, monkeypatch, ext, exc):
    def broken(self, file_map, *a, **k):
        file_map["image"].fileobj.write(b"\0" * 1000)  # half-written
        raise exc("disk on fire")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", broken)
    out = tmp_path / f"out{ext}"
    with pytest.raises(ArSSRError if exc is OSError else RuntimeError):
        save(Volume(_rand((3, 4, 5)), np.eye(4)), out)
    assert os.listdir(tmp_path) == []

    out.write_bytes(b"old content")
    with pytest.raises(ArSSRError if exc is OSError else RuntimeError):
        save(Volume(_rand((3, 4, 5)), np.eye(4)), out)
    assert out.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == [out.name]


def test_save_replaces_existing(tmp_path):
    out = tmp_path / "o.nii"
    out.write_bytes(b"old")
    data = _rand((3, 4, 5))
    save(Volume(data, np.eye(4)), out)
    np.testing.assert_array_equal(load(out).data, data)
    assert os.listdir(tmp_path) == ["o.nii"]


def test_save_checks_path(tmp_path):
    v = Volume(_rand((3, 4, 5)), np.eye(4))
    assert ".nii" in _err(save, v, tmp_path / "o.png")
    assert "does not exist" in _err(save, v, tmp_path / "missing" / "o.nii")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- check_output_path


def test_check_output_ok(tmp_path):
    check_output_path(tmp_path / "o.nii.gz", tmp_path / "in.nii.gz")
    check_output_path(tmp_path / "o.NII")


def test_check_output_extension(tmp_path):
    msg = _err(check_output_path, tmp_path / "o.mgz")
    assert ".nii.gz" in msg and "o.nii.gz" in msg


def test_check_output_is_directory(tmp_path):
    d = tmp_path / "d.nii"
    d.mkdir()
    assert "directory" in _err(check_output_path, d)


def test_check_output_missing_parent(tmp_path):
    msg = _err(check_output_path, tmp_path / "a" / "b" / "o.nii")
    assert "does not exist" in msg and "mkdir" in msg


def test_check_output_parent_is_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "not a directory" in _err(check_output_path, tmp_path / "f" / "o.nii")


def test_check_output_unwritable(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):  # root (or CAP_DAC_OVERRIDE) may write anyway
            check_output_path(d / "o.nii")
        else:
            assert "not writable" in _err(check_output_path, d / "o.nii")
    finally:
        d.chmod(0o700)


def test_check_output_equals_input(tmp_path):
    inp = _write(tmp_path / "in.nii.gz", _rand((3, 4, 5)))
    assert "input" in _err(check_output_path, inp, inp)
    # a relative spelling of the same path
    (tmp_path / "sub").mkdir()
    assert "input" in _err(check_output_path, tmp_path / "sub" / ".." / "in.nii.gz", inp)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(inp)
    assert "input" in _err(check_output_path, link, inp)
    assert "input" in _err(check_output_path, inp, link)
    hard = tmp_path / "hard.nii.gz"
    os.link(inp, hard)
    assert "input" in _err(check_output_path, hard, inp)


def test_volume_validation():
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 4)), np.eye(4))
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 4, 5)), np.eye(3))
    v = Volume(np.zeros((3, 4, 5), dtype=np.float64), np.diag([1, 2, 3, 1]))
    assert v.data.dtype == np.float32 and v.affine.dtype == np.float64
    np.testing.assert_allclose(v.voxel_size, [1, 2, 3])
    assert nifti.NIFTI_EXTENSIONS == (".nii.gz", ".nii")


def test_check_overwrite_refuses_only_files_arssr_did_not_write(tmp_path):
    from arssr_jax.nifti import check_overwrite, output_description

    check_overwrite(tmp_path / "new.nii.gz")  # nothing there: fine
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(ArSSRError, match="notes.nii.gz exists and was not written by arssr-jax"):
        check_overwrite(text)
    ours = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    ours.header["descrip"] = output_description(None)
    nib.save(ours, tmp_path / "ours.nii")
    check_overwrite(tmp_path / "ours.nii")
    long = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    long.header["descrip"] = b"x" * 79
    assert output_description(long.header) == b"arssr-jax; " + b"x" * 69  # 80 bytes, the mark first
