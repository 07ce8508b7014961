"""Cluster launch: `arssr-jax train` joins a multi-process run from the variables a SLURM step
sets (JAX's own detection, no addresses given), the explicit flags win, and a one-task job
runs single-process.

The two-process test runs the CLI twice on 127.0.0.1 as `srun -n 2` would start it, each
process with 2 CPU devices (gloo), and compares the parameters with a single-process run of
the same global batch.
"""

import json
import os
import sys

import nibabel
import numpy as np
import pytest
from processes import free_port, run_together

from arssr_jax.errors import ArSSRError
from arssr_jax.training import parallel
from arssr_jax.training.parallel import DistributedConfig, detect_cluster, launch_plan

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "ARSSR_COORDINATOR", "ARSSR_NUM_PROCESSES", "ARSSR_PROCESS_ID",
                   "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _slurm(ntasks, procid, job_id=4242, nodes=1, nodelist="127.0.0.1"):
    """The variables a SLURM step (srun) sets that JAX reads (jax._src.clusters.SlurmCluster)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % max(1, ntasks // nodes)), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes)}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables of the machine the tests run on."""
    for name in list(os.environ):
        if name.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


def _set(monkeypatch, values):
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_slurm_step_is_detected_and_flags_win(clean_env):
    assert detect_cluster() is None
    assert launch_plan(DistributedConfig(), None) is None

    _set(clean_env, _slurm(ntasks=2, procid=1))
    cluster = detect_cluster()
    assert cluster is not None and cluster.name == "slurm"
    plan = launch_plan(DistributedConfig(), cluster)
    # JAX fills in the address (first node, port from the job id or JAX_COORDINATOR_PORT) and the rank
    assert (plan.source, plan.num_processes, plan.coordinator_address, plan.process_id) == ("slurm", 2, None, None)
    assert plan.cluster_detection_method == "slurm"
    assert plan.local_device_ids is None  # 2 tasks on one node: JAX's one device per task
    assert cluster.get_coordinator_address(None, "1234") == "127.0.0.1:1234"
    assert cluster.get_process_id() == 1

    # a given value wins over the detected one; the rest is still detected
    plan = launch_plan(DistributedConfig(coordinator_address="10.0.0.5:999"), cluster)
    assert (plan.coordinator_address, plan.process_id, plan.num_processes) == ("10.0.0.5:999", None, 2)
    # all three given: JAX's detection is off, the flags are the whole story
    plan = launch_plan(DistributedConfig("10.0.0.5:999", 3, 2), cluster)
    assert (plan.source, plan.num_processes, plan.process_id) == ("flags", 3, 2)
    assert plan.cluster_detection_method == "deactivate"
    with pytest.raises(ArSSRError, match="--process-id 5"):
        launch_plan(DistributedConfig(process_id=5), cluster)

    # one task per node: every device of the node is this process's (pmap uses them all)
    _set(clean_env, _slurm(ntasks=2, procid=1, nodes=2, nodelist="gpu[017-018]"))
    plan = launch_plan(DistributedConfig(), detect_cluster())
    assert plan.local_device_ids == []
    assert detect_cluster().get_coordinator_address(None, None) == f"gpu017:{4242 % 4096 + 61440}"


def test_one_task_slurm_job_runs_single_process(clean_env):
    _set(clean_env, _slurm(ntasks=1, procid=0))
    lines = []
    assert parallel.initialize(DistributedConfig(), log=lines.append) is False
    assert lines == ["SLURM detected with one process: training single-process"]
    assert parallel.initialize(DistributedConfig(), detect=False, log=lines.append) is False
    assert len(lines) == 1
    # outside any cluster, partial flags still name what is missing
    with pytest.raises(ArSSRError, match="--process-id"):
        launch_plan(DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2), None)


def _process_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", ARSSR_JAX_CACHE="off",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def test_two_slurm_tasks_form_one_run(tmp_path):
    """`srun -n 2 arssr-jax train ...` on one node: no address given, one job, the one-process result."""
    from arssr_jax.training import tiny, train
    from arssr_jax.training.checkpoints import load_trained

    workdir = tmp_path / "slurm"
    port = str(free_port())
    command = [sys.executable, "-m", "arssr_jax.cli", "train", "--config", "tiny", "--data", ANATOMICAL,
               "--workdir", str(workdir), "--steps", "3"]
    envs = [_process_env({**_slurm(ntasks=2, procid=i), "JAX_COORDINATOR_PORT": port}) for i in range(2)]
    results = run_together([command] * 2, envs, cwd=tmp_path)
    for i, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        assert f"arssr-jax train: multi-process run (SLURM): process {i} of 2, coordinator 127.0.0.1:{port}" in out
    assert "global batch 4 = 2 process(es) x 2 device(s) x 1" in results[0][1]
    assert "done: step 3" not in results[1][1]  # only process 0 reports and writes

    single = tmp_path / "one_process"
    train(tiny(data_paths=(ANATOMICAL,)), single, steps=3, quiet=True)
    _, params_2, step_2 = load_trained(workdir)
    _, params_1, step_1 = load_trained(single)
    assert step_1 == step_2 == 3
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert records[0]["processes"] == 2 and records[0]["local_devices"] == 2
    assert records[-1]["event"] == "end" and records[-1]["step"] == 3

    # process 0 alone wrote the shared files: one event file (with tensorboardX), the curves
    assert (workdir / "curves.png").is_file()
    events = sorted(workdir.glob("events.out.tfevents.*"))
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        assert not events
    else:
        assert len(events) == 1
        from arssr_jax.training.events import read_scalars

        scalars = read_scalars(workdir)
        assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]  # tiny logs every step
        assert [s for s, _ in scalars["val/psnr"]] == [3]
        assert scalars["interpolation/psnr"][0][1] == pytest.approx(records[0]["interpolation"]["val_psnr"], rel=1e-6)
