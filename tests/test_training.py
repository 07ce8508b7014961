"""Training: the pure step, the schedule, configs, the loop on real data, the CLI."""

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import nibabel
import numpy as np
import pytest

from arssr_jax.errors import ArSSRError
from arssr_jax.models import predict
from arssr_jax.weights import load_inference_params
from arssr_jax.training import (
    OptimConfig,
    TrainConfig,
    create_train_state,
    load_config,
    make_optimizer,
    make_task,
    make_train_step,
    tiny,
    train,
)
from arssr_jax.training.config import config_differences, cpu_small, paper

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")


@pytest.fixture(scope="module")
def tiny_setup():
    config = tiny(data_paths=(ANATOMICAL,))
    task = make_task(config)
    model = task.model
    tx, schedule = make_optimizer(config.optim, steps_per_epoch=5)
    state = create_train_state(task.init_params, tx, 0)
    step = jax.jit(make_train_step(task.loss, tx, schedule))
    rng = np.random.default_rng(0)
    batch = {"lr": rng.random((2, 6, 6, 6, 1), np.float32),
             "coords": rng.uniform(-1, 1, (2, 64, 3)).astype(np.float32),
             "values": rng.random((2, 64, 1), np.float32)}
    return config, model, state, step, batch


def test_train_step_loss_lr_and_update(tiny_setup):
    config, model, state, step, batch = tiny_setup
    new, metrics = step(state, batch)
    expected = np.mean(np.abs(np.asarray(predict(model, state.params, batch["lr"], batch["coords"])) - batch["values"]))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-6)
    assert float(metrics["lr"]) == pytest.approx(config.optim.learning_rate)
    assert float(metrics["grad_norm"]) > 0 and bool(metrics["finite"])
    assert int(new.step) == 1 and not np.array_equal(np.asarray(new.rng), np.asarray(state.rng))
    # Adam's first step moves every parameter by at most the learning rate
    moves = [np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
             zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params))]
    assert max(moves) <= config.optim.learning_rate * 1.0001 and max(moves) > 0


def test_non_finite_step_keeps_the_state(tiny_setup):
    _, _, state, step, batch = tiny_setup
    bad = dict(batch, values=np.full_like(batch["values"], np.nan))
    new, metrics = step(state, bad)
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learning_rate_halves_every_n_epochs():
    _, schedule = make_optimizer(OptimConfig(learning_rate=1e-4, decay_every_epochs=2), steps_per_epoch=3)
    assert [float(schedule(s)) for s in (0, 5, 6, 11, 12)] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])
    config = paper()
    assert config.data.steps_per_epoch(780) == 312  # the paper: 780 subjects x 6 patches / 15
    assert config.decay_every_steps(312) == 200 * 312 and config.total_steps(312) == 2500 * 312


def test_configs_round_trip_and_load(tmp_path):
    for config in (paper(("a", "b")), cpu_small(), tiny()):
        again = TrainConfig.from_dict(json.loads(config.to_json()))
        assert again == config and not config_differences(config, again)
        config.validate()
    path = tmp_path / "run.json"
    path.write_text(cpu_small().replace(steps=7).to_json())
    assert load_config(path).steps == 7
    module = tmp_path / "mine.py"
    module.write_text("from arssr_jax.training.config import tiny\ndef get_config():\n    return tiny().replace(seed=3)\n")
    assert load_config(module).seed == 3
    assert load_config("paper").model.encoder == "RDN" and load_config("paper").data.samples_per_step == 8000
    bad = json.loads(tiny().to_json())
    bad["optim"]["learning_rat"] = 1.0
    path.write_text(json.dumps(bad))
    with pytest.raises(ArSSRError, match="learning_rat"):
        load_config(path)
    with pytest.raises(ArSSRError, match="not a preset"):
        load_config("no-such-config")
    assert config_differences(tiny(), tiny().replace(steps=9, seed=1)) == ["seed"]
    other_conv = tiny().replace(model=tiny().model.replace(conv_impl="lax"))
    assert config_differences(tiny(), other_conv) == []  # no parameter changes: resumable elsewhere
    older = json.loads(tiny().to_json())  # a run saved when the model's config held the consistency step
    older["model"]["consistency"] = [[2, 1.0], [4, 0.5]]
    assert type(tiny()).from_dict(older) == tiny()  # an inference option now: the run resumes
    assert config_differences(paper(), paper().replace(data=dataclasses.replace(paper().data, worker_count=0, prefetch=1))) == []
    assert config_differences(tiny(), other_conv.replace(model=other_conv.model.replace(feature_dim=5))) == ["model.feature_dim"]


def _small_baseline():
    from arssr_jax.training import baseline

    config = baseline("SRCNN3D", 2.0, data_paths=(ANATOMICAL,), options={"kernels": [3, 1, 3], "filters": [8, 4]})
    return config.replace(data=dataclasses.replace(config.data, lr_size=6, patch_size=12, batch_size=2,
                                                   samples_per_volume=20),
                          val=dataclasses.replace(config.val, patches_per_volume=1, every_steps=2), log_every=1)


def test_configs_from_before_the_task_split_load_and_resume(tmp_path):
    """train_config.json files written while DataConfig had ``task`` ("arssr" or "baseline",
    always agreeing with ``baseline``) load as today's configs, and their runs resume."""
    for config, task in ((tiny(), "arssr"), (_small_baseline(), "baseline")):
        old = json.loads(config.to_json())
        assert "task" not in old["data"]
        old["data"]["task"] = task
        path = tmp_path / f"{task}.json"
        path.write_text(json.dumps(old))
        assert load_config(path) == config and not config_differences(load_config(path), config)
        load_config(path).validate()

    config, workdir = _small_baseline(), tmp_path / "run"
    train(config, workdir, steps=2, quiet=True)
    saved = json.loads((workdir / "train_config.json").read_text())
    saved["data"]["task"] = "baseline"
    (workdir / "train_config.json").write_text(json.dumps(saved))
    assert train(config, workdir, steps=4, quiet=True).step == 4
    records = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r.get("event") == "validation"] == [2, 4]
    assert "task" not in json.loads((workdir / "train_config.json").read_text())["data"]


def test_validator_predicts_the_model_at_every_hr_voxel_centre(tiny_setup):
    """Validator.predict decodes through inference.decode_grid, in chunks that do not divide
    the patch: equal to the model at the sample's coordinates."""
    from arssr_jax.coords import make_grid
    from arssr_jax.training import Validator

    config, model, state, _, _ = tiny_setup
    rng = np.random.default_rng(1)
    samples = [{"lr": rng.random((6, 6, 6, 1), np.float32), "hr": rng.random((m, m, m, 1), np.float32),
                "coords": make_grid((m, m, m)), "scale": np.full(3, m / 6, np.float32), "volume": 0}
               for m in (12, 15)]
    validator = Validator(model, samples, chunk=1000)
    for sample in samples:
        expected = np.asarray(predict(model, state.params, sample["lr"][None], sample["coords"][None]))[0]
        np.testing.assert_allclose(validator.predict(state.params, sample), expected.reshape(sample["hr"].shape),
                                   rtol=1e-5, atol=1e-6)
    metrics = validator(state.params)
    assert set(metrics) == {"val_l1", "val_psnr", "val_psnr_by_scale"} and list(metrics["val_psnr_by_scale"]) == ["2", "2.5"]


def _cli(argv):
    from arssr_jax.training.cli import add_subcommand

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    args.run(args)


def test_loss_falls_on_real_data_and_workdir_is_a_model(tmp_path):
    """A tiny model's loss falls over a few dozen steps on a real T1w volume (via the CLI)."""
    config = tiny(data_paths=(ANATOMICAL,))
    config = config.replace(optim=dataclasses.replace(config.optim, learning_rate=6e-3),
                            val=dataclasses.replace(config.val, every_steps=20))
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json())
    workdir = tmp_path / "run"
    _cli(["train", "--config", str(config_path), "--workdir", str(workdir), "--steps", "40", "--quiet"])

    records = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses  # ~0.72 measured; flat would be ~1
    assert all(k in records[5] for k in ("step", "loss", "lr", "samples_per_s", "grad_norm"))
    validations = [r for r in records if r.get("event") == "validation"]
    assert [v["step"] for v in validations] == [20, 40]
    assert all(np.isfinite(v["val_l1"]) and np.isfinite(v["val_psnr"]) for v in validations)
    assert load_config(workdir / "train_config.json") == config.replace(steps=40)

    from arssr_jax.weights.model_dir import load_model

    model, params, model_config = load_model(str(workdir))
    assert model_config == config.model
    best = min(validations, key=lambda v: v["val_l1"])["step"]
    _, best_params = load_inference_params(workdir, step=best)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(best_params)):
        np.testing.assert_array_equal(a, b)
    out = predict(model, params, jnp.zeros((1, 6, 6, 6, 1)), jnp.zeros((1, 5, 3)))
    assert out.shape == (1, 5, 1)
    # exported with the consistency step it is meant to run with: saved in its own block
    from arssr_jax.cli import main as cli_main
    from arssr_jax.weights import load_options

    exported = workdir.parent / "exported"
    assert cli_main(["export", str(workdir), str(exported), "--consistency", "2:0.75", "3:0.25", "--quiet"]) == 0
    assert load_options(exported).consistency == ((2.0, 0.75), (3.0, 0.25)) and load_model(exported)[2] == config.model
    assert load_options(workdir).consistency == 0.0

    # a different config in the same workdir is refused; resuming past the end does nothing
    with pytest.raises(ArSSRError, match="different config"):
        train(config.replace(seed=5), workdir, steps=40, quiet=True)
    assert train(config, workdir, steps=40, quiet=True).step == 40


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    """From step 3 on the targets are NaN: the run stops with a clear error, step 2 stays."""
    from arssr_jax.training import loop

    def poisoned(loss_fn, tx, schedule, axis_name=None):
        step = make_train_step(loss_fn, tx, schedule, axis_name)

        def poisoned_step(state, batch):
            values = jnp.where(state.step >= 2, jnp.nan, batch["values"])
            return step(state, dict(batch, values=values))

        return poisoned_step

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    config = tiny(data_paths=(ANATOMICAL,))
    config = config.replace(val=dataclasses.replace(config.val, every_steps=1))
    with pytest.raises(ArSSRError, match=r"stopped at step 3: the loss became nan.*last good checkpoint is step 2"):
        train(config, tmp_path, steps=6, quiet=True)
    from arssr_jax.training import CheckpointStore

    store = CheckpointStore(tmp_path, read_only=True)
    assert store.latest_step() == 2
    store.close()
    _, params = load_inference_params(tmp_path)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_user_errors(tmp_path):
    config = tiny(data_paths=(str(tmp_path / "missing.nii"),))
    with pytest.raises(ArSSRError, match="missing.nii"):
        train(config, tmp_path / "run", steps=1, quiet=True)
    with pytest.raises(ArSSRError, match="batch"):
        train(tiny(data_paths=(ANATOMICAL,)).replace(
            data=dataclasses.replace(tiny().data, batch_size=0)), tmp_path / "run2", steps=1, quiet=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArSSRError, match="is a file"):
        train(tiny(data_paths=(ANATOMICAL,)), tmp_path / "file", steps=1, quiet=True)


def test_init_from_starts_at_the_loaded_model_and_refuses_one_that_does_not_fit(tmp_path):
    """A fine-tuning run starts from the named model's parameters (not its own seed's), with
    fresh Adam moments; a model of another shape, or init_output beside it, is refused
    before the workdir exists."""
    config = tiny(data_paths=(ANATOMICAL,))
    train(config, tmp_path / "first", steps=2, quiet=True)
    _, first = load_inference_params(tmp_path / "first")

    # learning rate ~0: after one step the parameters are still the loaded ones
    still = config.replace(init_from=str(tmp_path / "first"), init_output=None, seed=7,
                           optim=dataclasses.replace(config.optim, learning_rate=1e-12))
    train(still, tmp_path / "second", steps=1, quiet=True)
    _, second = load_inference_params(tmp_path / "second")
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    assert load_config(tmp_path / "second" / "train_config.json").init_from == str(tmp_path / "first")
    # resuming needs only the checkpoints: the model it started from may be gone by then
    (tmp_path / "first").rename(tmp_path / "moved")
    assert train(still, tmp_path / "second", steps=2, quiet=True).step == 2
    (tmp_path / "moved").rename(tmp_path / "first")
    train(still.replace(init_from=None, init_output=0.5), tmp_path / "own", steps=1, quiet=True)
    _, own = load_inference_params(tmp_path / "own")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(own)))

    wider = still.replace(model=dataclasses.replace(still.model, feature_dim=still.model.feature_dim * 2))
    with pytest.raises(ArSSRError, match=r"init_from=.*set model to the loaded model's config"):
        train(wider, tmp_path / "wider", steps=1, quiet=True)
    with pytest.raises(ArSSRError, match="init_output"):
        train(still.replace(init_output=0.5), tmp_path / "both", steps=1, quiet=True)
    assert not (tmp_path / "wider").exists() and not (tmp_path / "both").exists()

    # the CLI's --init-from: the config's init_output (0.5 in tiny) gives way to the loaded layer
    path = tmp_path / "tiny.json"
    path.write_text(config.to_json())
    _cli(["train", "--config", str(path), "--workdir", str(tmp_path / "cli"), "--steps", "1",
          "--init-from", str(tmp_path / "first"), "--quiet"])
    saved = load_config(tmp_path / "cli" / "train_config.json")
    assert (saved.init_from, saved.init_output) == (str(tmp_path / "first"), None)
