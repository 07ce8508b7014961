"""The package's layers only look down, and inference never loads the training stack.

Layers, lowest first (a module may import its own layer and those below):
  basics (errors, coords, tempfiles, progress, intensity, memory)
  <- ops (conv, sampling, spline, interpolation, slice profiles, consistency, tiling, metrics)
  <- models
  <- store (nifti, weights: model/baseline directories, training workdirs, the torch reader; flops)
  <- data, inference, curves (a run's log drawn)
  <- training
  <- evaluation, demo, testing (the tests' and benchmarks' support: the PyTorch mirror, timers)
  <- cli
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arssr_jax

LAYERS = (
    ("errors", "coords", "tempfiles", "progress", "intensity", "memory", "options"),
    ("models.conv", "sampling", "spline", "interpolation", "slice_profile", "consistency", "tiling", "metrics"),
    ("models",),
    ("nifti", "weights", "flops"),
    ("data", "inference", "curves"),
    ("training",),
    ("evaluation", "demo", "adapt", "testing"),  # testing: the tests' and benchmarks' support, never imported by the rest
    ("cli", ""),  # "" is the package itself (its lazy top-level names)
)
PACKAGE = Path(arssr_jax.__file__).parent


def layer_of(module: str) -> int:
    """The layer of a module path relative to the package ('' for the package); the longest
    matching prefix decides ('models.conv' is an op, 'models.arssr' a model)."""
    best, length = None, -1
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or (name and module.startswith(name + "."))) and len(name) > length:
                best, length = level, len(name)
    if best is None:
        raise AssertionError(f"arssr_jax.{module} belongs to no layer; add it to LAYERS in {__file__}")
    return best


def package_imports(path: Path):
    """(line, imported module relative to the package) for every arssr_jax import in a file,
    at any depth (function-level imports count: they are how cycles hide)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "arssr_jax":
            names = [node.module]
            if node.module == "arssr_jax":  # from arssr_jax import nifti
                names = [f"arssr_jax.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] == "arssr_jax"]
        else:
            continue
        for name in names:
            yield node.lineno, name[len("arssr_jax"):].lstrip(".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_every_import_looks_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for line, target in package_imports(path):
            if target and layer_of(target) > layer_of(me):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} arssr_jax.{me} imports arssr_jax.{target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_library_never_imports_its_testing_support():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
             if not module_name(path).startswith("testing")
             for line, target in package_imports(path) if target == "testing" or target.startswith("testing.")]
    assert not found, "arssr_jax.testing imported by the library:\n" + "\n".join(found)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from arssr_jax.training.loop import train\n")
    assert [target for _, target in package_imports(bad)] == ["training.loop"]
    assert layer_of("training.loop") > layer_of("models.arssr") > layer_of("models.conv")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir with one checkpoint (written directly: no training needed)."""
    from arssr_jax.training import CheckpointStore, create_train_state, make_optimizer, make_task, tiny
    from arssr_jax.training.config import save_config

    folder = tmp_path_factory.mktemp("run") / "wd"
    folder.mkdir()
    config = tiny(data_paths=())
    save_config(config, folder)
    task = make_task(config)
    tx, _ = make_optimizer(config.optim, steps_per_epoch=1)
    state = create_train_state(task.init_params, tx, config.seed)
    store = CheckpointStore(folder, keep_last=2)
    store.save(1, state.replace(step=np.int32(1)), {"step": 1}, {"val_l1": 0.5})
    store.close()
    return folder


def test_upsampling_with_a_training_workdir_loads_no_training_code(workdir, tmp_path):
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from arssr_jax.inference import upsample\n"
        "from arssr_jax.weights import load_model\n"
        f"model, params, _ = load_model({str(workdir)!r})\n"
        "out = upsample(np.random.default_rng(0).random((6, 6, 6), np.float32), (model, params), scale=2)\n"
        "loaded = [m for m in ('arssr_jax.training', 'grain', 'matplotlib', 'torch') if m in sys.modules]\n"
        "print(json.dumps({'shape': list(out.shape), 'loaded': loaded}))\n"
    )
    env = dict(os.environ, ARSSR_JAX_CACHE="off")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"shape": [12, 12, 12], "loaded": []}
