"""Models: the ArSSR encoders and decoder, and one registry by name."""

from arssr_jax.models.arssr import (
    ArSSR,
    ModelConfig,
    activation_bytes_per_voxel,
    build_encoder,
    build_model,
    count_params,
    decode,
    decode_in_blocks,
    default_decode_block,
    encode,
    init_params,
    predict,
    receptive_radius,
)
from arssr_jax.models.decoder import Decoder
from arssr_jax.models.encoders import ENCODERS, RDN, ResCNN, SRResNet

__all__ = [
    "ArSSR", "ModelConfig", "activation_bytes_per_voxel", "build_encoder", "build_model", "count_params", "decode", "decode_in_blocks",
    "default_decode_block", "encode", "init_params",
    "predict", "receptive_radius", "Decoder", "ENCODERS", "RDN", "ResCNN", "SRResNet",
]
