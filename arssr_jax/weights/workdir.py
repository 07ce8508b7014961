"""A training workdir read for inference: its config and a checkpoint's parameters.

Layout (written by :mod:`arssr_jax.training`): ``WORKDIR/train_config.json`` and
``WORKDIR/checkpoints/<step>/`` (orbax: items ``state`` and ``data``, plus ``metrics``
with ``val_l1`` when validation ran at that step). Reading needs only orbax and the
saved JSON, not the training stack; orbax is imported on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from arssr_jax.errors import ArSSRError
from arssr_jax.models import ModelConfig
from arssr_jax.weights.params import check_params, numpy_tree

TRAIN_CONFIG_FILE = "train_config.json"  # not config.json: that name marks a model directory
CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "val_l1"

# JSON files of a checkpoint step folder that must parse (when present; "state/_METADATA"
# must be present), checked to name a damaged checkpoint without orbax's tracebacks.
# (orbax itself tolerates an unreadable _CHECKPOINT_METADATA, so it is not checked).
_JSON_FILES = ("metrics/metrics", "data/metadata", "state/_METADATA")
_REQUIRED = ("state/_METADATA", "state/manifest.ocdbt")


def is_training_workdir(path) -> bool:
    return (Path(path) / CHECKPOINT_DIR).is_dir()


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


def step_dirs(directory: Path) -> list:
    try:
        return sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    except OSError:
        return []


def error_detail(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


class CheckpointReader:
    """The checkpoints of one workdir: an orbax CheckpointManager with our keep rules
    (the last ``keep_last`` and the best by validation L1), read side only."""

    def __init__(self, workdir, keep_last: int = 3, read_only: bool = True):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers

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
        for step_dir in step_dirs(self.directory):
            if step is None or int(step_dir.name) == int(step):
                what = find_damage(step_dir)
                if what is not None or step is not None:
                    found = (step_dir, what or error_detail(error))
                    break
        if found is None:
            return ArSSRError(f"the checkpoints in {self.directory} cannot be read ({error_detail(error)}); "
                              "remove the damaged step folder under it, or use a new --workdir")
        step_dir, what = found
        earlier = [p for p in step_dirs(self.directory) if int(p.name) < int(step_dir.name)]
        fallback = f"checkpoint {earlier[-1].name}" if earlier else "the start (no earlier checkpoint)"
        return ArSSRError(f"checkpoint {step_dir.name} in {self.workdir} is damaged ({what}); delete {step_dir} "
                          f"to fall back to {fallback}, or use another workdir")

    def _check_readable(self, step: int) -> None:
        damage = find_damage(self.directory / str(int(step)))
        if damage is not None:
            raise self._damaged(step, ValueError(damage))

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

    def restore_params(self, step: int) -> dict:
        """Only the model parameters of checkpoint ``step`` (numpy float32, as saved)."""
        import orbax.checkpoint as ocp

        self._check_readable(step)
        try:
            restored = self.manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            return numpy_tree(restored["state"]["params"])
        except Exception as error:
            raise self._damaged(step, error) from None

    def close(self) -> None:
        self.manager.wait_until_finished()  # no orbax thread may outlive the store (it would fail at exit)
        self.manager.close()


def read_run_document(workdir) -> dict:
    """The workdir's ``train_config.json`` as a JSON object."""
    path = Path(workdir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        raise ArSSRError(f"{workdir} has no {TRAIN_CONFIG_FILE}; it is not a training workdir made by `arssr-jax train`")
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError, RecursionError) as error:
        raise ArSSRError(f"{path} is not a valid training config ({error_detail(error)}); "
                         "restore it from a backup or train again") from None
    return document


def read_run_params(workdir, step: Optional[int] = None) -> tuple[dict, int]:
    """(params, step) of checkpoint ``step``, else the best by validation L1, else the latest."""
    reader = CheckpointReader(workdir)
    try:
        if step is None:
            step = reader.best_step()
            if step is None:
                step = reader.latest_step()
        if step is None:
            raise ArSSRError(f"{workdir} has no checkpoint yet; train longer (checkpoints are written at each validation)")
        if step not in reader.all_steps():
            raise ArSSRError(f"{workdir} has no checkpoint at step {step}; it has {reader.all_steps()}")
        return reader.restore_params(step), int(step)
    finally:
        reader.close()


def load_inference_params(workdir, step: Optional[int] = None):
    """(ModelConfig, params) of an ArSSR training workdir (see :func:`read_run_params`)."""
    document = read_run_document(workdir)
    baseline = document.get("baseline")
    if baseline is not None:
        name, scale = baseline.get("name"), document.get("data", {}).get("scale_min")
        raise ArSSRError(f"{workdir} trained the fixed-scale baseline {name} (x{scale:g}), "
                         "not ArSSR; evaluate it with eval/evaluate.py --baseline NAME:DIR")
    try:
        config = ModelConfig.from_dict(document["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArSSRError(f"{Path(workdir) / TRAIN_CONFIG_FILE}: its model section is not valid ({error_detail(error)}); "
                         "train again or fix the file") from None
    params, step = read_run_params(workdir, step)
    check_params(config, params, f"{workdir} (step {step})")
    return config, params
