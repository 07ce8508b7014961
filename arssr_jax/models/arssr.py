"""ArSSR = encoder -> trilinear feature sampling at query coordinates -> MLP decoder."""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arssr_jax.models.conv import CONV_IMPL_CHOICES
from arssr_jax.models.decoder import Decoder
from arssr_jax.models.encoders import ENCODERS
from arssr_jax.options import split_model_block
from arssr_jax.sampling import PADDING_MODES, sample_features_batched
from arssr_jax.spline import PREFILTER_RADIUS, local_range, prefilter, sample_cubic_batched

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What the decoder predicts: "none" = the intensity itself (the reference, final ReLU);
# "tricubic" = a correction added to the input's tricubic interpolant (see ArSSR).
RESIDUAL_MODES = ("none", "tricubic")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved as JSON beside its parameters."""

    encoder: str = "RDN"
    feature_dim: int = 128
    # Encoder sizes other than the defaults, e.g. {"num_blocks": 4}; stored as sorted
    # (name, value) pairs so the config (and the model built from it) is hashable.
    encoder_options: tuple = ()
    decoder_depth: int = 8
    decoder_width: int = 256
    padding: str = "zeros"  # feature sampling outside the volume: "zeros" (reference) or "border"
    compute_dtype: str = "float32"  # "bfloat16": bf16 products, float32 parameters and sums
    residual: str = "none"  # "tricubic": predict a correction to the tricubic interpolant
    # The convolution's formulation (arssr_jax.models.conv): "auto" (Winograd on the CPU
    # backend, lax elsewhere), "lax", "fold2d" or "winograd". Same parameters and results
    # within float32 rounding; only speed differs.
    conv_impl: str = "auto"

    def __post_init__(self):
        options = self.encoder_options
        items = options.items() if isinstance(options, dict) else options
        try:
            pairs = [(str(k), v) for k, v in items]
        except (TypeError, ValueError):
            raise ValueError(f"encoder_options must map option names to values, got {options!r:.80}") from None
        object.__setattr__(self, "encoder_options", tuple(sorted(pairs, key=lambda kv: kv[0])))
        if not isinstance(self.encoder, str) or self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {sorted(ENCODERS)}")
        _check_sizes(self)
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}")
        if self.residual not in RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {self.residual!r}")
        if not isinstance(self.conv_impl, str) or self.conv_impl not in CONV_IMPL_CHOICES:
            raise ValueError(f"conv_impl must be one of {CONV_IMPL_CHOICES}, got {self.conv_impl!r:.40}")

    @property
    def encoded_channels(self) -> int:
        """Channels of the map ``encode`` returns: the features, and in residual mode the
        input's spline coefficients and local range."""
        return self.feature_dim + (2 if self.residual == "tricubic" else 0)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["encoder_options"] = dict(self.encoder_options)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict, source: str = "model config") -> "ModelConfig":
        """The config a ``to_dict`` wrote; fields older versions wrote that are now inference
        options (:mod:`arssr_jax.options`) or removed are set aside (with a note if removed)."""
        values, _ = split_model_block(values, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Sizes a config may ask for: beyond these a config is damaged or hostile (a model of
# 10^6 blocks would take hours to build before anything could be checked).
_MAX_WIDTH = 65536  # feature_dim, decoder_width, num_features, growth
_MAX_COUNT = 256  # decoder_depth, num_blocks, num_layers, convs_per_block


def _check_size(name: str, value, most: int, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not least <= value <= most:
        raise ValueError(f"{name} must be an integer from {least} to {most}, got {value!r:.40}")
    return int(value)


def _check_sizes(config: "ModelConfig") -> None:
    """Types and ranges of the sizes (ValueError naming the field); numpy integers become ints."""
    for field, least in (("feature_dim", 1), ("decoder_width", 1), ("decoder_depth", 4)):
        most = _MAX_COUNT if field == "decoder_depth" else _MAX_WIDTH
        object.__setattr__(config, field, _check_size(field, getattr(config, field), most, least))
    if config.decoder_depth % 2:
        raise ValueError(f"decoder_depth must be even (two stages of equal depth), got {config.decoder_depth}")
    encoder = ENCODERS[config.encoder]
    set_by_config = ("parent", "name", "feature_dim", "dtype", "conv_impl")
    known = sorted(f for f in encoder.__dataclass_fields__ if f not in set_by_config)
    options = []
    for key, value in config.encoder_options:
        if key not in known:
            raise ValueError(f"unknown {config.encoder} encoder option {key!r}; known options: {', '.join(known)}")
        most = _MAX_WIDTH if key in ("num_features", "growth") else _MAX_COUNT
        options.append((key, _check_size(f"encoder option {key}", value, most)))
    object.__setattr__(config, "encoder_options", tuple(options))


class ArSSR(nn.Module):
    """Volumes (N, X, Y, Z, 1) in [0, 1]; coordinates (N, K, 3) in the [-1, 1] cube.

    ``residual="none"`` (the reference): intensity = decoder(feature, coordinate), ReLU'd.
    ``residual="tricubic"``: intensity = tricubic(p) + range(p) * tanh(decoder(feature, coordinate)),
    where tricubic(p) is the input's cubic B-spline interpolant at p (equal to scipy's),
    range(p) the trilinearly sampled 3^3 max - min of the input, and the decoder has no
    final ReLU. The model starts from interpolation (a zero last layer gives exactly
    tricubic), cannot erase what the input shows, adds nothing where the input is flat,
    never moves a value by more than the local contrast, and its correction scales with
    that contrast, so it follows the input's intensity scale.
    """

    config: ModelConfig = ModelConfig()

    def setup(self):
        cfg = self.config
        dtype = DTYPES[cfg.compute_dtype]
        self.encoder = build_encoder(cfg, dtype)
        self.decoder = Decoder(depth=cfg.decoder_depth, width=cfg.decoder_width, dtype=dtype,
                               final_relu=cfg.residual == "none")

    def encode(self, volume):
        """(N, X, Y, Z, 1) -> map (N, X, Y, Z, config.encoded_channels), float32."""
        features = self.encoder(volume).astype(jnp.float32)
        if self.config.residual == "none":
            return features
        intensity = volume[..., 0].astype(jnp.float32)
        extra = jnp.stack([prefilter(intensity), local_range(intensity)], axis=-1)
        return jnp.concatenate([features, extra], axis=-1)

    def decode(self, features, coords):
        """Map (N, X, Y, Z, encoded_channels) sampled at coords (N, K, 3) -> intensities (N, K, 1)."""
        f = self.config.feature_dim
        sampled = sample_features_batched(features[..., :f], coords, self.config.padding)
        out = self.decoder(jnp.concatenate([sampled, coords.astype(sampled.dtype)], axis=-1))
        if self.config.residual == "none":
            return out
        base = sample_cubic_batched(features[..., f], coords)[..., None]
        contrast = sample_features_batched(features[..., f + 1 :], coords, "border")
        return base + contrast * jnp.tanh(out)

    def __call__(self, volume, coords):
        return self.decode(self.encode(volume), coords)


def build_encoder(config: ModelConfig, dtype=jnp.float32) -> nn.Module:
    return ENCODERS[config.encoder](feature_dim=config.feature_dim, dtype=dtype, conv_impl=config.conv_impl,
                                    **dict(config.encoder_options))


def receptive_radius(config: ModelConfig) -> int:
    """Voxels an encoded voxel depends on along each axis, each side: the encoder's, and in
    residual mode also the spline prefilter's reach."""
    radius = build_encoder(config).receptive_radius()
    return max(radius, PREFILTER_RADIUS) if config.residual == "tricubic" else radius


def activation_bytes_per_voxel(config: ModelConfig) -> int:
    """A generous bound on the encoder's live activations per voxel (XLA temporaries included)."""
    channels = build_encoder(config).activation_channels()
    if config.residual == "tricubic":  # the prefilter's window of 2 * radius + 1 taps
        channels = max(channels, 2 * PREFILTER_RADIUS + 1 + config.encoded_channels)
    return 2 * 4 * channels  # float32, twice for XLA's temporaries


def build_model(config: ModelConfig | None = None) -> ArSSR:
    return ArSSR(config or ModelConfig())


def init_params(model: ArSSR, rng, lr_shape=(4, 4, 4)) -> Any:
    """Random parameters for ``model`` (the shapes do not depend on ``lr_shape``)."""
    volume = jnp.zeros((1, *lr_shape, 1), jnp.float32)
    coords = jnp.zeros((1, 1, 3), jnp.float32)
    return model.init(rng, volume, coords)["params"]


# Pure functions over (model, params): the model is a static, hashable description.


def encode(model: ArSSR, params, volume):
    """Feature map of a batch of volumes (N, X, Y, Z, 1)."""
    return model.apply({"params": params}, volume, method=ArSSR.encode)


def decode(model: ArSSR, params, features, coords):
    """Intensities (N, K, 1) at coords (N, K, 3) from a feature map (N, X, Y, Z, F)."""
    return model.apply({"params": params}, features, coords, method=ArSSR.decode)


def default_decode_block() -> int | None:
    """Query rows per MLP pass for :func:`decode_in_blocks`: 4096 on the CPU, else all at once.

    On the CPU each of the decoder's layers writes its activations and XLA applies bias
    and ReLU in a separate pass; 4096 rows (4 MiB a layer) keep those passes in cache:
    1.24x faster whole-volume decoding, ~1.1x faster training steps on 2 cores. GPUs
    want the biggest matrix products instead.
    """
    return 4096 if jax.default_backend() == "cpu" else None


def decode_in_blocks(model: ArSSR, params, features, coords, block: int | None):
    """:func:`decode` with the MLP run over about ``block`` query rows (all samples) at a time.

    coords (N, K, 3) are split along K into blocks of max(1, block // N) queries (the last
    padded, its padding dropped), decoded one after another by ``lax.map``. Same values
    and gradients as :func:`decode` up to float32 summation order. ``block`` None: one pass.
    """
    n, k = coords.shape[:2]
    per = k if not block else max(1, min(k, block // n))
    if per >= k:
        return decode(model, params, features, coords)
    count = -(-k // per)
    padded = jnp.pad(coords, ((0, 0), (0, count * per - k), (0, 0)))
    blocks = padded.reshape(n, count, per, 3).swapaxes(0, 1)
    values = jax.lax.map(lambda c: decode(model, params, features, c), blocks)
    return values.swapaxes(0, 1).reshape(n, count * per, -1)[:, :k]


def predict(model: ArSSR, params, volume, coords):
    """encode then decode: (N, X, Y, Z, 1), (N, K, 3) -> (N, K, 1)."""
    return model.apply({"params": params}, volume, coords)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
