import os
import sys

# Tests import the PyTorch mirror of the reference from this folder.
sys.path.insert(0, os.path.dirname(__file__))
