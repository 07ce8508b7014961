"""Parameter trees: to numpy, and checked against what a model config builds.

One place for the shape check every model store uses (model directories, training
workdirs, baseline directories) and for the cache folder later processes reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from arssr_jax import tempfiles
from arssr_jax.errors import ArSSRError
from arssr_jax.models import ModelConfig, build_model, init_params


def numpy_tree(tree):
    """Nested dicts (any mapping) of float32 numpy arrays."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def tree_shapes(tree) -> dict:
    """{parameter path: shape} of a tree of arrays (or of shape structs)."""
    import jax

    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(want: dict, params, source: str, what: str = "its config",
                 fix: str = "the model files are inconsistent") -> None:
    """Raise ArSSRError naming the first difference between ``params`` and the shapes ``want``
    (and ``fix``, what to do about it), or the first parameter holding NaN/Inf."""
    have = tree_shapes(params)
    if want != have:
        missing = sorted(set(want) - set(have))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if missing:
            detail = f"missing {missing[0]}"
        elif wrong:
            detail = f"{wrong[0]} has shape {have[wrong[0]]}, expected {want[wrong[0]]}"
        else:
            detail = f"unexpected {sorted(set(have) - set(want))[0]}"
        raise ArSSRError(f"parameters in {source} do not fit {what} ({detail}); {fix}")
    check_finite(params, source)


def check_params(config: ModelConfig, params, source: str) -> None:
    """Raise ArSSRError unless ``params`` has exactly the tree and shapes ``config`` builds."""
    check_shapes(expected_shapes(config), params, source)


def cache_folder() -> str | None:
    """The folder for what a later process may reuse (XLA's compiled programs, parameter shapes):
    ARSSR_JAX_CACHE, default ~/.cache/arssr-jax/xla; None when it is "off"."""
    folder = os.environ.get("ARSSR_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arssr-jax", "xla"))
    return None if folder.lower() in ("", "0", "off", "none") else folder


def _models_digest() -> str:
    """Hash of the model code and the library versions the parameter shapes depend on."""
    import flax
    import jax

    digest = hashlib.sha256(f"{jax.__version__} {flax.__version__}".encode())
    for source in sorted(Path(build_model.__code__.co_filename).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def expected_shapes(config: ModelConfig) -> dict:
    """{parameter path: shape} that ``config`` builds. Tracing the model's initialisation for this
    costs about half a second, so the answer is kept in the cache folder, keyed by the config and a
    hash of the model code (any change to either computes it afresh)."""
    import jax

    folder = cache_folder()
    path = None
    if folder is not None:
        key = hashlib.sha256((config.to_json() + _models_digest()).encode()).hexdigest()[:40]
        path = Path(folder) / f"arssr-param-shapes-{key}.json"
        try:
            cached = json.loads(path.read_text())
            return {k: tuple(v) for k, v in cached.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # absent or unreadable: computed below
    want = tree_shapes(jax.eval_shape(lambda: init_params(build_model(config), jax.random.key(0))))
    if path is not None:
        staging = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfiles.make_temp(path.parent, path.name))
            staging.write_text(json.dumps(want))
            os.replace(staging, path)
        except OSError:
            if staging is not None:
                staging.unlink(missing_ok=True)  # a read-only or full cache costs time, never a result
    return want


def check_finite(params, source: str) -> None:
    """Raise ArSSRError naming the first parameter that holds NaN or Inf (it would make every output NaN)."""
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        values = np.asarray(leaf)
        if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            raise ArSSRError(f"parameters in {source}: {jax.tree_util.keystr(path)} holds {bad} NaN/Inf value(s); "
                             "the weights are damaged, use another model or re-create this one")
