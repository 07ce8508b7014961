import os
import sys

# Tests import the PyTorch mirror of the reference from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# Tests that call the CLI in-process keep XLA's persistent cache off: hermetic runs.
os.environ.setdefault("ARSSR_JAX_CACHE", "off")
