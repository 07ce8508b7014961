"""Stored models: model directories, shipped models, training workdirs, baseline directories,
and the reference's .pkl read safely (no torch)."""

from arssr_jax.weights.model_dir import available_models, load_model, load_options, read_model_dir, save_model
from arssr_jax.weights.reference import convert_state_dict, load_torch_reference
from arssr_jax.weights.torch_state_dict import read_state_dict
from arssr_jax.weights.workdir import load_inference_params

__all__ = [
    "available_models", "load_model", "load_options", "read_model_dir", "save_model",
    "convert_state_dict", "load_torch_reference", "read_state_dict", "load_inference_params",
]
