"""Roofline arithmetic: floating-point operations per LR voxel (encoder) and per HR voxel (decoder).

A multiply-add counts as 2 FLOPs. Every encoder convolution keeps the LR grid, so a
conv with a (k, k, k, Cin, Cout) kernel costs 2 k^3 Cin Cout per LR voxel; a Dense
layer in -> out costs 2 in out per HR voxel. Biases, activations and residual sums
are left out of the encoder (under 0.1% of it); the decoder count adds trilinear
sampling (8 corners x F channels, a multiply-add each, plus the weights) and its
residual sum, both small. The counts come from the parameter shapes of the model a
config builds, so they follow any encoder size or decoder width.
"""

from __future__ import annotations

import jax
import numpy as np

from arssr_jax.models import ModelConfig, build_model, init_params


def _param_shapes(config: ModelConfig):
    model = build_model(config)
    return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def _kernels(tree):
    """(path, shape) of every 'kernel' leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf.shape) for path, leaf in leaves
            if getattr(path[-1], "key", None) == "kernel"]


def encoder_flops_per_voxel(config: ModelConfig | None = None) -> int:
    """FLOPs of the encoder per LR voxel: sum over its convolutions of 2 k^3 Cin Cout."""
    shapes = _param_shapes(config or ModelConfig())["encoder"]
    return int(sum(2 * np.prod(shape) for _, shape in _kernels(shapes)))


def decoder_flops_per_voxel(config: ModelConfig | None = None) -> int:
    """FLOPs per HR voxel: trilinear sampling of F channels, the MLP's dense layers, its residual sum."""
    config = config or ModelConfig()
    shapes = _param_shapes(config)["decoder"]
    dense = sum(2 * int(np.prod(shape)) for _, shape in _kernels(shapes))
    f = config.feature_dim
    sampling = 8 * 2 * f + 8 * 3  # a multiply-add per corner and channel; about 3 FLOPs per corner weight
    residual = f + 3  # x + stage_one(x)
    return int(dense + sampling + residual)


def flops_summary(config: ModelConfig | None = None) -> dict:
    config = config or ModelConfig()
    return {"encoder_flops_per_lr_voxel": encoder_flops_per_voxel(config),
            "decoder_flops_per_hr_voxel": decoder_flops_per_voxel(config)}


def gflops(flops: float, seconds: float) -> float:
    """Achieved GFLOP/s."""
    return flops / seconds / 1e9 if seconds > 0 else float("nan")
