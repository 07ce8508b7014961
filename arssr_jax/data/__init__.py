"""Training input pipeline: HR volumes -> random patches -> examples -> batches.

An example maker turns each patch draw into one batch element; the default,
``make_sample``, gives (LR, K coords, values); a training task may pass its own.

See ``pipeline`` for the indexing, sharding and checkpointing rules, ``degrade`` for
the two down-sampling modes and ``samples`` for the per-sample transform.
"""

from arssr_jax.data.config import AugmentConfig, DataConfig
from arssr_jax.data.degrade import degrade, degrade_centred, degrade_reference
from arssr_jax.data.pipeline import (
    StepBatch,
    TrainIterator,
    global_sample,
    make_dataset,
    make_train_iterator,
)
from arssr_jax.data.samples import (
    DEFAULT_VALIDATION_SCALES,
    ExampleMaker,
    PointSample,
    draw_scales,
    hr_shape,
    make_patch,
    make_sample,
    validation_samples,
)
from arssr_jax.data.volumes import VolumeSet, find_volume_files, load_volumes

__all__ = [
    "AugmentConfig", "DataConfig", "degrade", "degrade_centred", "degrade_reference",
    "StepBatch", "TrainIterator", "global_sample", "make_dataset", "make_train_iterator",
    "DEFAULT_VALIDATION_SCALES", "ExampleMaker", "PointSample", "draw_scales", "hr_shape", "make_patch", "make_sample",
    "validation_samples", "VolumeSet", "find_volume_files", "load_volumes",
]
