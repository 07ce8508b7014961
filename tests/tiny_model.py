"""The small RDN model the inference, batch and hostile-input tests share."""

import jax

from arssr_jax.models import ModelConfig, build_model, init_params

TINY = ModelConfig(
    encoder="RDN", feature_dim=8, decoder_depth=4, decoder_width=16,
    encoder_options={"num_blocks": 2, "num_layers": 2, "num_features": 8, "growth": 8},
)


def tiny_model():
    """(module, params) of TINY; a positive output bias so the (ReLU) output is never trivially zero."""
    model = build_model(TINY)
    params = init_params(model, jax.random.key(0))
    params["decoder"]["stage_two_1"]["bias"] = params["decoder"]["stage_two_1"]["bias"] + 0.3
    return model, params
