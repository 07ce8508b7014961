"""A 3D "same" convolution with bias, channels-last: the one conv every model uses."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMENSIONS = ("NDHWC", "DHWIO", "NDHWC")


def conv3d_same(x, kernel, bias, dtype=jnp.float32):
    """Cross-correlation of x (N, X, Y, Z, Cin) with kernel (k, k, k, Cin, Cout), zero 'same' padding."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=(1, 1, 1),
        padding="SAME",
        dimension_numbers=_DIMENSIONS,
        preferred_element_type=jnp.float32,
    )
    return y + bias.astype(jnp.float32)


class Conv3d(nn.Module):
    """kernel^3 convolution, stride 1, zero padding kernel // 2, bias.

    Parameters ``kernel`` (k, k, k, in, out) and ``bias`` (out,) are float32; the
    products run in ``dtype`` (float32 by default, bfloat16 as an option) and
    accumulate in float32.
    """

    features: int
    kernel: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel,) * 3 + (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return conv3d_same(x, kernel, bias, self.dtype)
