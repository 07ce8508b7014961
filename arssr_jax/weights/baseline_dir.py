"""Model directories of the fixed-scale baseline CNNs (:mod:`arssr_jax.models.baselines`).

``config.json`` = ``{"format": "arssr-jax-baseline/1", "baseline": name, "scale": s,
"options": {...}, "metadata": {...}}`` and ``params.msgpack`` (Flax msgpack of the
params), written atomically like an ArSSR model directory. A baseline's training
workdir is read the same way (its best checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import flax.linen as nn
from flax import serialization

from arssr_jax.errors import ArSSRError
from arssr_jax.models.baselines import build_baseline, init_baseline
from arssr_jax.weights.model_dir import CONFIG_FILE, PARAMS_FILE, write_model_files
from arssr_jax.weights.params import check_shapes, numpy_tree, tree_shapes
from arssr_jax.weights.workdir import TRAIN_CONFIG_FILE, read_run_document, read_run_params

BASELINE_FORMAT = "arssr-jax-baseline/1"


def save_baseline(directory, name: str, scale: float, params, options: dict | None = None,
                  metadata: dict | None = None) -> Path:
    """Write a baseline model directory atomically (an existing one is replaced whole)."""
    build_baseline(name, options)  # validate
    document = {"format": BASELINE_FORMAT, "baseline": name, "scale": float(scale),
                "options": dict(options or {}), "metadata": metadata or {}}
    return write_model_files(directory, document, numpy_tree(params))


def is_baseline_dir(directory) -> bool:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == BASELINE_FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def load_baseline(directory) -> tuple[nn.Module, dict, dict]:
    """(module, params, document) of a baseline model directory, or of a training workdir
    of a baseline (its best checkpoint); shapes checked against the config."""
    directory = Path(directory)
    if (directory / TRAIN_CONFIG_FILE).is_file():
        return load_baseline_run(directory)
    config_path, params_path = directory / CONFIG_FILE, directory / PARAMS_FILE
    if not config_path.is_file() or not params_path.is_file():
        raise ArSSRError(f"{directory} is not a baseline model directory (needs {CONFIG_FILE} and {PARAMS_FILE})")
    try:
        document = json.loads(config_path.read_text())
        if document.get("format") != BASELINE_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {BASELINE_FORMAT!r}")
        name, scale = document["baseline"], float(document["scale"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ArSSRError(f"{config_path} is not a baseline config ({error}); train or save the baseline again") from None
    module = build_baseline(name, document.get("options"))
    try:
        params = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types
        raise ArSSRError(f"{params_path} is damaged ({type(error).__name__}); save the baseline again") from None
    _check(module, params, name, directory)
    document["scale"] = scale
    return module, params, document


def load_baseline_run(workdir, step: Optional[int] = None) -> tuple[nn.Module, dict, dict]:
    """(module, params, document) of a baseline's training workdir: checkpoint ``step``,
    else the best by validation L1, else the latest (``document`` as in a model directory)."""
    run = read_run_document(workdir)
    baseline = run.get("baseline")
    if baseline is None:
        raise ArSSRError(f"{workdir} is an ArSSR training run, not a baseline; pass it as --arssr {workdir}")
    try:
        name, options = baseline["name"], dict(baseline.get("options") or {})
        scale = float(run["data"]["scale_min"])  # a baseline trains for one scale
    except (KeyError, TypeError, ValueError) as error:
        raise ArSSRError(f"{Path(workdir) / TRAIN_CONFIG_FILE}: its baseline section is not valid ({error!r}); "
                         "train again or fix the file") from None
    module = build_baseline(name, options)
    params, step = read_run_params(workdir, step)
    _check(module, params, name, workdir)
    document = {"format": BASELINE_FORMAT, "baseline": name, "scale": scale, "options": options,
                "metadata": {"source": str(workdir), "step": int(step), "config": run.get("name")}}
    return module, params, document


def _check(module, params, name, where) -> None:
    import jax

    want = tree_shapes(jax.eval_shape(lambda: init_baseline(module, jax.random.key(0))))
    check_shapes(want, params, str(where), what=f"its {name} config")
