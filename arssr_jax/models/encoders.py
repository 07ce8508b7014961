"""The three ArSSR encoders (docs/REFERENCE.md section 1), channels-last 3D convolutions.

All convolutions: kernel 3 (or 1 where noted), stride 1, zero "same" padding, bias.
Each encoder maps (N, X, Y, Z, 1) to (N, X, Y, Z, feature_dim): no upscaling.
Sub-module names mirror the reference's state_dict so the weight mapping stays
readable (see arssr_jax/weights/reference.py).

``conv_impl`` chooses the convolution's formulation (:mod:`arssr_jax.models.conv`;
"auto": by backend); it changes no parameter.

Each encoder knows its own size for whole-volume inference: ``receptive_radius()``
(voxels an output voxel depends on along each axis, each side: the tile halo) and
``activation_channels()`` (a generous bound on its live activations per voxel).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from arssr_jax.models.conv import Conv3d


class DenseLayer(nn.Module):
    growth: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        y = nn.relu(Conv3d(self.growth, dtype=self.dtype, impl=self.conv_impl, name="conv")(x))
        return jnp.concatenate([x, y], axis=-1)


class ResidualDenseBlock(nn.Module):
    """num_layers densely connected conv+ReLU layers, 1x1x1 local fusion, residual."""

    num_features: int
    growth: int
    num_layers: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        y = x
        for i in range(self.num_layers):
            y = DenseLayer(self.growth, dtype=self.dtype, conv_impl=self.conv_impl, name=f"layers_{i}")(y)
        return x + Conv3d(self.num_features, kernel=1, dtype=self.dtype, impl=self.conv_impl, name="lff")(y)


class RDN(nn.Module):
    """Residual dense network: 5,918,784 parameters at the defaults."""

    feature_dim: int = 128
    num_features: int = 64
    growth: int = 64
    num_blocks: int = 8
    num_layers: int = 3
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, volume):
        conv = lambda features, name, kernel=3: Conv3d(features, kernel=kernel, dtype=self.dtype,
                                                       impl=self.conv_impl, name=name)
        shallow = conv(self.num_features, "sfe1")(volume)
        x = conv(self.num_features, "sfe2")(shallow)
        block_outputs = []
        for b in range(self.num_blocks):
            x = ResidualDenseBlock(
                self.num_features, self.growth, self.num_layers, dtype=self.dtype,
                conv_impl=self.conv_impl, name=f"rdbs_{b}",
            )(x)
            block_outputs.append(x)
        fused = conv(self.num_features, "gff_0", kernel=1)(jnp.concatenate(block_outputs, axis=-1))
        fused = conv(self.num_features, "gff_1")(fused) + shallow
        return conv(self.feature_dim, "output")(fused)

    def receptive_radius(self) -> int:
        return 4 + self.num_blocks * self.num_layers  # sfe1, sfe2, gff_1, output; one per dense layer

    def activation_channels(self) -> int:
        # the concatenated block outputs, one block's dense stack, the output
        return (self.num_blocks + 2) * self.num_features + self.num_layers * self.growth + self.feature_dim


class ResCNN(nn.Module):
    """Residual CNN (Du et al. 2020 as used by ArSSR): 2,214,912 parameters at the defaults."""

    feature_dim: int = 128
    num_features: int = 64
    num_blocks: int = 3
    convs_per_block: int = 6
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, volume):
        conv = lambda features, name: Conv3d(features, dtype=self.dtype, impl=self.conv_impl, name=name)
        x = nn.relu(conv(self.num_features, "conv_start")(volume))
        for b in range(1, self.num_blocks + 1):
            y = x
            for i in range(self.convs_per_block):
                y = nn.relu(conv(self.num_features, f"block{b}_{i}")(y))
            x = y + x
        # The one-channel input is broadcast onto every feature channel (global skip).
        return volume + conv(self.feature_dim, "conv_end")(x)

    def receptive_radius(self) -> int:
        return 2 + self.num_blocks * self.convs_per_block  # conv_start, conv_end

    def activation_channels(self) -> int:
        return 4 * self.num_features + self.feature_dim


class SRResNet(nn.Module):
    """SRResNet body without upsampling: 4,317,376 parameters at the defaults."""

    feature_dim: int = 128
    num_features: int = 64
    num_blocks: int = 18
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, volume):
        conv = lambda features, name: Conv3d(features, dtype=self.dtype, impl=self.conv_impl, name=name)
        x = conv(self.num_features, "head")(volume)
        for b in range(1, self.num_blocks + 1):
            y = nn.relu(conv(self.num_features, f"res{b}_conv1")(x))
            x = x + conv(self.num_features, f"res{b}_conv2")(y)
        x = conv(self.num_features, "body_end")(x)
        return conv(self.feature_dim, "tail")(x)

    def receptive_radius(self) -> int:
        return 3 + 2 * self.num_blocks  # head, body_end, tail; two per block

    def activation_channels(self) -> int:
        return 4 * self.num_features + self.feature_dim


ENCODERS = {"RDN": RDN, "ResCNN": ResCNN, "SRResNet": SRResNet}
