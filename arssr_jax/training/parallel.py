"""Data parallelism: ``jax.pmap`` over this process's devices, several processes via
``jax.distributed``.

Every device holds a replica of the train state; each step, the global batch
(``data.batch_size``) is split evenly: process p gets its share from the input pipeline
and :func:`shard` splits that over its local devices. ``train_step`` averages gradients
with ``lax.pmean`` over the axis ``"batch"``, which spans every device of every process.

Multi-host: :func:`initialize` calls ``jax.distributed.initialize`` (before anything
touches a JAX backend) from a :class:`DistributedConfig` built from CLI flags or the
environment variables ``ARSSR_COORDINATOR_ADDRESS``, ``ARSSR_NUM_PROCESSES``,
``ARSSR_PROCESS_ID`` (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` are read too). On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import numpy as np

from arssr_jax.errors import ArSSRError

AXIS_NAME = "batch"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (all None: a single process)."""

    coordinator_address: Optional[str] = None  # "host:port" of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    cpu_collectives: str = "gloo"  # CPU cross-process collectives ("gloo" or "mpi")

    @property
    def enabled(self) -> bool:
        return self.coordinator_address is not None or (self.num_processes or 1) > 1

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "DistributedConfig":
        """Values from ARSSR_* (or JAX_*) environment variables; explicit overrides win."""
        environ = os.environ if environ is None else environ

        def read(name, convert=str):
            for prefix in ("ARSSR_", "JAX_"):
                value = environ.get(prefix + name)
                if value not in (None, ""):
                    try:
                        return convert(value)
                    except ValueError:
                        raise ArSSRError(f"environment variable {prefix + name}={value!r} is not valid") from None
            return None

        values = {"coordinator_address": read("COORDINATOR_ADDRESS"),
                  "num_processes": read("NUM_PROCESSES", int), "process_id": read("PROCESS_ID", int)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_initialized = False


def initialize(config: DistributedConfig) -> bool:
    """Join the multi-process run described by ``config``; False when single-process.

    Must run before any JAX computation in this process.
    """
    global _initialized
    if not config.enabled:
        return False
    if _initialized:
        return True
    missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(config, n) is None]
    if missing:
        raise ArSSRError(f"multi-process training needs {', '.join(missing)}: pass --coordinator, "
                         "--num-processes and --process-id (or the ARSSR_* environment variables)")
    if not 0 <= config.process_id < config.num_processes:
        raise ArSSRError(f"--process-id {config.process_id} must lie in [0, {config.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id)
    except RuntimeError as error:
        raise ArSSRError(f"could not join the multi-process run at {config.coordinator_address} "
                         f"({str(error).splitlines()[0]}); check the address and that every process started") from None
    _initialized = True
    return True


def device_batch(global_batch: int) -> int:
    """Samples per device; ArSSRError unless the global batch splits evenly."""
    devices, processes = jax.local_device_count(), jax.process_count()
    total = devices * processes
    if global_batch % total:
        raise ArSSRError(f"the global batch ({global_batch}) must divide evenly over {processes} process(es) x "
                         f"{devices} device(s) = {total}; change data.batch_size or the device count")
    return global_batch // total


def shard(batch):
    """This process's batch (b, ...) -> (local devices, b / local devices, ...)."""
    n = jax.local_device_count()

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ArSSRError(f"a batch of {x.shape[0]} cannot be split over {n} local devices")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


def replicate(tree):
    """One copy of every leaf on each local device (leading axis = local device count).

    Placed by a pmapped identity, so the arrays carry exactly the layout pmap itself
    produces (single- and multi-process alike) and the first step moves no data.
    """
    n = jax.local_device_count()
    stacked = jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
    return jax.pmap(lambda x: x, axis_name=AXIS_NAME)(stacked)


def unreplicate(tree):
    """The first local replica of every leaf, as numpy."""

    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return jax.tree_util.tree_map(first, tree)


def pmap_step(step: Callable, donate: bool = True) -> Callable:
    """``jax.pmap`` of a step built with ``axis_name=AXIS_NAME`` (state buffers donated)."""
    return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())


def is_main_process() -> bool:
    return jax.process_index() == 0
