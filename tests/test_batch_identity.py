"""Training batches are fixed by the seed: checksums recorded from the code that made them.

A change to the input pipeline, the tasks or the order of random draws that alters a
single bit of a batch fails here. The numbers were computed before the task/data split
(issue #16) and must never change for these configs; update them only for a deliberate
change of the batches (and say so in the commit).
"""

import dataclasses
import hashlib

import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.data import AugmentConfig, DataConfig, load_volumes, make_train_iterator
from arssr_jax.training import baseline, make_tricubic_pair

SMALL = dict(patch_size=24, lr_size=6, samples_per_step=300, batch_size=4, min_foreground=0.2,
             foreground_threshold=0.5, max_tries=4, seed=11, cache_dir=None)
EVERYTHING = AugmentConfig(flip=True, permute=True, gamma=0.3, intensity_scale=0.2, bias_field=0.3,
                           noise_std=0.05, contrast=0.5, rician_noise=0.03, bright_spots=0.5, blur=0.5,
                           mask_cut=0.5, mask_ramp=0.5, clip_lr=0.5)


def smooth_volume(shape, seed):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)


@pytest.fixture(scope="module")
def volumes():
    return load_volumes([smooth_volume((30, 32, 28), 0), smooth_volume((26, 40, 30), 1)])


def checksum(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            array = np.ascontiguousarray(batch[key])
            digest.update(f"{key}{array.shape}{array.dtype}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def batches(config: DataConfig, volumes, steps=3, **options):
    iterator = make_train_iterator(config, volumes, process_index=0, process_count=1, **options)
    try:
        return [next(iterator) for _ in range(steps)]
    finally:
        iterator.close()


@pytest.mark.parametrize("name, changes, expected", [
    ("plain", {}, "ad1af449e99be9b9"),
    ("anisotropic, reference rounding and degradation",
     dict(anisotropic=True, rounding="reference", degrade="reference"), "5cb7d04c53e2df0a"),
    ("every augmentation", dict(augment=EVERYTHING), "3deaaeb6ef0f5dea"),
])
def test_arssr_batches_are_fixed(volumes, name, changes, expected):
    got = batches(DataConfig(**{**SMALL, **changes}), volumes)
    assert set(got[0]) == {"lr", "coords", "values"}
    assert checksum(got) == expected, name


def baseline_data(scale: float, **changes) -> DataConfig:
    config = baseline("SRCNN3D", scale, data_paths=())
    return dataclasses.replace(config.data, lr_size=6, patch_size=int(6 * scale), seed=5, cache_dir=None,
                               min_foreground=0.2, foreground_threshold=0.5, **changes)


@pytest.mark.parametrize("scale, changes, expected", [
    (2.0, {}, "7d24bb38b1cdacc9"),
    (2.0, dict(worker_count=1), "7d24bb38b1cdacc9"),  # the example maker travels to a grain worker
    (2.5, dict(augment=EVERYTHING), "7ca422fc165fe84e"),
])
def test_baseline_batches_are_fixed(volumes, scale, changes, expected):
    got = batches(baseline_data(scale, **changes), volumes, make_example=make_tricubic_pair)
    assert set(got[0]) == {"input", "target"}
    assert checksum(got) == expected
