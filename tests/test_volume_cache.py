"""Tests of the volume cache (arssr_jax.data.cache): training NIfTI volumes converted once
into normalised float32 .npy files and memory-mapped. Small volumes: each test takes seconds."""

import errno
import os
import pickle
import subprocess
import sys
import textwrap

import cloudpickle
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.data import DataConfig, load_volumes, make_train_iterator
from arssr_jax.data import cache as volume_cache
from arssr_jax.data.cache import DEFAULT_CACHE_DIR, cached_arrays, entry_path, resolve_cache_dir
from arssr_jax.data.pipeline import StepBatch
from arssr_jax.data.reading import normalise_volume
from arssr_jax.errors import ArSSRError


def cached_volumes(paths, folder, progress=True):
    return load_volumes(list(paths), cache_dir=folder, progress=progress)

SMALL = dict(patch_size=24, lr_size=6, samples_per_step=500, batch_size=4, min_foreground=0.0)


def write_volume(path, shape=(30, 32, 28), seed=0, scale=100.0):
    rng = np.random.default_rng(seed)
    data = (scale * ndimage.gaussian_filter(rng.random(shape), 2.0)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.0, 0.9, 1.0])), str(path))
    return data


@pytest.fixture
def sources(tmp_path):
    paths = [tmp_path / "a.nii", tmp_path / "b.nii.gz", tmp_path / "c.nii"]
    arrays = [write_volume(p, shape, seed)
              for seed, (p, shape) in enumerate(zip(paths, [(30, 32, 28), (26, 40, 30), (28, 28, 28)]))]
    return [str(p) for p in paths], arrays


def npy_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".npy"))


def take(iterator, n):
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])


def test_cached_values_equal_in_memory(sources, tmp_path):
    paths, arrays = sources
    cached = load_volumes(paths, cache_dir=tmp_path / "cache")
    in_memory = load_volumes(paths)
    assert cached.names == in_memory.names == tuple(paths)
    assert len(npy_files(tmp_path / "cache")) == 3
    for c, m, raw, name in zip(cached.arrays, in_memory.arrays, arrays, paths):
        assert c.dtype == np.float32 and not c.flags.writeable
        assert isinstance(c.base, np.memmap)
        np.testing.assert_array_equal(c, m)
        np.testing.assert_array_equal(c, normalise_volume(raw, name))


def test_hit_miss_keyed_on_path_size_mtime(sources, tmp_path, monkeypatch):
    paths, _ = sources
    folder = tmp_path / "cache"
    writes = []
    real_write = volume_cache._write_entry
    monkeypatch.setattr(volume_cache, "_write_entry", lambda s, e: (writes.append(s), real_write(s, e)))
    cached_volumes(paths, folder)
    assert writes == paths
    before = {n: os.stat(folder / n).st_mtime_ns for n in npy_files(folder)}
    cached_volumes(paths, folder)  # all hits: nothing converted, nothing rewritten
    assert writes == paths
    assert {n: os.stat(folder / n).st_mtime_ns for n in npy_files(folder)} == before

    # a changed source (new content, size and mtime) is converted again; its old entry goes
    old_entry = entry_path(folder, paths[0])
    new = write_volume(paths[0], (34, 30, 26), seed=7, scale=3.0)
    os.utime(paths[0], ns=(1, 10 ** 18))
    got = cached_volumes(paths, folder)
    assert writes == paths + [paths[0]]
    assert not old_entry.exists() and entry_path(folder, paths[0]).is_file()
    assert len(npy_files(folder)) == 3
    np.testing.assert_array_equal(got.arrays[0], normalise_volume(new, paths[0]))

    # same size, only the modification time changed: rebuilt too
    os.utime(paths[1], ns=(1, 2 * 10 ** 18))
    cached_volumes(paths, folder)
    assert writes == paths + [paths[0], paths[1]]
    # another path to the same file: the resolved path is the key, so it is a hit
    link = tmp_path / "link.nii"
    link.symlink_to(paths[2])
    cached_volumes([str(link)], folder)
    assert len(writes) == 5 and len(npy_files(folder)) == 3


def test_batches_bit_identical_to_in_memory(sources, tmp_path):
    paths, arrays = sources
    config = DataConfig(**SMALL, seed=3)
    memory = take(make_train_iterator(dataclass_replace(config, cache_dir=None), paths,
                                      process_index=0, process_count=1), 3)
    given = take(make_train_iterator(config, arrays, process_index=0, process_count=1), 3)
    cached = take(make_train_iterator(dataclass_replace(config, cache_dir=str(tmp_path / "cache")), paths,
                                      process_index=0, process_count=1), 3)
    assert_batches_equal(cached, memory)
    assert_batches_equal(cached, given)


def test_workers_map_the_files_and_match(sources, tmp_path):
    paths, _ = sources
    config = DataConfig(**SMALL, seed=4, num_steps=4, cache_dir=str(tmp_path / "cache"))
    expected = take(make_train_iterator(dataclass_replace(config, cache_dir=None), paths,
                                        process_index=0, process_count=1), 4)
    it = make_train_iterator(dataclass_replace(config, worker_count=1), paths, process_index=0,
                             process_count=1)
    try:
        got = list(it)
    finally:
        it.close()
    assert_batches_equal(got, expected)


def test_pickled_dataset_carries_paths_not_arrays(sources, tmp_path):
    """grain sends the dataset to its workers pickled: a cached VolumeSet travels as file names."""
    paths, _ = sources
    config = DataConfig(**SMALL)
    cached = load_volumes(paths, cache_dir=tmp_path / "cache")
    in_memory = load_volumes(paths)
    volume_bytes = sum(a.nbytes for a in in_memory.arrays)
    small = cloudpickle.dumps(StepBatch(cached, config, 0, 1))
    big = cloudpickle.dumps(StepBatch(in_memory, config, 0, 1))
    assert len(small) < 4096 < volume_bytes < len(big)
    restored = pickle.loads(small).volumes
    assert restored.files == cached.files and restored.names == cached.names
    for a, b in zip(restored.arrays, in_memory.arrays):
        assert isinstance(a.base, np.memmap)
        np.testing.assert_array_equal(a, b)
    # a file removed under a running pipeline is reported, not silently re-read
    os.unlink(cached.files[0])
    with pytest.raises(ArSSRError, match="is gone"):
        pickle.loads(small)


def test_interrupted_conversion_leaves_no_file(sources, tmp_path, monkeypatch):
    paths, _ = sources
    folder = tmp_path / "cache"
    real_save = np.save

    def save_half_then_fail(handle, array, allow_pickle=False):
        handle.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(volume_cache.np, "save", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        cached_volumes(paths, folder)
    assert os.listdir(folder) == [".lock"]  # no entry, no temporary

    def disk_full(handle, array, allow_pickle=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume_cache.np, "save", disk_full)
    with pytest.raises(ArSSRError, match="filled while converting .*cache_dir"):
        cached_volumes(paths, folder)
    assert os.listdir(folder) == [".lock"]

    monkeypatch.setattr(volume_cache.np, "save", real_save)
    assert len(cached_volumes(paths, folder).arrays) == 3
    assert len(os.listdir(folder)) == 4


def test_bad_source_writes_nothing(tmp_path):
    bad = tmp_path / "nan.nii"
    data = np.ones((24, 24, 24), np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
    with pytest.raises(ArSSRError, match="1 NaN and 0 Inf voxel"):
        load_volumes([str(bad)], cache_dir=tmp_path / "cache")
    assert npy_files(tmp_path / "cache") == []


def test_disk_would_fill(sources, tmp_path, monkeypatch):
    paths, arrays = sources
    folder = tmp_path / "cache"
    real_usage = volume_cache.shutil.disk_usage
    needed = sum(a.nbytes for a in arrays)

    def usage(path):
        total, used, _ = real_usage(path)
        return type(real_usage(path))(total, used, needed)  # free: the volumes, but not the reserve

    monkeypatch.setattr(volume_cache.shutil, "disk_usage", usage)
    with pytest.raises(ArSSRError, match=r"converting 3 volume\(s\) needs .* GB free.*cache_dir"):
        cached_volumes(paths, folder)
    assert npy_files(folder) == []
    monkeypatch.setattr(volume_cache.shutil, "disk_usage", real_usage)
    cached_volumes(paths[:2], folder)
    # only the volumes still to convert count
    monkeypatch.setattr(volume_cache.shutil, "disk_usage",
                        lambda p: type(real_usage(p))(1, 0, volume_cache.FREE_SPACE_RESERVE + arrays[2].nbytes + 128))
    assert len(cached_volumes(paths, folder).arrays) == 3


def test_cache_folder_setting(monkeypatch, tmp_path):
    assert DataConfig().cache_dir == DEFAULT_CACHE_DIR
    monkeypatch.delenv(volume_cache.CACHE_ENV, raising=False)
    assert resolve_cache_dir(DEFAULT_CACHE_DIR) == volume_cache.Path.home() / ".cache/arssr-jax/volumes"
    monkeypatch.setenv(volume_cache.CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir(DEFAULT_CACHE_DIR) == tmp_path / "env"
    assert resolve_cache_dir("~/x") == volume_cache.Path.home() / "x"  # the variable moves the default only
    monkeypatch.setenv("SCRATCH_FOR_TEST", str(tmp_path))
    assert resolve_cache_dir("$SCRATCH_FOR_TEST/c") == tmp_path / "c"
    for off in (None, "", "off"):
        assert resolve_cache_dir(off) is None
    monkeypatch.setenv(volume_cache.CACHE_ENV, "off")
    assert resolve_cache_dir(DEFAULT_CACHE_DIR) is None
    # a file where the folder should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArSSRError, match="cannot create it"):
        cached_arrays([], tmp_path / "file" / "cache")


def test_concurrent_processes_convert_once(sources, tmp_path):
    """Two processes filling one cache at once: every entry complete, none written twice."""
    paths, _ = sources
    folder = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys
        from arssr_jax.data import cache
        written = []
        real = cache._write_entry
        cache._write_entry = lambda s, e: (written.append(s), real(s, e))
        cache.cached_arrays({paths!r}, {str(folder)!r}, progress=False)
        print(len(written))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(int(out.split()[-1]) for out, _ in outputs) == [0, 3]
    assert len(npy_files(folder)) == 3 and len(os.listdir(folder)) == 4
    for path, array in zip(paths, load_volumes(paths).arrays):
        np.testing.assert_array_equal(np.load(entry_path(folder, path)), array)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_cache_folder_is_not_part_of_a_run(tmp_path):
    """Moving the cache changes no batch, so a run resumes with another cache_dir."""
    from arssr_jax.training.config import TrainConfig, config_differences, tiny

    config = tiny(data_paths=("x.nii",))
    moved = config.replace(data=dataclass_replace(config.data, cache_dir=str(tmp_path)))
    assert config_differences(config, moved) == []
    assert TrainConfig.from_dict(json_roundtrip(moved.to_dict())).data.cache_dir == str(tmp_path)
    off = config.replace(data=dataclass_replace(config.data, cache_dir=None))
    assert TrainConfig.from_dict(json_roundtrip(off.to_dict())).data.cache_dir is None


def json_roundtrip(values):
    import json

    return json.loads(json.dumps(values))
