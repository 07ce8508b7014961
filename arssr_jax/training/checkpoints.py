"""Orbax checkpoints of a training run: ``WORKDIR/checkpoints/<step>/``.

Each checkpoint holds two items: ``state`` (the :class:`TrainState` as a dict: params,
optimiser state, step, PRNG key; numpy arrays) and ``data`` (the input iterator's JSON
state, ``{"step", "seed", "batch_size"}``, independent of the process layout, so a run
can resume on a different number of processes or devices), plus orbax's ``metrics``
(``val_l1``, ``val_psnr``) when validation ran at that step.

Kept: the last ``keep_last`` checkpoints and the one with the lowest validation L1.
Saves are synchronous and atomic: orbax writes into a temporary directory and renames
it only once everything is on disk, so a crash mid-save never touches the last good
checkpoint (leftover temporary directories are removed when the store is reopened).

:func:`load_trained` gives ``(TrainConfig, params, step)`` of a workdir's best checkpoint
(else its latest); :func:`load_inference_params` narrows it to ``(ModelConfig, params)``
of an ArSSR run, which is how ``--model WORKDIR`` loads a training run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from arssr_jax.errors import ArSSRError
from arssr_jax.training.state import TrainState, to_host

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "val_l1"

# orbax logs every save at INFO/WARNING through absl; keep the console for our progress bar.
# It also logs damage it tolerates at ERROR (an unreadable _CHECKPOINT_METADATA); damage
# that matters raises, and is reported below in one line.
logging.getLogger("absl").setLevel(logging.CRITICAL)

# JSON files of a checkpoint step folder that must parse (when present; "state/_METADATA"
# must be present), checked to name a damaged checkpoint without orbax's tracebacks.
# (orbax itself tolerates an unreadable _CHECKPOINT_METADATA, so it is not checked).
_JSON_FILES = ("metrics/metrics", "data/metadata", "state/_METADATA")
_REQUIRED = ("state/_METADATA", "state/manifest.ocdbt")


def find_damage(step_dir: Path) -> Optional[str]:
    """What is visibly wrong with one checkpoint folder (a missing or unparsable metadata
    file), or None. Damage inside the array data only shows when it is read."""
    for name in _REQUIRED:
        if not (step_dir / name).is_file():
            return f"{name} is missing"
    for name in _JSON_FILES:
        path = step_dir / name
        if path.is_file():
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as error:
                return f"{name} is unreadable: {type(error).__name__}"
    return None


def _step_dirs(directory: Path) -> list:
    try:
        return sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    except OSError:
        return []


def _detail(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


class CheckpointStore:
    """The checkpoints of one workdir (an orbax CheckpointManager with our keep rules)."""

    def __init__(self, workdir, keep_last: int = 3, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise ArSSRError(f"{workdir} has no {CHECKPOINT_DIR}/ folder; it is not a training workdir")
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=int(keep_last)),
            checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            best_fn=lambda m: m[BEST_METRIC], best_mode="min",  # also makes orbax write the metrics
            preservation_policy=policy,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.workdir = Path(workdir)
        try:
            self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
        except ArSSRError:
            raise
        except Exception as error:  # orbax reads every step's metadata and metrics here
            raise self._damaged(None, error) from None

    def _damaged(self, step: Optional[int], error: BaseException) -> ArSSRError:
        """The one-line error for a checkpoint that cannot be read (``step`` None: find it)."""
        found = None
        for step_dir in _step_dirs(self.directory):
            if step is None or int(step_dir.name) == int(step):
                what = find_damage(step_dir)
                if what is not None or step is not None:
                    found = (step_dir, what or _detail(error))
                    break
        if found is None:
            return ArSSRError(f"the checkpoints in {self.directory} cannot be read ({_detail(error)}); "
                              "remove the damaged step folder under it, or use a new --workdir")
        step_dir, what = found
        earlier = [p for p in _step_dirs(self.directory) if int(p.name) < int(step_dir.name)]
        fallback = f"checkpoint {earlier[-1].name}" if earlier else "the start (no earlier checkpoint)"
        return ArSSRError(f"checkpoint {step_dir.name} in {self.workdir} is damaged ({what}); delete {step_dir} "
                          f"to fall back to {fallback}, or use another workdir")

    # -- queries -----------------------------------------------------------------
    def all_steps(self) -> list:
        return list(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The step with the lowest validation L1, or None when no checkpoint has one."""
        with_metrics = [s for s in self.all_steps() if self.metrics(s)]
        if not with_metrics:
            return None
        return min(with_metrics, key=lambda s: (self.metrics(s)[BEST_METRIC], -s))

    def metrics(self, step: int) -> Optional[dict]:
        try:
            return self.manager.metrics(step)
        except Exception as error:
            raise self._damaged(step, error) from None

    # -- save / restore ------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: Optional[dict] = None,
             metrics: Optional[dict] = None) -> None:
        """Write checkpoint ``step`` (every process must call this in a multi-process run)."""
        items = {"state": ocp.args.StandardSave(to_host(state.to_dict())),
                 "data": ocp.args.JsonSave(dict(data_state or {}))}
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()
                                                if isinstance(v, (int, float, np.floating))}
        self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, target: TrainState) -> Tuple[TrainState, dict]:
        """(state, data iterator state) of checkpoint ``step``, shaped like ``target``."""
        abstract = to_host(target.to_dict())
        damage = find_damage(self.directory / str(int(step)))
        if damage is not None:
            raise self._damaged(step, ValueError(damage))
        try:
            restored = self.manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            data = restored["data"]
            if data is not None and not isinstance(data, dict):
                raise ValueError(f"the data iterator state is a {type(data).__name__}, not an object")
        except Exception as error:
            try:  # readable without this run's template: the run differs; unreadable: damaged
                self.restore_raw(step)
            except ArSSRError:
                raise
            except Exception:
                raise self._damaged(step, error) from None
            raise ArSSRError(f"checkpoint {self.directory / str(step)} does not fit this run's model/optimiser "
                             f"({_detail(error)}); resume with the config it was made with") from None
        return TrainState.from_dict(restored["state"]), dict(data or {})

    def restore_raw(self, step: int) -> dict:
        """``{"state": nested dicts/lists of numpy arrays, "data": dict}`` without a template."""
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        return {"state": restored["state"], "data": dict(restored["data"] or {})}

    def restore_params(self, step: int) -> dict:
        """Only the model parameters of checkpoint ``step`` (numpy, as saved)."""
        damage = find_damage(self.directory / str(int(step)))
        if damage is not None:
            raise self._damaged(step, ValueError(damage))
        try:
            restored = self.manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            return _numpy_tree(restored["state"]["params"])
        except Exception as error:
            raise self._damaged(step, error) from None

    def close(self) -> None:
        self.manager.wait_until_finished()  # no orbax thread may outlive the store (it would fail at exit)
        self.manager.close()


def _numpy_tree(tree):
    if isinstance(tree, dict):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def load_trained(workdir, step: Optional[int] = None):
    """(TrainConfig, params, step) of a training workdir: checkpoint ``step``, else the best
    by validation L1, else the latest. Parameters are numpy arrays, as saved."""
    from arssr_jax.training.config import CONFIG_FILE, load_config

    workdir = Path(workdir)
    if not (workdir / CONFIG_FILE).is_file():
        raise ArSSRError(f"{workdir} has no {CONFIG_FILE}; it is not a training workdir made by `arssr-jax train`")
    config = load_config(workdir / CONFIG_FILE)
    store = CheckpointStore(workdir, read_only=True)
    try:
        if step is None:
            step = store.best_step()
            if step is None:
                step = store.latest_step()
        if step is None:
            raise ArSSRError(f"{workdir} has no checkpoint yet; train longer (checkpoints are written at each validation)")
        if step not in store.all_steps():
            raise ArSSRError(f"{workdir} has no checkpoint at step {step}; it has {store.all_steps()}")
        params = store.restore_params(step)
    finally:
        store.close()
    return config, params, step


def load_inference_params(workdir, step: Optional[int] = None):
    """(ModelConfig, params) of an ArSSR training workdir (see :func:`load_trained`)."""
    from arssr_jax.weights.model_dir import check_params

    config, params, step = load_trained(workdir, step)
    if config.baseline is not None:
        raise ArSSRError(f"{workdir} trained the fixed-scale baseline {config.baseline.name} (x{config.baseline_scale:g}), "
                         "not ArSSR; evaluate it with eval/evaluate.py --baseline NAME:DIR")
    check_params(config.model, params, f"{workdir} (step {step})")
    return config.model, params
