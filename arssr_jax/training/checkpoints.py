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
(else its latest). The read side (layout, damage checks, parameters for inference) is
:mod:`arssr_jax.weights.workdir`, which needs no training code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import orbax.checkpoint as ocp

from arssr_jax.errors import ArSSRError
from arssr_jax.training.config import TrainConfig
from arssr_jax.training.state import TrainState, to_host
from arssr_jax.weights.workdir import (
    BEST_METRIC,
    CHECKPOINT_DIR,
    CheckpointReader,
    error_detail,
    read_run_document,
    read_run_params,
)

__all__ = ["BEST_METRIC", "CHECKPOINT_DIR", "CheckpointStore", "load_trained"]


class CheckpointStore(CheckpointReader):
    """The checkpoints of one workdir, read and written (``read_only=False`` by default)."""

    def __init__(self, workdir, keep_last: int = 3, read_only: bool = False):
        super().__init__(workdir, keep_last=keep_last, read_only=read_only)

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
        self._check_readable(step)
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
                             f"({error_detail(error)}); resume with the config it was made with") from None
        return TrainState.from_dict(restored["state"]), dict(data or {})

    def restore_raw(self, step: int) -> dict:
        """``{"state": nested dicts/lists of numpy arrays, "data": dict}`` without a template."""
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        return {"state": restored["state"], "data": dict(restored["data"] or {})}


def load_trained(workdir, step: Optional[int] = None):
    """(TrainConfig, params, step) of a training workdir: checkpoint ``step``, else the best
    by validation L1, else the latest. Parameters are numpy arrays, as saved."""
    config = TrainConfig.from_dict(read_run_document(workdir))  # before orbax runs: a bad config is named first
    params, step = read_run_params(workdir, step)
    return config, params, step
