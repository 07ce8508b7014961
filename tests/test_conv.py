"""The folded-2D convolution (CPU default) equals lax's 3D convolution, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arssr_jax.models.conv import CONV_IMPLS, ENV_VAR, Conv3d, conv3d_same, conv_impl

CASES = [
    # (batch, spatial shape, k, cin, cout)
    (1, (5, 6, 7), 3, 1, 4),
    (2, (4, 3, 5), 3, 3, 5),
    (1, (6, 5, 4), 3, 16, 8),
    (3, (3, 4, 6), 1, 7, 9),
    (1, (7, 5, 6), 5, 2, 3),
    (2, (4, 5, 3), 2, 3, 2),  # even kernel: asymmetric "SAME" padding
]


def _inputs(n, shape, k, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, *shape, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, k, cin, cout)) / np.sqrt(k**3 * cin), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, *shape, cout)), jnp.float32)
    return x, kernel, bias, g


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-{'x'.join(map(str, c[1]))}-k{c[2]}-{c[3]}to{c[4]}")
def test_fold2d_matches_lax_forward_and_gradient(case):
    x, kernel, bias, g = _inputs(*case)

    def loss(impl):
        return lambda x, kernel, bias: jnp.sum(conv3d_same(x, kernel, bias, impl=impl) * g)

    y_lax = conv3d_same(x, kernel, bias, impl="lax")
    y_fold = jax.jit(lambda *a: conv3d_same(*a, impl="fold2d"))(x, kernel, bias)
    np.testing.assert_allclose(y_fold, y_lax, rtol=1e-5, atol=1e-5)
    grads_lax = jax.grad(loss("lax"), argnums=(0, 1, 2))(x, kernel, bias)
    grads_fold = jax.jit(jax.grad(loss("fold2d"), argnums=(0, 1, 2)))(x, kernel, bias)
    for a, b in zip(grads_fold, grads_lax):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_kernel_gradient_over_many_chunks():
    # 16^2 slices: 16 per kernel-gradient chunk; 3 x 20 slices -> 4 chunks (unrolled);
    # 2 x 80 slices -> 10 chunks (lax.scan, zero-padded batch).
    for n, d in ((3, 20), (2, 80)):
        x, kernel, bias, g = _inputs(n, (d, 16, 16), 3, 2, 3, seed=n)
        grad = lambda impl: jax.grad(lambda k: jnp.sum(conv3d_same(x, k, bias, impl=impl) * g))(kernel)
        want = grad("lax")
        np.testing.assert_allclose(jax.jit(lambda: grad("fold2d"))(), want, rtol=1e-4,
                                   atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_bfloat16_products_agree():
    x, kernel, bias, _ = _inputs(2, (4, 5, 6), 3, 8, 4)
    a = conv3d_same(x, kernel, bias, jnp.bfloat16, impl="lax")
    b = conv3d_same(x, kernel, bias, jnp.bfloat16, impl="fold2d")
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
    grads = [jax.grad(lambda x: jnp.sum(conv3d_same(x, kernel, bias, jnp.bfloat16, impl=i) ** 2))(x) for i in CONV_IMPLS]
    np.testing.assert_allclose(grads[1], grads[0], rtol=5e-2, atol=5e-2)


def test_choice_by_backend_and_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert conv_impl(backend="cpu") == "fold2d"
    assert conv_impl(backend="gpu") == "lax"
    assert conv_impl(backend="tpu") == "lax"
    assert conv_impl("lax", backend="cpu") == "lax"
    monkeypatch.setenv(ENV_VAR, "lax")
    assert conv_impl(backend="cpu") == "lax"
    assert conv_impl("fold2d", backend="gpu") == "fold2d"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert conv_impl(backend="gpu") == "lax"
    monkeypatch.setenv(ENV_VAR, "winograd")
    with pytest.raises(ValueError, match="winograd"):
        conv_impl()


def test_module_implementations_share_parameters():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 4, 6, 3)), jnp.float32)
    params = Conv3d(6, impl="lax").init(jax.random.key(0), x)
    a = Conv3d(6, impl="lax").apply(params, x)
    b = Conv3d(6, impl="fold2d").apply(params, x)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
