"""Tests for the torch-free, pickle-safe state_dict reader."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from arssr_jax.errors import ArSSRError  # noqa: E402
from arssr_jax.weights.torch_state_dict import read_state_dict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _expect_error(path, *fragments: str) -> str:
    with pytest.raises(ArSSRError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def _assert_same(result: dict, expected: dict) -> None:
    assert list(result) == list(expected)
    for key, tensor in expected.items():
        arr = result[key]
        ref = tensor.detach().contiguous().numpy()
        assert isinstance(arr, np.ndarray), key
        assert arr.dtype == ref.dtype, (key, arr.dtype, ref.dtype)
        assert arr.shape == ref.shape, (key, arr.shape, ref.shape)
        np.testing.assert_array_equal(arr, ref, err_msg=key)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# ----------------------------------------------------------------------------- round trips


def test_round_trip_many_dtypes_and_views(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "conv.weight": torch.randn(4, 2, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(4, generator=gen),
        "f64": torch.randn(3, 5, generator=gen, dtype=torch.float64),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "half": torch.randn(2, 3, generator=gen).half(),
        "base": base,
        "transposed": base.t(),  # non-contiguous, shares storage with base
        "slice": base[1:3, ::2],  # offset + strides into the same storage
        "scalar": torch.tensor(3.5),  # 0-d
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / "mixed.pt"
    torch.save(sd, path)
    out = read_state_dict(path)
    _assert_same(out, sd)
    assert out["scalar"].shape == ()
    # Entries that shared a storage come back as independent arrays.
    out["base"][0, 0] = -100.0
    assert out["transposed"][0, 0] == 0.0
    assert out["slice"].flags.c_contiguous and out["slice"].flags.writeable


def test_round_trip_module_state_dict_any_prefix(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    sd = model.state_dict()
    path = tmp_path / "some-weights.pth"  # archive prefix follows the file stem
    torch.save(sd, path)
    out = read_state_dict(str(path))
    assert list(out) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert out["0.weight"].shape == (4, 1, 3, 3, 3)
    _assert_same(out, sd)


def test_bfloat16_becomes_exact_float32(tmp_path):
    t = torch.randn(5, 2).bfloat16()
    path = tmp_path / "bf16.pt"
    torch.save({"w": t}, path)
    out = read_state_dict(path)
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], t.float().numpy())


def test_big_endian_byteorder_record(tmp_path):
    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "b": torch.tensor([1, -2], dtype=torch.int64)}
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    members = {}
    with zipfile.ZipFile(src) as zf:
        names = zf.namelist()
        prefix = next(n for n in names if n.endswith("data.pkl"))[: -len("data.pkl")]
        for name in names:
            data = zf.read(name)
            if name == prefix + "byteorder":
                data = b"big"
            elif name == prefix + "data/0":
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            elif name == prefix + "data/1":
                data = np.frombuffer(data, "<i8").astype(">i8").tobytes()
            members[name] = data
    out = read_state_dict(_zip(tmp_path / "big.pt", members))
    _assert_same(out, sd)
    assert out["a"].dtype.isnative


# ----------------------------------------------------------------------------- malicious


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize(
    "func, command_of, forbidden",
    [
        (os.system, lambda marker: f"touch {marker}", f"{os.system.__module__}.system"),
        (eval, lambda marker: f"open({str(marker)!r}, 'w').close()", "__builtin__.eval"),  # protocol 2 name
    ],
    ids=["os.system", "builtins.eval"],
)
def test_malicious_pickle_in_zip_is_refused(tmp_path, func, command_of, forbidden):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Evil(func, command_of(marker))}, protocol=2)
    path = _zip(tmp_path / "evil.pt", {"evil/data.pkl": payload, "evil/version": b"3\n"})
    _expect_error(path, forbidden, "malicious", "not loaded")
    assert not marker.exists()


def test_malicious_global_after_valid_tensor_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(2), "b": torch.zeros(1)}, good)
    with zipfile.ZipFile(good) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    # Add a last dict entry (inside the SETITEMS mark) whose value runs a command.
    assert members[pkl][-2:] == b"u."
    evil_tail = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)[2:-1]  # strip PROTO/STOP
    members[pkl] = members[pkl][:-2] + b"X\x01\x00\x00\x00c" + evil_tail + b"u."
    _expect_error(_zip(tmp_path / "evil2.pt", members), "system", "malicious")
    assert not marker.exists()


def test_raw_malicious_pickle_not_zip(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2))
    _expect_error(path, "not a zip archive", "torch.save")
    assert not marker.exists()


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "not found")


@pytest.mark.parametrize("content", [os.urandom(256), b"just some text\nnot weights\n"], ids=["random", "text"])
def test_not_a_zip(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    _expect_error(path, "not a zip archive", "torch>=1.6", "torch.save")


def test_zip_without_data_pkl(tmp_path):
    path = _zip(tmp_path / "nopkl.pt", {"archive/version": b"3\n", "readme.txt": b"hi"})
    _expect_error(path, "no data.pkl")


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ([torch.ones(2)], "list"),
        ({"a": 1}, "'a' is a int"),
        ({"model": {"w": torch.ones(1)}}, "'model' is a dict"),
        ({3: torch.ones(1)}, "not a string"),
    ],
    ids=["list", "int-value", "nested", "int-key"],
)
def test_not_a_state_dict(tmp_path, obj, fragment):
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    _expect_error(path, "not a state_dict", fragment)


def test_truncated_archive(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(cut, "truncated")


def test_truncated_pickle_and_missing_storage(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.randn(4, 4)}, path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]

    cut_pickle = dict(members, **{pkl: members[pkl][: len(members[pkl]) // 2]})
    _expect_error(_zip(tmp_path / "cutpkl.pt", cut_pickle), "corrupt")

    no_storage = {n: d for n, d in members.items() if n != prefix + "data/0"}
    _expect_error(_zip(tmp_path / "nostorage.pt", no_storage), "corrupt", "missing")

    short_storage = dict(members, **{prefix + "data/0": members[prefix + "data/0"][:10]})
    _expect_error(_zip(tmp_path / "short.pt", short_storage), "corrupt")


# ----------------------------------------------------------------------------- no torch import


def test_module_does_not_import_torch():
    code = (
        "import sys\n"
        "import arssr_jax.weights.torch_state_dict\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
