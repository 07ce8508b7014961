"""Model directories: ``config.json`` (the ModelConfig, and the inference options the model
is meant to run with) + ``params.msgpack`` (Flax params).

``params.msgpack`` is ``flax.serialization.msgpack_serialize`` of the nested parameter
dict (float32 arrays). Writes go to a temporary sibling directory that is renamed into
place, so an interrupted save never leaves a half-written model.

``load_model(spec)`` accepts a model directory, a training work directory (its best or
latest orbax checkpoint) or the name of a model shipped inside the package;
``load_options(spec)`` gives the options saved with it (a workdir's are the defaults).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from flax import serialization

from arssr_jax import tempfiles
from arssr_jax.errors import ArSSRError
from arssr_jax.models import ArSSR, ModelConfig, build_model, count_params
from arssr_jax.options import InferenceOptions, split_model_block
from arssr_jax.weights.params import check_params, numpy_tree
from arssr_jax.weights.workdir import is_training_workdir, load_inference_params

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
FORMAT = "arssr-jax-model/1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "default"


def save_model(directory, config: ModelConfig, params, metadata: dict | None = None,
               options: InferenceOptions | None = None) -> Path:
    """Write a model directory atomically; an existing directory is replaced whole."""
    document = {"format": FORMAT, "model": json.loads(config.to_json()),
                "inference": (options or InferenceOptions()).saved(), "metadata": metadata or {}}
    return write_model_files(directory, document, numpy_tree(params))


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


def read_model_document(directory) -> tuple[ModelConfig, InferenceOptions, dict]:
    """(config, inference options, metadata) of a model directory's ``config.json``. A config
    written before the options had their own block carries its consistency step in the model's."""
    config_path = Path(directory) / CONFIG_FILE
    try:
        document = json.loads(config_path.read_text())
        if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
            raise ValueError('expected a JSON object with a "model" object')
        model, moved = split_model_block(document["model"], str(config_path))
        config = ModelConfig.from_dict(model)
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as error:
        detail = " ".join(str(error).split())[:200]
        raise ArSSRError(f"{config_path} is not a valid model config ({detail}); re-create the model directory "
                         "(arssr-jax export or convert-torch)") from None
    options = InferenceOptions.from_saved(document.get("inference", moved), str(config_path))
    metadata = document.get("metadata", {})
    return config, options, metadata if isinstance(metadata, dict) else {}


def read_model_dir(directory) -> tuple[ModelConfig, dict, dict]:
    """(config, params, metadata) of a model directory, checked against the config's shapes."""
    directory = Path(directory)
    config_path, params_path = directory / CONFIG_FILE, directory / PARAMS_FILE
    if not config_path.is_file() or not params_path.is_file():
        raise ArSSRError(f"{directory} is not a model directory (needs {CONFIG_FILE} and {PARAMS_FILE})")
    config, _, metadata = read_model_document(directory)
    try:
        params = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types
        raise ArSSRError(f"{params_path} is damaged ({type(error).__name__}); re-create the model directory")
    check_params(config, params, str(directory))
    return config, params, metadata


def available_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def locate_model(spec=None) -> tuple[str, Path]:
    """("dir", path) of a model directory (a shipped name included) or ("workdir", path) of a
    training workdir that ``spec`` names (None: the shipped default)."""
    spec = DEFAULT_MODEL if spec is None else spec
    path = Path(spec)
    if not path.exists() and path.parent.is_dir() and os.access(path.parent, os.W_OK):
        _restore_set_aside(path, path.parent)  # a save killed between its two renames
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return "dir", path
    if path.is_dir() and is_training_workdir(path):
        return "workdir", path
    if str(spec) in available_models():
        return "dir", PRETRAINED_DIR / str(spec)
    if path.exists():
        raise ArSSRError(
            f"{spec} is neither a model directory ({CONFIG_FILE} + {PARAMS_FILE}) nor a training work directory"
        )
    names = ", ".join(available_models()) or "none shipped"
    raise ArSSRError(f"model {spec!r} not found: give a model directory, a training workdir or a shipped name ({names})")


def load_model(spec=None) -> tuple[ArSSR, dict, ModelConfig]:
    """(model, params, config) from a model directory, training workdir or shipped name."""
    kind, path = locate_model(spec)
    config, params = read_model_dir(path)[:2] if kind == "dir" else load_inference_params(path)
    return build_model(config), params, config


def load_options(spec=None) -> InferenceOptions:
    """The inference options saved with a model (a training workdir's: the defaults)."""
    kind, path = locate_model(spec)
    return read_model_document(path)[1] if kind == "dir" else InferenceOptions()


def describe(config: ModelConfig, params) -> str:
    return f"{config.encoder} encoder, feature_dim {config.feature_dim}, {count_params(params):,} parameters"
