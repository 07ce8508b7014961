"""Hostile and damaged input (issue 15): one line and exit 2, never a traceback; memory
bounded by what the input can need, not by what a file claims; no silent NaN; no
leftovers after SIGKILL or SIGTERM; one training run per workdir.

Every hostile file is built here, small. The tests that feed a file claiming gigabytes
run the reader in a fresh process under a 2 GiB address-space limit and check its peak
memory (a regression then fails the test instead of exhausting the machine).
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from nibabel.nifti1 import Nifti1Header

from arssr_jax import nifti, tempfiles
from arssr_jax.cli import main
from arssr_jax.coords import grid_for_scale, grid_for_voxel_size
from arssr_jax.errors import ArSSRError
from arssr_jax.inference import Upsampler, upsample
from arssr_jax.models import build_model
from arssr_jax.weights import convert_state_dict, load_model, save_model

torch = pytest.importorskip("torch")
from arssr_jax.testing.torch_reference import make_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANATOMICAL = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
from tiny_model import TINY  # noqa: E402
SMALL_REFERENCE = dict(feature_dim=8, g0=8, g=8, d=2, c=2)  # a small RDN in the reference's layout


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def lr_file(tmp_path):
    path = tmp_path / "lr.nii.gz"
    volume = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def cli_error(capsys, args, *fragments) -> str:
    """Run the CLI; it must exit 2 with one line naming every fragment."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert err.count("\n") == 0 and "error" in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def no_temporaries(folder) -> bool:
    return not [p for p in os.listdir(folder) if ".tmp-" in p or ".old-" in p]


def raw_nifti(path, shape, data=b"", dtype=np.float32, gz=False, **fields):
    """A NIfTI-1 file with any header fields (nibabel would refuse to write some of them)."""
    header = Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["pixdim"][1:4] = 1
    header["vox_offset"] = 352
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]
    for key, value in fields.items():
        header[key] = value
    blob = header.binaryblock + b"\0" * 4 + data
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(blob)
    return Path(path)


def measured(code: str, limit_gib: float = 2.0, timeout: float = 120) -> tuple[float, str]:
    """Run ``code`` in a fresh Python under an address-space limit: (peak RSS in MiB, stdout).

    The code must not import JAX (its reservations need more address space); the torch
    reader is loaded straight from its file for that reason.
    """
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gib * 2**30)}, {int(limit_gib * 2**30)}))
        sys.path.insert(0, {str(ROOT)!r})
    """) + textwrap.dedent(code) + textwrap.dedent("""
        # VmHWM: this program's peak RSS (ru_maxrss would keep the forking parent's across exec)
        print("PEAK_MIB", [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = float(result.stdout.split("PEAK_MIB")[-1])
    print(f"peak memory {peak:.0f} MiB")
    return peak, result.stdout


LOAD_TORCH_READER = f"""
import importlib.util
spec = importlib.util.spec_from_file_location(
    "tsd", {str(ROOT / 'arssr_jax' / 'weights' / 'torch_state_dict.py')!r})
tsd = importlib.util.module_from_spec(spec); spec.loader.exec_module(tsd)
from arssr_jax.errors import ArSSRError
"""


class _StorageRecord:
    """A storage as torch.save pickles it: a persistent id naming a zip member."""

    def __init__(self, key: str, numel: int, kind: str = "FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class _TensorRecord:
    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce_ex__(self, protocol):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRecord):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def torch_zip(path, state, members=None, pickle_bytes=None) -> Path:
    """A torch.save-style archive with any storage records and member contents."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes if pickle_bytes is not None else buffer.getvalue())
        for name, data in (members or {}).items():
            archive.writestr(f"archive/data/{name}", data)
    return Path(path)


def small_reference_state(seed=0) -> dict:
    return {k: v.numpy().copy() for k, v in make_reference("RDN", seed=seed, **SMALL_REFERENCE).state_dict().items()}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --------------------------------------------------------------------------- 1. one line, not a traceback


def test_1_huge_scale_or_tiny_voxel_size_is_one_line(capsys, lr_file, tiny_dir, tmp_path):
    out = tmp_path / "o.nii.gz"
    cli_error(capsys, ["upsample", lr_file, out, "--scale", "1e308", "--model", tiny_dir, "--quiet"], "scale", "smaller")
    cli_error(capsys, ["upsample", lr_file, out, "--voxel-size", "1e-308", "--model", tiny_dir, "--quiet"], "voxel size")
    with pytest.raises(ArSSRError, match="more than any volume can hold"):
        grid_for_scale((8, 9, 7), 1e308)
    with pytest.raises(ArSSRError, match="more than any volume can hold"):
        grid_for_voxel_size((8, 9, 7), (2, 2, 2), 1e-300)
    with pytest.raises(ArSSRError, match="scale"):
        upsample(np.ones((4, 4, 4), np.float32) + np.arange(4), (build_model(TINY), None), scale=1e308)
    assert not out.exists() and no_temporaries(tmp_path)


@pytest.mark.parametrize("affine", ["zero_sform", "nan_sform"])
def test_1_like_with_a_degenerate_affine_is_refused_before_any_work(affine, capsys, lr_file, tmp_path):
    data = np.zeros((4, 4, 4), np.float32).tobytes(order="F")
    if affine == "zero_sform":  # all-zero sform, qform code 0
        like = raw_nifti(tmp_path / "like.nii", (4, 4, 4), data, srow_x=[0] * 4, srow_y=[0] * 4, srow_z=[0] * 4)
    else:
        like = raw_nifti(tmp_path / "like.nii", (4, 4, 4), data, srow_x=[np.nan, 0, 0, 0])
    out = tmp_path / "o.nii.gz"
    # the model does not exist: the --like image must be refused before the model is even looked up
    cli_error(capsys, ["upsample", lr_file, out, "--like", like, "--model", tmp_path / "no_model", "--quiet"],
              "like.nii", "degenerate")
    assert not out.exists() and no_temporaries(tmp_path)


@pytest.mark.parametrize("change, fragment", [
    ({"decoder_width": "128"}, "decoder_width"),
    ({"decoder_width": -5}, "decoder_width"),
    ({"decoder_depth": 0}, "decoder_depth"),
    ({"decoder_depth": 10**9}, "decoder_depth"),
    ({"encoder_options": {"num_blocks": 2, "bogus": 1}}, "bogus"),
    ({"encoder_options": [1, 2, 3]}, "encoder_options"),
    ({"feature_dim": True}, "feature_dim"),
    (None, "JSON object"),
])
def test_1_damaged_model_config_is_one_line(change, fragment, capsys, tiny, lr_file, tmp_path):
    model = save_model(tmp_path / "model", TINY, tiny[1])
    document = json.loads((model / "config.json").read_text())
    if change is None:
        document = ["not", "an", "object"]
    else:
        document["model"].update(change)
    (model / "config.json").write_text(json.dumps(document))
    out = tmp_path / "o.nii.gz"
    cli_error(capsys, ["upsample", lr_file, out, "--scale", "2", "--model", model, "--quiet"], "config.json", fragment)
    assert not out.exists()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir with one real checkpoint (written directly: no training needed)."""
    from arssr_jax.training import CheckpointStore, create_train_state, make_optimizer, make_task, tiny
    from arssr_jax.training.config import save_config

    folder = tmp_path_factory.mktemp("run") / "wd"
    folder.mkdir()
    config = tiny(data_paths=(ANATOMICAL,))
    save_config(config, folder)
    task = make_task(config)
    tx, _ = make_optimizer(config.optim, steps_per_epoch=1)
    state = create_train_state(task.init_params, tx, config.seed)
    store = CheckpointStore(folder, keep_last=2)
    store.save(1, state.replace(step=np.int32(1)), {"step": 1, "seed": config.data.seed,
                                                    "batch_size": config.data.batch_size}, {"val_l1": 0.5})
    store.close()
    return folder


def damage(workdir: Path, tmp_path: Path, kind: str) -> Path:
    copy = tmp_path / "wd"
    shutil.copytree(workdir, copy)
    step = copy / "checkpoints" / "1"
    if kind == "empty_state":
        shutil.rmtree(step / "state")
        (step / "state").mkdir()
    else:
        target = step / kind
        content = target.read_bytes()
        target.write_bytes(content[: len(content) // 2])
    return copy


@pytest.mark.parametrize("kind", ["metrics/metrics", "state/_METADATA", "state/manifest.ocdbt", "empty_state"])
def test_1_damaged_checkpoint_as_model_is_one_line(kind, capsys, workdir, lr_file, tmp_path):
    damaged = damage(workdir, tmp_path, kind)
    out = tmp_path / "o.nii.gz"
    cli_error(capsys, ["upsample", lr_file, out, "--scale", "2", "--model", damaged, "--quiet"],
              "checkpoint 1", "damaged", "delete")
    cli_error(capsys, ["export", damaged, tmp_path / "exported", "--quiet"], "checkpoint 1", "damaged")
    assert not out.exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("kind", ["metrics/metrics", "empty_state"])
def test_1_training_on_a_damaged_checkpoint_says_damaged_not_config(kind, workdir, tmp_path):
    from arssr_jax.training import tiny, train

    damaged = damage(workdir, tmp_path, kind)
    with pytest.raises(ArSSRError, match="damaged") as info:
        train(tiny(data_paths=(ANATOMICAL,)), damaged, steps=2, quiet=True)
    assert "config" not in str(info.value) and "\n" not in str(info.value)


def test_1_model_output_that_is_an_existing_file(capsys, workdir, tmp_path):
    source = tmp_path / "ref.pt"
    torch.save(make_reference("RDN", **SMALL_REFERENCE).state_dict(), source)
    target = tmp_path / "taken"
    target.write_text("keep me")
    cli_error(capsys, ["convert-torch", source, target, "--quiet"], "existing file")
    cli_error(capsys, ["export", workdir, target, "--quiet"], "existing file")
    assert target.read_text() == "keep me" and no_temporaries(tmp_path)
    assert main(["convert-torch", str(source), str(tmp_path / "model"), "--quiet"]) == 0  # the file itself is fine


# --------------------------------------------------------------------------- 2. memory taken on a file's word


def measured_load(path, **limits) -> tuple[float, str]:
    """``nifti.load(path)`` in a measured process: (peak RSS in MiB, "ERR <message>" or "")."""
    return measured(f"""
        from arssr_jax.nifti import load
        from arssr_jax.errors import ArSSRError
        try:
            load({str(path)!r})
        except ArSSRError as error:
            print("ERR", error)
    """, **limits)


@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize("side", [5000, 1100])
def test_2_nifti_header_claiming_more_voxels_than_the_file_holds_is_damage(side, gz, tmp_path):
    # the file is checked against its header before any memory estimate: no advice to find a larger machine
    path = raw_nifti(tmp_path / ("big.nii.gz" if gz else "big.nii"), (side,) * 3, b"\0" * 16000, gz=gz)
    assert path.stat().st_size < 17000
    peak, out = measured_load(path, limit_gib=3.0)
    assert "ERR" in out and "truncated or corrupt" in out and f"{side}x{side}x{side}" in out, out
    assert "GiB" not in out and "larger machine" not in out, out
    assert peak < 400


def test_2_torch_tensor_of_4e9_elements_on_stride_0(tmp_path):
    path = tmp_path / "stride0.pt"
    torch.save({"decoder.stage_one.0.weight": torch.zeros(1).expand(4_000_000_000)}, path)
    assert path.stat().st_size < 2000
    peak, out = measured(LOAD_TORCH_READER + f"""
try:
    tsd.read_state_dict({str(path)!r})
except ArSSRError as error:
    print("ERR", error)
""")
    assert "ERR" in out and "refused" in out and "4000000000" in out, out
    assert peak < 300


def test_2_torch_many_tensors_on_one_storage(tmp_path):
    path = tmp_path / "shared.pt"
    one = torch.zeros(1)
    torch.save({f"t{i}": one.expand(2**24) for i in range(64)}, path)  # 64 x 64 MiB from one float
    peak, out = measured(LOAD_TORCH_READER + f"""
try:
    tsd.read_state_dict({str(path)!r})
except ArSSRError as error:
    print("ERR", error)
""")
    assert "ERR" in out and "MiB" in out, out
    assert peak < 600


def test_2_torch_storage_record_that_inflates(tmp_path):
    zeros = b"\0" * (64 * 2**20)  # deflates to ~64 KB
    claims_3gib = torch_zip(tmp_path / "claims.pt", {"w": _TensorRecord(_StorageRecord("0", 3 * 2**30 // 4), (4,), (1,))},
                            {"0": zeros})
    inflates = torch_zip(tmp_path / "inflates.pt", {"w": _TensorRecord(_StorageRecord("0", 4), (4,), (1,))}, {"0": zeros})
    assert claims_3gib.stat().st_size < 2**20 and inflates.stat().st_size < 2**20
    peak, out = measured(LOAD_TORCH_READER + f"""
try:
    tsd.read_state_dict({str(claims_3gib)!r})
except ArSSRError as error:
    print("ERR", error)
state = tsd.read_state_dict({str(inflates)!r})  # needs 16 bytes of its 64 MiB record: reads 16
print("OK", state["w"].shape)
""")
    assert "ERR" in out and "refused" in out and "OK (4,)" in out, out
    assert peak < 300


def test_2_torch_pickle_that_inflates(tmp_path):
    # data.pkl: a BINBYTES8 opcode announcing 3 GiB, then 64 MiB of zeros (the zip is ~64 KB)
    pickle_bytes = b"\x80\x04\x8e" + (3 * 2**30).to_bytes(8, "little") + b"\0" * (64 * 2**20)
    path = torch_zip(tmp_path / "pickle.pt", {}, pickle_bytes=pickle_bytes)
    assert path.stat().st_size < 2**20
    peak, out = measured(LOAD_TORCH_READER + f"""
try:
    tsd.read_state_dict({str(path)!r})
except ArSSRError as error:
    print("ERR", error)
""")
    assert "ERR" in out and "data.pkl" in out, out
    assert peak < 300


# --------------------------------------------------------------------------- 3. no silent NaN


def test_3_nan_weight_is_refused_by_convert_and_by_a_model_dir(capsys, tiny, lr_file, tmp_path):
    state = small_reference_state()
    state["encoder.rdbs.1.lff.weight"][0, 3, 0, 0, 0] = np.nan
    with pytest.raises(ArSSRError, match=r"encoder\.rdbs\.1\.lff\.weight holds 1 NaN"):
        convert_state_dict(state, "RDN")
    source = tmp_path / "nan.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, source)
    cli_error(capsys, ["convert-torch", source, tmp_path / "m", "--quiet"], "NaN")
    assert not (tmp_path / "m").exists() and no_temporaries(tmp_path)

    params = jax.tree_util.tree_map(np.array, tiny[1])
    params["decoder"]["stage_one_0"]["kernel"][2, 1] = np.inf
    model = save_model(tmp_path / "inf_model", TINY, params)
    out = tmp_path / "o.nii.gz"
    cli_error(capsys, ["upsample", lr_file, out, "--scale", "2", "--model", model, "--quiet"], "NaN/Inf", "stage_one_0")
    assert not out.exists()


def test_3_values_beyond_float32_and_non_finite_results(capsys, tiny, lr_file, tmp_path):
    volume = np.random.default_rng(1).random((6, 6, 6)) * 1e39  # float64, beyond float32's range
    with pytest.raises(ArSSRError, match="float32"):
        upsample(volume, tiny, scale=2)
    params = jax.tree_util.tree_map(np.array, tiny[1])
    params["decoder"]["stage_two_1"]["kernel"][:] = 1e38  # finite weights, overflowing output
    with pytest.raises(ArSSRError, match="NaN/Inf"):
        upsample(np.random.default_rng(2).random((6, 6, 6)), (tiny[0], params), scale=2)
    model = save_model(tmp_path / "overflow", TINY, params)
    out = tmp_path / "o.nii.gz"
    cli_error(capsys, ["upsample", lr_file, out, "--scale", "2", "--model", model, "--quiet"], "NaN/Inf")
    assert not out.exists() and no_temporaries(tmp_path)


# --------------------------------------------------------------------------- 4. leftovers


def test_4_stale_temporaries_of_the_same_target_are_removed(tmp_path, lr_file, tiny):
    host, dead = socket.gethostname(), dead_pid()
    stale = tmp_path / f".out.tmp-{host}-{dead}-abc.nii.gz"  # a writer killed with SIGKILL
    old_scheme = tmp_path / ".out.tmp-k3j4.nii.gz"  # no owner recorded: stale by age
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-xyz.nii.gz"  # a writer still running
    other = tmp_path / f".other.tmp-{host}-{dead}-abc.nii.gz"  # another target's
    for path in (stale, old_scheme, live, other):
        path.write_bytes(b"partial")
    day_ago = time.time() - tempfiles.STALE_AFTER_S - 60
    os.utime(old_scheme, (day_ago, day_ago))
    nifti.save(nifti.load(lr_file), tmp_path / "out.nii.gz")
    assert not stale.exists() and not old_scheme.exists() and live.exists() and other.exists()

    stale_dir = tmp_path / f".model.tmp-{host}-{dead}-abc"
    stale_dir.mkdir()
    (stale_dir / "params.msgpack").write_bytes(b"half")
    save_model(tmp_path / "model", TINY, tiny[1])
    assert not stale_dir.exists()
    load_model(str(tmp_path / "model"))


def test_4_a_model_set_aside_by_a_killed_save_comes_back(tmp_path, tiny):
    model = save_model(tmp_path / "model", TINY, tiny[1])
    aside = tmp_path / f".model.old-{socket.gethostname()}-{dead_pid()}-abc"
    aside.mkdir()
    os.replace(model, aside / "model")  # killed between its two renames
    load_model(str(model))
    assert (model / "params.msgpack").is_file() and not aside.exists()


def _terminate_inside(monkeypatch, owner, name):
    """Make ``owner.name`` send SIGTERM to this process halfway through its work."""
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this returns
        return result

    monkeypatch.setattr(owner, name, interrupted)


def test_4_sigterm_while_writing_leaves_nothing(capsys, monkeypatch, lr_file, tiny_dir, tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out.nii.gz"
    _terminate_inside(monkeypatch, nib.Nifti1Image, "to_file_map")
    assert main(["upsample", str(lr_file), str(out), "--scale", "2", "--model", tiny_dir, "--quiet"]) == 143
    assert "terminated" in capsys.readouterr().err
    assert not out.exists() and no_temporaries(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == previous

    from arssr_jax.weights import model_dir

    source = tmp_path / "ref.pt"
    torch.save(make_reference("RDN", **SMALL_REFERENCE).state_dict(), source)
    _terminate_inside(monkeypatch, model_dir.serialization, "msgpack_serialize")
    assert main(["convert-torch", str(source), str(tmp_path / "model"), "--quiet"]) == 143
    assert not (tmp_path / "model").exists() and no_temporaries(tmp_path)


# --------------------------------------------------------------------------- 5. the training workdir


def test_5_refused_data_leaves_no_workdir_and_a_config_without_checkpoints_is_replaced(tmp_path):
    from arssr_jax.training import tiny, train
    from arssr_jax.training.config import CONFIG_FILE, save_config
    from arssr_jax.training.loop import check_workdir

    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10)).astype(np.float32), np.eye(4)), small)
    with pytest.raises(ArSSRError, match="smaller than the patch size"):
        train(tiny(data_paths=(str(small),)), tmp_path / "run", steps=1, quiet=True)
    assert not (tmp_path / "run").exists()

    # a workdir left by a run that stopped before its first checkpoint holds nothing to resume
    leftover = tmp_path / "leftover"
    (leftover / "checkpoints").mkdir(parents=True)
    save_config(tiny(data_paths=(str(small),)), leftover)
    check_workdir(tiny(data_paths=(ANATOMICAL,)), leftover)
    (leftover / "checkpoints" / "3").mkdir()
    with pytest.raises(ArSSRError, match="different config"):
        check_workdir(tiny(data_paths=(ANATOMICAL,)), leftover)
    assert (leftover / CONFIG_FILE).is_file()


def test_5_one_run_per_workdir_and_a_dead_holder_releases_it(capsys, tmp_path):
    from arssr_jax.training import tiny, train
    from arssr_jax.training.lock import WorkdirLock

    wd = tmp_path / "wd"
    wd.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]);"
         "from arssr_jax.training.lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire();"
         "print('locked', flush=True); time.sleep(120)", str(wd), str(ROOT)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArSSRError, match=f"in use by another training run \\(pid {holder.pid} ") as info:
            train(tiny(data_paths=(ANATOMICAL,)), wd, steps=1, quiet=True)
        assert "\n" not in str(info.value)
        cli_error(capsys, ["train", "--config", "tiny", "--workdir", wd, "--data", ANATOMICAL, "--steps", "1",
                           "--quiet"], "in use")
        assert not (wd / "log.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the lock must not outlive its holder
        holder.wait()
    with WorkdirLock(wd):
        with pytest.raises(ArSSRError, match="in this process"):
            WorkdirLock(wd).acquire()
    WorkdirLock(wd).acquire().release()


# --------------------------------------------------------------------------- 6. accepted nonsense


def test_6_tile_must_be_positive(capsys, lr_file, tiny, tiny_dir, tmp_path):
    out = tmp_path / "o.nii.gz"
    for tile in ("0", "-3"):
        cli_error(capsys, ["upsample", lr_file, out, "--scale", "2", "--tile", tile, "--model", tiny_dir, "--quiet"],
                  "--tile", "positive")
    cli_error(capsys, ["upsample", lr_file, out, "--scale", "2", "--chunk", "-5", "--model", tiny_dir, "--quiet"],
              "--chunk")
    for bad in (0, (4, 0, 4), (4, 4), 2.5):  # checked once, where the options are built
        with pytest.raises(ArSSRError, match="tile"):
            Upsampler(tiny, tile=bad)
    assert not out.exists()


def test_6_a_scale_below_one_is_said_once(capsys, lr_file, tiny_dir, tmp_path):
    out = tmp_path / "o.nii.gz"
    assert main(["upsample", str(lr_file), str(out), "--scale", "0.5", "--model", tiny_dir]) == 0
    err = capsys.readouterr().err
    assert err.count("downsampled") == 1, err
    assert nib.load(out).shape == (4, 4, 3)
    assert main(["upsample", str(lr_file), str(out), "--scale", "0.5", "--model", tiny_dir, "--quiet"]) == 0
    assert "downsampled" not in capsys.readouterr().err


@pytest.mark.parametrize("volume, fragment", [
    (np.empty((4, 4, 4), dtype=object), "dtype object"),
    (np.zeros((0, 4, 4), np.float32), "empty"),
    (np.ones((4, 4, 4), np.complex64), "complex"),
    (np.array(["a"] * 64).reshape(4, 4, 4), "not real numbers"),
])
def test_6_api_refuses_non_real_or_empty_arrays(volume, fragment, tiny):
    with pytest.raises(ArSSRError, match=fragment):
        upsample(volume, tiny, scale=2)


# --------------------------------------------------------------------------- 7. messages


def test_7_shape_mismatch_names_the_wrong_tensor(capsys, tmp_path):
    for key in ("decoder.stage_one.0.weight", "encoder.sfe1.weight", "encoder.rdbs.0.layers.0.conv.weight",
                "encoder.output.weight"):
        state = small_reference_state()
        wrong = state[key]
        state[key] = np.zeros((wrong.shape[0] + 1,) + wrong.shape[1:], wrong.dtype)
        with pytest.raises(ArSSRError) as info:
            convert_state_dict(state, "RDN")
        message = str(info.value)
        assert message.split(":")[1].strip().startswith(f"{key} has shape {state[key].shape}"), message
        assert f"needs {wrong.shape}" in message, message


def test_7_float64_values_beyond_float32(capsys, tiny_dir, tmp_path):
    data = np.random.default_rng(0).random((4, 4, 4))
    data[1, 2, 3] = 1e39
    path = raw_nifti(tmp_path / "f64.nii", (4, 4, 4), data.tobytes(order="F"), dtype=np.float64)
    err = cli_error(capsys, ["upsample", path, tmp_path / "o.nii.gz", "--scale", "2", "--model", tiny_dir, "--quiet"],
                    "1 voxel(s)", "float32's range", "1e+39")
    assert "Inf" not in err and "fslmaths" not in err


def test_7_symlink_loop_and_degenerate_shapes(capsys, tmp_path, tiny_dir):
    os.symlink(tmp_path / "b.nii", tmp_path / "a.nii")
    os.symlink(tmp_path / "a.nii", tmp_path / "b.nii")
    out = tmp_path / "o.nii.gz"
    err = cli_error(capsys, ["upsample", tmp_path / "a.nii", out, "--scale", "2", "--model", tiny_dir, "--quiet"],
                    "symbolic link loop")
    assert "broken" not in err and "missing" not in err
    for shape, words in (((1, 1, 1), "a single voxel"), ((1, 1, 5), "a 1D line"), ((1, 4, 5), "a single 2D slice")):
        path = raw_nifti(tmp_path / "flat.nii", shape, np.ones(shape, np.float32).tobytes(order="F"))
        cli_error(capsys, ["upsample", path, out, "--scale", "2", "--model", tiny_dir, "--quiet"], words)


@pytest.mark.parametrize("pixdim", [0.0, -2.0])
def test_7_pixdim_warning_is_printed_once(pixdim, capfd, tmp_path):
    data = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32).tobytes(order="F")
    path = raw_nifti(tmp_path / "pix.nii", (4, 4, 4), data, pixdim=[1, pixdim, 1, 1, 1, 0, 0, 0], qform_code=1,
                     sform_code=0)
    nifti.load(path)
    err = capfd.readouterr().err
    assert err.count("note:") == 1 and err.count("should be") == 1 and "pix.nii: note: pixdim" in err, err


# --------------------------------------------------------------------------- 8. the demo's files


def test_8_demo_png_gets_the_same_mode_as_the_nifti(tmp_path, tiny_dir):
    from arssr_jax.demo import run_demo

    previous = os.umask(0o022)
    try:
        result = run_demo(tmp_path, model=tiny_dir, progress=False, log=lambda *_: None)
    finally:
        os.umask(previous)
    modes = {Path(result[k]).name: Path(result[k]).stat().st_mode & 0o777 for k in ("nifti", "figure")}
    assert set(modes.values()) == {0o644}, modes


def test_8_evaluation_tables_and_figures_get_a_plain_files_mode(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arssr_jax.evaluation.figures import _save
    from arssr_jax.evaluation.tables import write_atomic

    previous = os.umask(0o022)
    try:
        table = write_atomic(tmp_path / "results.md", "| a |\n")
        figure = _save(plt.figure(), tmp_path / "figure.png")
    finally:
        os.umask(previous)
    assert {p.stat().st_mode & 0o777 for p in (table, figure)} == {0o644}
