"""Model shapes, parameter counts and configurable sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arssr_jax.models import ENCODERS, ModelConfig, build_model, count_params, decode, encode, init_params, predict

REFERENCE_COUNTS = {"RDN": 5_918_784, "ResCNN": 2_214_912, "SRResNet": 4_317_376}


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_parameter_counts_equal_the_reference(encoder):
    params = jax.eval_shape(lambda: init_params(build_model(ModelConfig(encoder=encoder)), jax.random.key(0)))
    assert count_params(params["encoder"]) == REFERENCE_COUNTS[encoder]
    assert count_params(params["decoder"]) == 364_676


@pytest.mark.parametrize(
    "encoder, options",
    [("RDN", {"num_blocks": 2, "num_layers": 2, "growth": 8, "num_features": 16}),
     ("ResCNN", {"num_blocks": 2, "convs_per_block": 2, "num_features": 8}),
     ("SRResNet", {"num_blocks": 2, "num_features": 8})],
)
def test_small_configurations_run_and_compose(encoder, options):
    config = ModelConfig(encoder=encoder, feature_dim=12, encoder_options=options, decoder_depth=4, decoder_width=32)
    model = build_model(config)
    params = init_params(model, jax.random.key(1))
    volume = jax.random.uniform(jax.random.key(2), (2, 5, 6, 7, 1))
    coords = jax.random.uniform(jax.random.key(3), (2, 9, 3), minval=-1, maxval=1)
    features = encode(model, params, volume)
    assert features.shape == (2, 5, 6, 7, 12)
    out = decode(model, params, features, coords)
    assert out.shape == (2, 9, 1) and bool(jnp.all(out >= 0))  # final ReLU
    np.testing.assert_allclose(out, predict(model, params, volume, coords), rtol=1e-6)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown encoder"):
        ModelConfig(encoder="UNet")
    with pytest.raises(ValueError, match="padding"):
        ModelConfig(padding="reflect")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"encoder": "RDN", "depth": 3})
