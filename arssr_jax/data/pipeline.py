"""grain assembly: a deterministic, sharded, checkpointable stream of training batches.

Indexing: step t's global batch holds samples i = 0..B-1 (B = ``batch_size``, the
global batch). Sample (t, i) has the global index g = t*B + i and is a pure
function of (seed, g):

* its volume: epoch e = g // S, S = samples_per_volume * num_volumes; a
  permutation of range(S) drawn from (seed, 1, e) assigns position g % S to
  volume perm[g % S] // samples_per_volume, so every volume gives exactly
  ``samples_per_volume`` patches per epoch, in a shuffled order;
* everything else (scale, position, augmentation, the example's own draws): a
  ``np.random.Generator`` seeded with (seed, 0, g), handed to the example maker
  (``make_example``, default :data:`~arssr_jax.data.samples.make_sample`; a training task
  passes its own, see :class:`~arssr_jax.data.samples.ExampleMaker`).

Sharding: process p of P yields the samples i in [p*b, (p+1)*b), b = B // P, of
every step. The union over processes is exactly the single-process batch for the
same seed, whatever the number of processes, workers or threads.

The grain pipeline is ``MapDataset.range(start, stop)`` (one element per step)
``.map(StepBatch)`` ``.to_iter_dataset(ReadOptions)`` ``.mp_prefetch(...)``:
worker processes each compute whole batches of a strided slice of the steps and
grain interleaves them back in step order.
"""

from __future__ import annotations

import sys
from typing import Dict, Optional

import grain
import numpy as np

from arssr_jax.data.config import DataConfig
from arssr_jax.data.samples import ExampleMaker, make_sample
from arssr_jax.data.volumes import VolumeSet, check_patch_fits, load_volumes
from arssr_jax.errors import ArSSRError

Batch = Dict[str, np.ndarray]


def sample_rng(seed: int, global_index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0, int(global_index)])


def volume_for_sample(seed: int, global_index: int, num_volumes: int,
                      samples_per_volume: int) -> int:
    """The volume sample ``global_index`` is cut from (balanced per epoch)."""
    per_epoch = num_volumes * samples_per_volume
    epoch, position = divmod(int(global_index), per_epoch)
    order = np.random.default_rng([int(seed), 1, epoch]).permutation(per_epoch)
    return int(order[position]) // samples_per_volume


def global_sample(volumes: VolumeSet, config: DataConfig, step: int, index: int,
                  make_example: ExampleMaker = make_sample) -> Batch:
    """Sample ``index`` (0 <= index < batch_size) of global step ``step``."""
    g = int(step) * config.batch_size + int(index)
    v = volume_for_sample(config.seed, g, len(volumes), config.samples_per_volume)
    return make_example(volumes.arrays[v], config, sample_rng(config.seed, g))


def stack_samples(samples) -> Batch:
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


def resolve_process(process_index: Optional[int], process_count: Optional[int]):
    if process_index is None or process_count is None:
        import jax  # only when not given, so worker processes never need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ArSSRError(f"process_index={process_index}: must lie in [0, {process_count})")
    return int(process_index), int(process_count)


def per_process_batch(config: DataConfig, process_count: int) -> int:
    if config.batch_size % process_count:
        raise ArSSRError(f"DataConfig.batch_size={config.batch_size}: the global batch must "
                         f"divide evenly over {process_count} processes; change batch_size")
    return config.batch_size // process_count


class StepBatch:
    """grain map transform: step index -> this process's share of that step's batch."""

    def __init__(self, volumes: VolumeSet, config: DataConfig, process_index: int,
                 process_count: int, make_example: ExampleMaker = make_sample):
        self.volumes = volumes
        self.config = config
        self.make_example = make_example
        b = per_process_batch(config, process_count)
        self.indices = range(process_index * b, (process_index + 1) * b)

    def __call__(self, step: int) -> Batch:
        return stack_samples([global_sample(self.volumes, self.config, step, i, self.make_example)
                              for i in self.indices])


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.x reads an absl flag when starting workers, which fails outside
    ``absl.app`` (google/grain#1355); mark flags parsed (defaults) if nobody has."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(volumes: VolumeSet, config: DataConfig, process_index: int,
                 process_count: int, start_step: int = 0,
                 make_example: ExampleMaker = make_sample) -> grain.IterDataset:
    """The grain pipeline yielding this process's batches from ``start_step`` on."""
    stop = sys.maxsize if config.num_steps is None else config.num_steps
    ds = grain.MapDataset.range(min(int(start_step), stop), stop)
    ds = ds.map(StepBatch(volumes, config, process_index, process_count, make_example))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.prefetch))
    if config.worker_count > 0:
        _allow_unparsed_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count,
            per_worker_buffer_size=max(1, config.prefetch)))
    return ds


class TrainIterator(grain.DatasetIterator):
    """Iterator over training batches with a small, portable state.

    ``get_state()`` is ``{"step": next step, "seed": ..., "batch_size": ...}``
    (JSON-able, so grain's orbax ``CheckpointHandler`` saves it as is);
    ``set_state`` restarts the pipeline at that step. The state does not depend
    on ``worker_count``, threads or the process layout, so a run may resume with
    different ones. Call ``close()`` to stop worker processes.
    """

    def __init__(self, volumes: VolumeSet, config: DataConfig, process_index: int,
                 process_count: int, start_step: int = 0, make_example: ExampleMaker = make_sample):
        self._inner = None
        super().__init__()
        self.volumes = volumes
        self.config = config
        self.make_example = make_example
        self.process_index = process_index
        self.process_count = process_count
        self.batch_per_process = per_process_batch(config, process_count)
        self._step = int(start_step)

    @property
    def step(self) -> int:
        """The step the next batch belongs to."""
        return self._step

    def _start(self):
        ds = make_dataset(self.volumes, self.config, self.process_index,
                          self.process_count, self._step, self.make_example)
        self._inner = iter(ds)

    def __next__(self) -> Batch:
        self._assert_not_closed()
        if self._inner is None:
            self._start()
        batch = next(self._inner)
        self._step += 1
        return batch

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._start()
        self._inner.start_prefetch()

    def get_state(self) -> dict:
        return {"step": self._step, "seed": int(self.config.seed),
                "batch_size": int(self.config.batch_size)}

    def set_state(self, state: dict) -> None:
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != int(getattr(self.config, key)):
                raise ArSSRError(f"data iterator state has {key}={state[key]} but the config "
                                 f"has {getattr(self.config, key)}; resume with the config "
                                 "the checkpoint was made with")
        self._stop_inner()
        self._step = int(state["step"])

    def _stop_inner(self):
        if getattr(self, "_inner", None) is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._stop_inner()
        super().close()

    def __str__(self) -> str:
        return (f"TrainIterator(step={self._step}, process {self.process_index}/"
                f"{self.process_count}, {len(self.volumes)} volumes)")


def make_train_iterator(config: DataConfig, volumes=None, *,
                        make_example: ExampleMaker = make_sample,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        start_step: int = 0) -> TrainIterator:
    """This process's iterator of training batches.

    ``volumes``: anything :func:`load_volumes` takes (None: ``config.paths``); NIfTI
    paths are memory-mapped from the volume cache ``config.cache_dir`` (see
    :mod:`arssr_jax.data.cache`; None: read into memory), so worker processes re-open
    the files instead of receiving copies of the arrays.
    Each batch stacks b = batch_size // process_count examples of ``make_example`` (checked
    against the config first); with the default :data:`~arssr_jax.data.samples.make_sample`:
    ``{"lr": (b, n, n, n, 1), "coords": (b, K, 3), "values": (b, K, 1)}`` float32,
    n = lr_size, K = samples_per_step.
    """
    make_example.validate(config)
    process_index, process_count = resolve_process(process_index, process_count)
    if volumes is None:
        if not config.paths:
            raise ArSSRError("DataConfig.paths is empty and no volumes were given; set the "
                             "data paths")
        volumes = config.paths
    volumes = load_volumes(volumes, cache_dir=config.cache_dir)
    check_patch_fits(volumes, config.patch_size)
    return TrainIterator(volumes, config, process_index, process_count, start_step, make_example)
