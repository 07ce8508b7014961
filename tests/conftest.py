import os
import sys

# Tests import the PyTorch mirror of the reference from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# Tests that call the CLI in-process keep XLA's persistent cache off: hermetic runs.
os.environ.setdefault("ARSSR_JAX_CACHE", "off")

# Training runs convert their volumes into the volume cache (arssr_jax.data.cache): the
# tests' default cache is a temporary folder, not ~/.cache (subprocesses inherit it).
if "ARSSR_JAX_VOLUME_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _volume_cache = tempfile.mkdtemp(prefix="arssr-test-volume-cache-")
    os.environ["ARSSR_JAX_VOLUME_CACHE"] = _volume_cache
    atexit.register(shutil.rmtree, _volume_cache, True)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """The shared small RDN (tests/tiny_model.py) as a (module, params) pair."""
    from tiny_model import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The same model saved as a model directory."""
    from arssr_jax.weights import save_model
    from tiny_model import TINY

    return str(save_model(tmp_path_factory.mktemp("m") / "tiny", TINY, tiny[1]))
