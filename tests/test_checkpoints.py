"""Checkpoints: exact resume, keep rules, crash-safe saves, inference loading."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import nibabel
import numpy as np
import pytest

from arssr_jax.errors import ArSSRError
from arssr_jax.training import CheckpointStore, TrainState, tiny, train
from arssr_jax.weights import load_inference_params

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_state(value: float, step: int = 0) -> TrainState:
    params = {"decoder": {"w": np.full((3, 2), value, np.float32)}, "b": np.arange(4, dtype=np.float32) + value}
    return TrainState(step=np.int32(step), params=params, opt_state=(np.float32(value), {"m": np.zeros(2, np.float32)}),
                      rng=np.array([0, step], np.uint32))


def _states_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a.to_dict()), jax.tree_util.tree_leaves(b.to_dict())
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_resume_equals_straight_run(tmp_path):
    """6 steps straight == 3 steps, stop, resume from the checkpoint with fresh objects, 3 more."""
    config = tiny(data_paths=(ANATOMICAL,))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, straight, steps=6, quiet=True)
    first = train(config, resumed, steps=3, quiet=True)
    assert first.step == 3
    second = train(config, resumed, steps=6, quiet=True)  # new iterator, state, store: restores step 3
    assert second.step == 6

    store_a, store_b = CheckpointStore(straight, read_only=True), CheckpointStore(resumed, read_only=True)
    try:
        for store in (store_a, store_b):
            assert store.latest_step() == 6
        a, b = store_a.restore_raw(6), store_b.restore_raw(6)
        leaves_a, leaves_b = jax.tree_util.tree_leaves(a["state"]), jax.tree_util.tree_leaves(b["state"])
        assert len(leaves_a) == len(leaves_b) > 10
        for x, y in zip(leaves_a, leaves_b):  # params, Adam moments, step, rng: bitwise
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert a["data"]["step"] == b["data"]["step"] == 6
        assert int(np.asarray(b["state"]["step"])) == 6
    finally:
        store_a.close()
        store_b.close()
    # the log shows the resumed run continued at step 4
    steps = [r["step"] for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_interrupt_saves_the_steps_since_the_last_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while step 5's batch is read, after the checkpoint at step 3: the run
    saves step 4 (no validation) and re-raises; resumed, it ends exactly as a straight run."""
    from arssr_jax.training import loop

    config = tiny(data_paths=(ANATOMICAL,))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(config, straight, steps=6, quiet=True)

    make_iterator = loop.make_train_iterator

    class Interrupting:
        """The run's iterator, interrupted when step 5's batch is asked for."""

        def __init__(self, *args, **kwargs):
            self._iterator = make_iterator(*args, **kwargs)

        def __next__(self):
            if self._iterator.step == 4:
                raise KeyboardInterrupt
            return next(self._iterator)

        def __getattr__(self, name):
            return getattr(self._iterator, name)

    monkeypatch.setattr(loop, "make_train_iterator", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(config, interrupted, steps=6, quiet=True)
    monkeypatch.undo()
    store = CheckpointStore(interrupted, read_only=True)
    try:
        assert store.all_steps() == [3, 4] and store.metrics(4) is None and store.best_step() == 3
    finally:
        store.close()
    assert train(config, interrupted, steps=6, quiet=True).step == 6

    store_a, store_b = CheckpointStore(straight, read_only=True), CheckpointStore(interrupted, read_only=True)
    try:
        a, b = store_a.restore_raw(6), store_b.restore_raw(6)
        for x, y in zip(jax.tree_util.tree_leaves(a["state"]), jax.tree_util.tree_leaves(b["state"])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    finally:
        store_a.close()
        store_b.close()
    steps = [r["step"] for r in map(json.loads, (interrupted / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_keeps_last_n_and_best(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step, l1 in [(1, 0.5), (2, 0.1), (3, 0.3), (4, 0.4), (5, 0.35)]:
        store.save(step, _small_state(float(step), step), {"step": step}, {"val_l1": l1, "val_psnr": 20.0})
    assert store.all_steps() == [2, 4, 5]
    assert store.best_step() == 2
    store.close()
    reopened = CheckpointStore(tmp_path, keep_last=2)  # the rules survive a restart
    reopened.save(6, _small_state(6.0, 6), {"step": 6}, {"val_l1": 0.2})
    assert reopened.all_steps() == [2, 5, 6] and reopened.best_step() == 2
    state, data = reopened.restore(2, _small_state(0.0))
    assert _states_equal(state, _small_state(2.0, 2)) and data == {"step": 2}
    reopened.close()


CRASH = textwrap.dedent("""
    import os, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from arssr_jax.training import CheckpointStore, TrainState

    def state(v, step):
        return TrainState(step=np.int32(step), params={"w": np.full((64, 64), v, np.float32)},
                          opt_state=(np.float32(v),), rng=np.array([0, step], np.uint32))

    store = CheckpointStore(sys.argv[1], keep_last=1)
    store.save(1, state(1.0, 1), {"step": 1}, {"val_l1": 0.5})
    original = ocp.JsonCheckpointHandler._save_fn

    def crash(self, item, directory):
        if "data" in str(directory):  # the params are on disk, the data item is half-written
            (directory / self._filename).write_text('{"step": ')
            print("crashing", flush=True)
            os._exit(17)
        return original(self, item, directory)

    ocp.JsonCheckpointHandler._save_fn = crash
    store.save(2, state(2.0, 2), {"step": 2}, {"val_l1": 0.1})
""")


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 17 and "crashing" in result.stdout, result.stderr[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir() if p.name != "1"]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers  # the half-written step 2

    store = CheckpointStore(tmp_path / "run", keep_last=1)
    assert store.all_steps() == [1] and store.latest_step() == 1
    template = TrainState(step=np.int32(0), params={"w": np.zeros((64, 64), np.float32)},
                          opt_state=(np.float32(0),), rng=np.zeros(2, np.uint32))
    state, data = store.restore(1, template)
    assert float(state.params["w"][0, 0]) == 1.0 and data == {"step": 1}
    store.save(2, state, {"step": 2}, {"val_l1": 0.6})  # saving works again (1 stays: the best)
    assert store.all_steps() == [1, 2]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]  # the temporary folder is gone
    store.close()


def test_load_inference_params_errors(tmp_path):
    with pytest.raises(ArSSRError, match="train_config.json"):
        load_inference_params(tmp_path)
    from arssr_jax.training.config import save_config

    save_config(tiny(data_paths=(ANATOMICAL,)), tmp_path)
    with pytest.raises(ArSSRError, match="not a training workdir"):
        load_inference_params(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ArSSRError, match="no checkpoint yet"):
        load_inference_params(tmp_path)
