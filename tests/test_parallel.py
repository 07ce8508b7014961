"""Data parallelism: 4 simulated devices, and 2 processes x 2 devices over gloo, give the
parameters one device computes from the same global batches.

Both run in subprocesses: the device count must be fixed (XLA_FLAGS) before JAX starts,
and each process of a multi-process run is its own interpreter.
"""

import json
import os
import subprocess
import sys
import textwrap

import nibabel
import numpy as np
import pytest
from processes import free_port, run_together

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("ARSSR_COORDINATOR_ADDRESS", "ARSSR_NUM_PROCESSES", "ARSSR_PROCESS_ID",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


MULTI_DEVICE = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, numpy as np
    from arssr_jax.data import make_train_iterator
    from arssr_jax.errors import ArSSRError
    from arssr_jax.training import baseline, tiny, create_train_state, make_optimizer, make_task, make_train_step
    from arssr_jax.training import parallel

    assert jax.local_device_count() == 4, jax.devices()

    def compare(config):
        config = config.replace(data=dataclasses.replace(config.data, batch_size=8))
        task = make_task(config)
        tx, schedule = make_optimizer(config.optim, steps_per_epoch=1)  # lr halves every 10 steps
        state = create_train_state(task.init_params, tx, 0)
        iterator = make_train_iterator(config.data, make_example=task.make_example, process_index=0, process_count=1)
        batches = [next(iterator) for _ in range(3)]
        iterator.close()

        single = jax.jit(make_train_step(task.loss, tx, schedule))
        s = state
        losses_1 = []
        for b in batches:
            s, m = single(s, b)
            losses_1.append(float(m["loss"]))

        mapped = parallel.pmap_step(make_train_step(task.loss, tx, schedule, axis_name=parallel.AXIS_NAME))
        r = parallel.replicate(state)
        losses_4 = []
        for b in batches:
            r, m = mapped(r, parallel.shard(b))
            losses_4.append(np.asarray(m["loss"]).tolist())
        p1 = jax.tree_util.tree_leaves(jax.device_get(s.params))
        p4 = jax.tree_util.tree_leaves(jax.device_get(r.params))
        worst = 0.0
        for a, b in zip(p1, p4):
            b = np.asarray(b)
            assert b.shape == (4,) + a.shape
            assert np.array_equal(b[0], b[3]), "replicas diverged"
            # Adam divides by sqrt(v): gradients summed in another order can move a parameter
            # whose gradient is near zero by a few 1e-6 (a small fraction of one update).
            np.testing.assert_allclose(b[0], a, rtol=1e-5, atol=1e-5)
            worst = max(worst, float(np.max(np.abs(b[0] - a))))
        assert int(np.asarray(r.step)[0]) == 3
        return {"losses_1": losses_1, "losses_4": losses_4, "max_abs_diff": worst}

    arssr = compare(tiny(data_paths=(sys.argv[1],)))
    small = baseline("SRCNN3D", 2.0, data_paths=(sys.argv[1],), options={"kernels": [3, 1, 3], "filters": [8, 4]})
    small = small.replace(data=dataclasses.replace(small.data, lr_size=6, patch_size=12))
    srcnn = compare(small)
    try:
        parallel.device_batch(6)
        raise AssertionError("a batch of 6 over 4 devices must be refused")
    except ArSSRError as error:
        assert "divide evenly" in str(error)
    print(json.dumps({"arssr": arssr, "baseline": srcnn}))
""")


def test_four_devices_match_one_device(tmp_path):
    """ArSSR and a fixed-scale baseline: the pmapped step == the single-device step."""
    script = tmp_path / "multi_device.py"
    script.write_text(MULTI_DEVICE)
    result = subprocess.run([sys.executable, str(script), ANATOMICAL], env=_env(4), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    for report in reports.values():
        for loss, per_device in zip(report["losses_1"], report["losses_4"]):
            np.testing.assert_allclose(per_device, [loss] * 4, rtol=1e-5)


WORKER = textwrap.dedent("""
    import sys
    import jax
    from arssr_jax.training.parallel import DistributedConfig, initialize

    process_id, port, workdir, volume = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    initialize(DistributedConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id))
    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4
    from arssr_jax.training import tiny, train

    result = train(tiny(data_paths=(volume,)), workdir, steps=3, quiet=True)
    print("done", process_id, result.step, flush=True)
""")


def test_two_processes_match_one_process(tmp_path):
    """2 processes x 2 CPU devices (gloo), through the whole loop and its checkpoints."""
    from arssr_jax.training import tiny, train
    from arssr_jax.weights import load_inference_params

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workdir = tmp_path / "two_processes"
    port = str(free_port())
    commands = [[sys.executable, str(script), str(i), port, str(workdir), ANATOMICAL] for i in range(2)]
    for code, out, err in run_together(commands, [_env(2)] * 2):
        assert code == 0, err[-3000:]
        assert "done" in out

    single = tmp_path / "one_process"
    train(tiny(data_paths=(ANATOMICAL,)), single, steps=3, quiet=True)
    _, params_2 = load_inference_params(workdir, step=3)
    _, params_1 = load_inference_params(single, step=3)
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert records[0]["processes"] == 2 and records[0]["local_devices"] == 2


def test_device_batch_and_shard():
    from arssr_jax.training import parallel

    import jax

    n = jax.local_device_count()
    assert parallel.device_batch(4 * n) == 4
    batch = {"lr": np.zeros((2 * n, 6, 6, 6, 1), np.float32)}
    assert parallel.shard(batch)["lr"].shape == (n, 2, 6, 6, 6, 1)
    if n == 1:
        assert parallel.device_batch(3) == 3


def test_distributed_config_from_env():
    from arssr_jax.errors import ArSSRError
    from arssr_jax.training.parallel import DistributedConfig, initialize

    config = DistributedConfig.from_env({"ARSSR_COORDINATOR_ADDRESS": "10.0.0.1:1234", "ARSSR_NUM_PROCESSES": "4",
                                         "JAX_PROCESS_ID": "2"})
    assert config == DistributedConfig("10.0.0.1:1234", 4, 2)
    assert DistributedConfig.from_env({"ARSSR_PROCESS_ID": "1"}, process_id=3).process_id == 3
    assert not DistributedConfig.from_env({}).enabled
    assert initialize(DistributedConfig()) is False
    with pytest.raises(ArSSRError, match="--process-id"):
        initialize(DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2))
    with pytest.raises(ArSSRError, match="not valid"):
        DistributedConfig.from_env({"ARSSR_NUM_PROCESSES": "two"})
