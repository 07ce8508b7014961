"""Model directories: ``config.json`` (the ModelConfig) + ``params.msgpack`` (Flax params).

``params.msgpack`` is ``flax.serialization.msgpack_serialize`` of the nested parameter
dict (float32 arrays). Writes go to a temporary sibling directory that is renamed into
place, so an interrupted save never leaves a half-written model.

``load_model(spec)`` accepts a model directory, a training work directory (its best or
latest orbax checkpoint) or the name of a model shipped inside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from flax import serialization

from arssr_jax import tempfiles
from arssr_jax.errors import ArSSRError
from arssr_jax.models import ArSSR, ModelConfig, build_model, count_params, init_params

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
FORMAT = "arssr-jax-model/1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "default"


def save_model(directory, config: ModelConfig, params, metadata: dict | None = None) -> Path:
    """Write a model directory atomically; an existing directory is replaced whole."""
    document = {"format": FORMAT, "model": json.loads(config.to_json()), "metadata": metadata or {}}
    return write_model_files(directory, document, _to_numpy(params))


def write_model_files(directory, document: dict, params) -> Path:
    """``config.json`` (``document``) + ``params.msgpack`` written to a temporary sibling
    folder, then renamed into place: an interrupted save never leaves a half-written model."""
    directory = Path(directory)
    check_model_output(directory)
    parent = directory.parent if str(directory.parent) else Path(".")
    _recover(directory, parent)
    staging = None
    try:
        staging = Path(tempfiles.make_temp(parent, directory.name, directory=True))
        tempfiles.publish_mode(staging, directory=True)  # mkdtemp makes it private; a model folder is not
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        (staging / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(params))
        if directory.exists():
            old = Path(tempfiles.make_temp(parent, directory.name, directory=True, kind="old"))
            os.replace(directory, old / "model")
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except OSError as error:
        raise ArSSRError(f"cannot write model to {directory} ({error.strerror or error}); check free disk space "
                         "and permissions, or choose another path") from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def check_model_output(directory) -> None:
    """Refuse a model output path that cannot be written, before any expensive work."""
    directory = Path(directory)
    parent = directory.parent if str(directory.parent) else Path(".")
    if not parent.is_dir():
        raise ArSSRError(f"cannot write model to {directory}: folder {parent} does not exist; create it first")
    if directory.exists() and not directory.is_dir():
        raise ArSSRError(f"cannot write model to {directory}: it is an existing file; a model is a folder, "
                         "give a new folder name (or remove the file)")
    if directory.is_dir() and not (directory / CONFIG_FILE).exists() and any(directory.iterdir()):
        raise ArSSRError(f"{directory} exists and is not a model directory; choose an empty or new path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArSSRError(f"cannot write model to {directory}: folder {parent} is not writable; choose another path")


def _recover(directory: Path, parent: Path) -> None:
    """Undo what a killed save left: a model set aside but not yet replaced goes back;
    stale staging and set-aside folders are removed."""
    _restore_set_aside(directory, parent)
    tempfiles.remove_stale(parent, directory.name, kinds=("tmp", "old"))


def _restore_set_aside(directory: Path, parent: Path) -> None:
    """A save replaces a model in two renames (old aside, new in); killed between them, the
    old model waits in ``.NAME.old-*/model``: move it back."""
    if directory.exists():
        return
    for old in tempfiles.stale_temps(parent, directory.name, kind="old"):
        if (Path(old) / "model" / CONFIG_FILE).is_file():
            try:
                os.replace(Path(old) / "model", directory)
            except OSError:
                continue
            shutil.rmtree(old, ignore_errors=True)
            return


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def read_model_dir(directory) -> tuple[ModelConfig, dict, dict]:
    """(config, params, metadata) of a model directory, checked against the config's shapes."""
    directory = Path(directory)
    config_path, params_path = directory / CONFIG_FILE, directory / PARAMS_FILE
    if not config_path.is_file() or not params_path.is_file():
        raise ArSSRError(f"{directory} is not a model directory (needs {CONFIG_FILE} and {PARAMS_FILE})")
    try:
        document = json.loads(config_path.read_text())
        if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
            raise ValueError('expected a JSON object with a "model" object')
        config = ModelConfig.from_dict(document["model"])
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as error:
        detail = " ".join(str(error).split())[:200]
        raise ArSSRError(f"{config_path} is not a valid model config ({detail}); re-create the model directory "
                         "(arssr-jax export or convert-torch)") from None
    try:
        params = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types
        raise ArSSRError(f"{params_path} is damaged ({type(error).__name__}); re-create the model directory")
    check_params(config, params, str(directory))
    metadata = document.get("metadata", {})
    return config, params, metadata if isinstance(metadata, dict) else {}


def check_params(config: ModelConfig, params, source: str) -> None:
    """Raise ArSSRError unless ``params`` has exactly the tree and shapes ``config`` builds."""
    import jax

    want = expected_shapes(config)
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want != have:
        missing = sorted(set(want) - set(have))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        detail = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {have[wrong[0]]}, expected {want[wrong[0]]}" if wrong else f"unexpected {sorted(set(have) - set(want))[0]}"
        raise ArSSRError(f"parameters in {source} do not fit its config ({detail}); the model files are inconsistent")
    check_finite(params, source)


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
    expected = jax.eval_shape(lambda: init_params(build_model(config), jax.random.key(0)))
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
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


def available_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def load_model(spec=None) -> tuple[ArSSR, dict, ModelConfig]:
    """(model, params, config) from a model directory, training workdir or shipped name."""
    spec = DEFAULT_MODEL if spec is None else spec
    path = Path(spec)
    if not path.exists() and path.parent.is_dir() and os.access(path.parent, os.W_OK):
        _restore_set_aside(path, path.parent)  # a save killed between its two renames
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        config, params, _ = read_model_dir(path)
    elif path.is_dir() and _is_training_workdir(path):
        from arssr_jax.training.checkpoints import load_inference_params

        config, params = load_inference_params(path)
    elif str(spec) in available_models():
        config, params, _ = read_model_dir(PRETRAINED_DIR / str(spec))
    elif path.exists():
        raise ArSSRError(
            f"{spec} is neither a model directory ({CONFIG_FILE} + {PARAMS_FILE}) nor a training work directory"
        )
    else:
        names = ", ".join(available_models()) or "none shipped"
        raise ArSSRError(f"model {spec!r} not found: give a model directory, a training workdir or a shipped name ({names})")
    return build_model(config), params, config


def _is_training_workdir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def describe(config: ModelConfig, params) -> str:
    return f"{config.encoder} encoder, feature_dim {config.feature_dim}, {count_params(params):,} parameters"
