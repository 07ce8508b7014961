"""Baselines of the ArSSR paper's comparison (docs/REFERENCE.md section 5).

Interpolation (``tricubic``, ``nearest``) lives in :mod:`arssr_jax.interpolation`.

Fixed-scale CNNs (flax linen, channels-last ``(N, X, Y, Z, 1)``). Each takes the
tricubic-upsampled LR volume (already the HR size) and returns the HR estimate; one
model is trained per scale, as in the paper. ``BASELINES`` maps name -> module class:

* ``SRCNN3D`` (Pham et al., ISBI 2017): conv f1^3 x n1 + ReLU, conv f2^3 x n2 + ReLU,
  conv f3^3 x 1. Defaults are the 9-1-5 kernels with 64/32 filters of the SRCNN
  family the paper evaluates; no global residual by default (``residual=True``
  adds the input back, the variant of Pham et al. 2019).
* ``DCSRN`` (Chen et al., ISBI 2018): a 3^3 conv with 2k filters, one dense block of
  4 units (each ELU -> 3^3 conv with k = 24 filters, its output concatenated to its
  input), then a 1^3 reconstruction conv to one channel. The paper puts a batch
  normalisation before each ELU; we leave it out by default (``norm=False``) so the
  model is a pure function of its parameters (no batch statistics to carry, train
  and test behave alike); ``norm=True`` uses a LayerNorm over channels instead,
  which needs no running statistics.
* ``ResCNN`` (Du et al. 2020): ``arssr_jax.models.encoders.ResCNN`` with
  ``feature_dim=1``: its output is ``input + conv_end(...)``, i.e. a residual CNN
  predicting a correction of the interpolated input (global residual).

Each takes ``conv_impl`` (an option like any other; "auto", "lax", "fold2d" or "winograd",
see :mod:`arssr_jax.models.conv`): the convolution's formulation, which changes no parameter.

Their model directories are read and written by :mod:`arssr_jax.weights.baseline_dir`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.interpolation import tricubic
from arssr_jax.models.conv import Conv3d, resolve_conv_impl
from arssr_jax.models.encoders import ResCNN
from arssr_jax.tiling import tiled_apply



# --------------------------------------------------------------------------- networks


class SRCNN3D(nn.Module):
    """Three convolutions: f1^3 x n1 + ReLU, f2^3 x n2 + ReLU, f3^3 x 1."""

    kernels: Sequence[int] = (9, 1, 5)
    filters: Sequence[int] = (64, 32)
    residual: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        f1, f2, f3 = self.kernels
        n1, n2 = self.filters
        conv = lambda features, kernel, name: Conv3d(features, kernel=kernel, dtype=self.dtype,
                                                     impl=self.conv_impl, name=name)
        y = nn.relu(conv(n1, f1, "conv1")(x))
        y = nn.relu(conv(n2, f2, "conv2")(y))
        y = conv(1, f3, "conv3")(y)
        return x + y if self.residual else y

    def receptive_radius(self) -> int:
        return sum(k // 2 for k in self.kernels)


class DCSRN(nn.Module):
    """Densely connected SR network: 2k-filter conv, dense units (ELU -> conv k), 1^3 conv."""

    growth: int = 24
    num_units: int = 4
    norm: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        conv = lambda features, name, kernel=3: Conv3d(features, kernel=kernel, dtype=self.dtype,
                                                       impl=self.conv_impl, name=name)
        y = conv(2 * self.growth, "conv_in")(x)
        for u in range(self.num_units):
            h = nn.LayerNorm(name=f"norm{u}")(y) if self.norm else y
            h = conv(self.growth, f"unit{u}")(nn.elu(h))
            y = jnp.concatenate([y, h], axis=-1)
        return conv(1, "reconstruct", kernel=1)(y)

    def receptive_radius(self) -> int:
        return 1 + self.num_units


class ResCNNBaseline(nn.Module):
    """Du et al.'s residual CNN as a fixed-scale baseline: ResCNN with one output channel."""

    num_features: int = 64
    num_blocks: int = 3
    convs_per_block: int = 6
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        return ResCNN(feature_dim=1, num_features=self.num_features, num_blocks=self.num_blocks,
                      convs_per_block=self.convs_per_block, dtype=self.dtype, conv_impl=self.conv_impl,
                      name="net")(x)

    def receptive_radius(self) -> int:
        return 2 + self.num_blocks * self.convs_per_block


BASELINES: dict[str, type] = {"SRCNN3D": SRCNN3D, "DCSRN": DCSRN, "ResCNN": ResCNNBaseline}


def build_baseline(name: str, options: dict | None = None) -> nn.Module:
    if name not in BASELINES:
        raise ArSSRError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    options = dict(options or {})
    try:
        resolve_conv_impl(options.get("conv_impl", "auto"))
        return BASELINES[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except (TypeError, ValueError) as error:
        raise ArSSRError(f"bad options {options} for baseline {name}: {error}") from None


def init_baseline(module: nn.Module, rng, shape=(8, 8, 8)) -> dict:
    """Random parameters (their shapes do not depend on ``shape``); one jitted init."""
    volume = jnp.zeros((1, *shape, 1), jnp.float32)
    return jax.jit(lambda key: module.init(key, volume)["params"])(rng)


# --------------------------------------------------------------------------- applying


def apply_baseline(module: nn.Module, params, volume, *, tile: int = 64) -> np.ndarray:
    """Run a baseline CNN on a 3D (cubic-upsampled) volume in overlapping tiles.

    Tiles have a halo of the network's receptive radius, so the result equals the
    whole-volume output exactly (one compile: every window has the same shape).
    """
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ArSSRError(f"baseline input must be a 3D volume, got shape {volume.shape}")
    fn = _jitted_apply(module)
    return tiled_apply(lambda window: fn(params, jnp.asarray(window[None, ..., None]))[0, ..., 0],
                       volume, tile, module.receptive_radius())


@functools.lru_cache(maxsize=16)
def _jitted_apply(module):
    # Modules are frozen dataclasses (hashable): one jitted apply per architecture.
    return jax.jit(lambda params, x: module.apply({"params": params}, x))


def run_baseline(module, params, lr, shape, *, tile: int = 64) -> np.ndarray:
    """LR volume -> tricubic onto ``shape`` -> CNN -> HR estimate (float32)."""
    return apply_baseline(module, params, tricubic(lr, shape=shape), tile=tile)
