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
``JAX_PROCESS_ID`` are read too). Without them, a cluster launch is recognised by JAX's
own detection (:func:`detect_cluster`: a SLURM step, Open MPI's ``mpirun``, a Cloud TPU
pod) and ``jax.distributed.initialize`` fills in what the flags leave open; a cluster
of one process (a single-task SLURM job, a one-host TPU VM) runs single-process. On CPU
the cross-process collectives use gloo.
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


# JAX's cluster environments (jax._src.clusters) that a launch is recognised from: SLURM,
# Open MPI (mpirun/mpiexec) and Cloud TPU VMs (GCE, GKE). Kubernetes and mpi4py need the
# explicit flags (or JAX_* variables).
CLUSTERS = {"slurm": "SLURM", "ompi": "Open MPI", "gcetpu": "Cloud TPU", "gketpu": "Cloud TPU (GKE)"}


def detect_cluster():
    """The cluster environment JAX's ``jax.distributed.initialize()`` would use here (a
    ``jax._src.clusters.ClusterEnv`` subclass of :data:`CLUSTERS`, tried in JAX's order), or None."""
    try:
        from jax._src import clusters
    except ImportError:  # a JAX without the module: only the explicit flags
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "name", None) not in CLUSTERS or getattr(env, "opt_in_only_method", False):
            continue
        try:
            present = env.is_env_present()
        except Exception:  # a metadata server that does not answer, a malformed variable
            present = False
        if present:
            return env
    return None


def _one_process_per_node(name: str, environ) -> bool:
    """Whether the launcher started one process per node (then each sees all its node's
    devices, which pmap uses; else JAX gives each process the device of its local rank)."""
    try:
        if name == "slurm":
            nodes = next(environ[v] for v in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
                         if environ.get(v))
            tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"]
            return int(tasks) == int(nodes)
        if name == "ompi":
            return int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"]) == 1
    except (KeyError, StopIteration, ValueError):
        pass
    return False


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What :func:`initialize` passes to ``jax.distributed.initialize`` (None: JAX detects it)."""

    source: str                            # "flags" or a key of CLUSTERS
    num_processes: int                     # as far as known before joining
    coordinator_address: Optional[str] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list] = None  # [] = every device this process sees
    cluster_detection_method: Optional[str] = None

    def kwargs(self) -> dict:
        return {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
                "process_id": self.process_id, "local_device_ids": self.local_device_ids,
                "cluster_detection_method": self.cluster_detection_method}


def launch_plan(config: DistributedConfig, cluster=None, environ=None) -> Optional[LaunchPlan]:
    """How this process joins a run: None for a single process.

    The explicit values (flags, ARSSR_*/JAX_* variables) win. All three given: JAX's cluster
    detection is off. Some or none given: the detected ``cluster`` (:func:`detect_cluster`)
    supplies the rest; a cluster of one process is a single-process run.
    """
    environ = os.environ if environ is None else environ
    explicit = (config.coordinator_address, config.num_processes, config.process_id)
    if None not in explicit:
        if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
            raise ArSSRError(f"--process-id {config.process_id} must lie in [0, {config.num_processes})")
        return LaunchPlan("flags", config.num_processes, config.coordinator_address, config.process_id,
                          cluster_detection_method="deactivate")
    if cluster is None:
        if config.enabled:
            missing = [n for n, v in zip(("coordinator_address", "num_processes", "process_id"), explicit) if v is None]
            raise ArSSRError(f"multi-process training needs {', '.join(missing)}: pass --coordinator, "
                             "--num-processes and --process-id (or the ARSSR_* environment variables), or launch "
                             "under SLURM (srun), Open MPI (mpirun) or on a Cloud TPU pod, where they are detected")
        return None
    name = cluster.name
    try:
        count = config.num_processes if config.num_processes is not None else int(cluster.get_process_count())
    except Exception as error:
        raise ArSSRError(f"{CLUSTERS[name]} detected, but its process count could not be read ({error}); "
                         "pass --coordinator, --num-processes and --process-id") from None
    if count <= 1 and config.coordinator_address is None:
        return None
    if config.process_id is not None and not 0 <= config.process_id < count:
        raise ArSSRError(f"--process-id {config.process_id} must lie in [0, {count})")
    local = [] if (_one_process_per_node(name, environ) and not environ.get("JAX_LOCAL_DEVICE_IDS")) else None
    return LaunchPlan(name, count, config.coordinator_address, config.process_id, local, name)


def initialize(config: DistributedConfig, *, detect: bool = True, log=None) -> bool:
    """Join the multi-process run described by ``config`` (and, with ``detect``, by the
    cluster JAX recognises); False when single-process.

    ``log``: a callable given one line saying how this process was launched (the cluster,
    this process's index and the count). Must run before any JAX computation in this process.
    """
    if jax.distributed.is_initialized():  # JAX's own record, not a module global
        return True
    cluster = detect_cluster() if detect else None
    plan = launch_plan(config, cluster)
    if plan is None:
        if cluster is not None and log is not None:
            log(f"{CLUSTERS[cluster.name]} detected with one process: training single-process")
        return False
    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    where = "the flags" if plan.source == "flags" else CLUSTERS[plan.source]
    try:
        jax.distributed.initialize(**plan.kwargs())
    except (RuntimeError, ValueError) as error:
        address = plan.coordinator_address or "the coordinator"
        raise ArSSRError(f"could not join the multi-process run ({where}) at {address} "
                         f"({str(error).splitlines()[0]}); check the address and that every process started"
                         + ("" if plan.source == "flags" else
                            "; under SLURM start one process per task with srun")) from None
    if log is not None:
        state = _distributed_state()
        log(f"multi-process run ({where}): process {state.get('process_id', plan.process_id)} of "
            f"{state.get('num_processes', plan.num_processes)}, coordinator "
            f"{state.get('coordinator_address', plan.coordinator_address)}")
    return True


def _distributed_state() -> dict:
    """What ``jax.distributed.initialize`` settled on (JAX's record of it; empty if unreadable)."""
    try:
        from jax._src.distributed import global_state
    except ImportError:
        return {}
    values = {n: getattr(global_state, n, None) for n in ("process_id", "num_processes", "coordinator_address")}
    return {k: v for k, v in values.items() if v is not None}


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
