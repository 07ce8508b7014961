"""The ArSSR decoder: a two-stage residual MLP on concat(feature, coordinate)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _mlp(x, widths, prefix, dtype, last_relu=True):
    """Dense layers of the given output widths, each followed by ReLU (the last one too
    unless ``last_relu`` is False)."""
    for i, width in enumerate(widths):
        dense = nn.Dense(width, dtype=dtype, param_dtype=jnp.float32, name=f"{prefix}_{i}")
        x = dense(x).astype(jnp.float32)
        if last_relu or i < len(widths) - 1:
            x = nn.relu(x)
    return x


class Decoder(nn.Module):
    """Input x = concat(feature, coordinate) of width F + 3 (feature first).

    stage one: F+3 -> width (x layers_per_stage - 1) -> F+3, ReLU after each layer;
    stage two on x + stage_one(x): F+3 -> width (x layers_per_stage - 1) -> 1, ReLU
    after each layer, so the predicted intensity is never negative (as the reference).
    ``depth`` counts the layers of both stages (the paper's 8 = 4 + 4).
    364,676 parameters at the defaults. ``final_relu=False`` drops the very last ReLU
    (the residual model's output is a signed correction).
    """

    depth: int = 8
    width: int = 256
    dtype: Any = jnp.float32
    final_relu: bool = True

    @nn.compact
    def __call__(self, x):
        if self.depth < 4 or self.depth % 2:
            raise ValueError(f"decoder depth must be an even number >= 4, got {self.depth}")
        hidden = [self.width] * (self.depth // 2 - 1)
        y = _mlp(x, hidden + [x.shape[-1]], "stage_one", self.dtype)
        return _mlp(x + y, hidden + [1], "stage_two", self.dtype, self.final_relu)
