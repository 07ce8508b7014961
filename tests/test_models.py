"""Model shapes, parameter counts and configurable sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arssr_jax.models import (
    ENCODERS,
    ModelConfig,
    build_model,
    count_params,
    decode,
    decode_in_blocks,
    encode,
    init_params,
    predict,
)

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


@pytest.mark.parametrize("block", [None, 6, 14, 40, 1000])
def test_decoding_in_blocks_equals_one_pass(block):
    # 2 samples x 19 queries: blocks of 3, 7 and 19 queries (the last block padded), one pass.
    config = ModelConfig(encoder="ResCNN", feature_dim=12, encoder_options={"num_blocks": 1, "convs_per_block": 1,
                         "num_features": 8}, decoder_depth=4, decoder_width=32)
    model = build_model(config)
    params = init_params(model, jax.random.key(4))
    features = jax.random.normal(jax.random.key(5), (2, 4, 5, 6, 12))
    coords = jax.random.uniform(jax.random.key(6), (2, 19, 3), minval=-1.2, maxval=1.2)
    weights = jax.random.normal(jax.random.key(7), (2, 19, 1))

    def loss(decoder):
        return lambda p, f: jnp.sum(decoder(model, p, f, coords) * weights)

    blocked = lambda m, p, f, c: decode_in_blocks(m, p, f, c, block)
    np.testing.assert_allclose(blocked(model, params, features, coords), decode(model, params, features, coords),
                               rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(blocked), argnums=(0, 1))(params, features)),
                    jax.tree.leaves(jax.grad(loss(decode), argnums=(0, 1))(params, features))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown encoder"):
        ModelConfig(encoder="UNet")
    with pytest.raises(ValueError, match="padding"):
        ModelConfig(padding="reflect")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"encoder": "RDN", "depth": 3})


@pytest.mark.parametrize("encoder,options", [
    ("RDN", {"num_blocks": 2, "num_layers": 2, "num_features": 4, "growth": 4}),
    ("ResCNN", {"num_blocks": 2, "convs_per_block": 2, "num_features": 4}),
    ("SRResNet", {"num_blocks": 2, "num_features": 4}),
])
def test_each_encoder_knows_its_receptive_radius(encoder, options):
    """A unit impulse spreads exactly receptive_radius() voxels each side, no further."""
    from arssr_jax.models import build_encoder, receptive_radius

    config = ModelConfig(encoder=encoder, feature_dim=4, decoder_depth=4, decoder_width=4, encoder_options=options)
    module = build_encoder(config)
    n = 2 * module.receptive_radius() + 9
    params = module.init(jax.random.key(0), jnp.zeros((1, n, n, n, 1)))
    params = jax.tree_util.tree_map(lambda x: jnp.abs(x) + 0.1, params)  # positive: nothing cancels, ReLUs open
    impulse = jnp.zeros((1, n, n, n, 1)).at[0, n // 2, n // 2, n // 2, 0].set(1.0)
    response = np.abs(np.asarray(module.apply(params, impulse) - module.apply(params, jnp.zeros_like(impulse))))
    line = response[0, :, n // 2, n // 2].max(axis=-1)
    reach = np.nonzero(line > 1e-4 * line.max())[0]  # above float32 rounding of the bias-driven output
    assert n // 2 - reach.min() == module.receptive_radius() == reach.max() - n // 2
    assert receptive_radius(config) == module.receptive_radius()
    assert receptive_radius(config.replace(residual="tricubic")) >= 16


def _conv_ranks(fn, *args) -> list:
    """Operand ranks of the lax convolutions in fn's program (custom-VJP bodies included):
    5 for a 3D convolution, 4 for the folded 2D form; none for Winograd's matrix products."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                yield len(eqn.invars[0].aval.shape)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    return sorted(set(walk(jax.make_jaxpr(fn)(*args).jaxpr)))


def _random_params(init, seed=0):
    """Random parameters of the shapes ``init()`` makes, without compiling its initialisers."""
    rng = np.random.default_rng(seed)
    draw = lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
    return jax.tree.map(draw, jax.eval_shape(init))


def test_conv_impl_is_a_config_option():
    # The option reaches every convolution; every formulation gives the same parameters
    # and, within float32 rounding, the same output.
    from arssr_jax.models.conv import resolve_conv_impl

    config = ModelConfig(encoder="RDN", feature_dim=6, decoder_depth=4, decoder_width=8, residual="tricubic",
                         encoder_options={"num_blocks": 2, "num_layers": 2, "growth": 4, "num_features": 6})
    volume = jax.random.uniform(jax.random.key(8), (2, 6, 5, 7, 1))
    coords = jax.random.uniform(jax.random.key(9), (2, 11, 3), minval=-1, maxval=1)
    params = _random_params(lambda: init_params(build_model(config), jax.random.key(10)))
    shapes = jax.tree.map(jnp.shape, params)
    runs = {impl: (lambda p, m=build_model(config.replace(conv_impl=impl)): predict(m, p, volume, coords))
            for impl in ("auto", "lax", "fold2d", "winograd")}
    assert {impl: _conv_ranks(run, params) for impl, run in runs.items() if impl != "auto"} == {
        "lax": [5], "fold2d": [4], "winograd": []}
    auto = resolve_conv_impl("auto", voxels=volume.size)  # this small input: lax on the CPU
    assert str(jax.make_jaxpr(runs["auto"])(params)) == str(jax.make_jaxpr(runs[auto])(params))
    want = jax.jit(runs["lax"])(params)
    for impl in ("fold2d", "winograd"):
        model = build_model(config.replace(conv_impl=impl))
        assert jax.tree.map(jnp.shape, jax.eval_shape(lambda: init_params(model, jax.random.key(10)))) == shapes
        np.testing.assert_allclose(jax.jit(runs[impl])(params), want, rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match="conv_impl must be one of .*'direct'"):
        ModelConfig(conv_impl="direct")
    with pytest.raises(ValueError, match="conv_impl"):
        ModelConfig.from_dict({**config.to_dict(), "conv_impl": None})


def test_conv_impl_round_trips_and_defaults_to_auto():
    config = ModelConfig(encoder="ResCNN", conv_impl="fold2d")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(config.replace(conv_impl="auto").to_dict()).conv_impl == "auto"
    old = config.to_dict()
    del old["conv_impl"]  # a config.json written before the option existed
    assert ModelConfig.from_dict(old) == config.replace(conv_impl="auto")
    from arssr_jax.models import build_encoder

    assert build_encoder(config).conv_impl == "fold2d"
    with pytest.raises(ValueError, match="unknown ResCNN encoder option 'conv_impl'"):
        ModelConfig(encoder="ResCNN", encoder_options={"conv_impl": "lax"})  # a field of its own


def test_shipped_model_config_loads_with_auto_conv():
    import json
    from pathlib import Path

    import arssr_jax

    path = Path(arssr_jax.__file__).parent / "weights" / "pretrained" / "default" / "config.json"
    model = json.loads(path.read_text())["model"]
    model.pop("conv_impl", None)  # as written before the option existed
    assert ModelConfig.from_dict(model).conv_impl == "auto"


def test_baselines_take_conv_impl():
    from arssr_jax.errors import ArSSRError
    from arssr_jax.models.baselines import build_baseline

    x = jax.random.uniform(jax.random.key(11), (1, 7, 6, 5, 1))
    # SRCNN3D: 5^3 and 1^3 kernels (Winograd falls back to the folded form); DCSRN: 3^3 and 1^3.
    for name, options, winograd_ranks in (("SRCNN3D", {"kernels": (5, 1, 3), "filters": (4, 3)}, [4]),
                                          ("DCSRN", {"growth": 3, "num_units": 2}, [])):
        modules = {impl: build_baseline(name, {**options, "conv_impl": impl}) for impl in ("lax", "fold2d", "winograd")}
        params = _random_params(lambda: modules["lax"].init(jax.random.key(12), x)["params"])
        runs = {impl: (lambda p, m=m: m.apply({"params": p}, x)) for impl, m in modules.items()}
        assert {impl: _conv_ranks(run, params) for impl, run in runs.items()} == {
            "lax": [5], "fold2d": [4], "winograd": winograd_ranks}
        want = jax.jit(runs["lax"])(params)
        for impl in ("fold2d", "winograd"):
            np.testing.assert_allclose(jax.jit(runs[impl])(params), want, rtol=1e-5,
                                       atol=1e-5 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ArSSRError, match="direct"):
        build_baseline("DCSRN", {"conv_impl": "direct"})
