"""The folded-2D and Winograd convolutions (CPU) equal lax's 3D convolution, forward and backward."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arssr_jax.models import conv as conv_module
from arssr_jax.models.conv import (CONV_IMPL_CHOICES, CONV_IMPLS, WINOGRAD_MIN_VOXELS, Conv3d, conv3d_same,
                                   resolve_conv_impl)

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


def test_kernel_gradient_over_many_chunks(monkeypatch):
    # Chunks of 4096 voxels = 16 slices of 16^2; 3 x 20 slices -> 4 chunks (unrolled);
    # 2 x 80 slices -> 10 chunks (over the limit set here: lax.scan, zero-padded batch).
    monkeypatch.setattr(conv_module, "_KERNEL_GRAD_CHUNK_VOXELS", 16 * 16 * 16)
    monkeypatch.setattr(conv_module, "_MAX_UNROLLED_CHUNKS", 8)
    for n, d in ((3, 20), (2, 80)):
        x, kernel, bias, g = _inputs(n, (d, 16, 16), 3, 2, 3, seed=n)
        grad = lambda impl: jax.grad(lambda k: jnp.sum(conv3d_same(x, k, bias, impl=impl) * g))(kernel)
        want = grad("lax")
        np.testing.assert_allclose(jax.jit(lambda: grad("fold2d"))(), want, rtol=1e-4,
                                   atol=1e-4 * float(jnp.max(jnp.abs(want))))


WINOGRAD_CASES = [
    # (batch, spatial shape, cin, cout): odd and even sizes, 1, 2 and 3 along each axis
    (1, (5, 6, 7), 1, 4),
    (2, (1, 2, 3), 3, 5),
    (3, (2, 1, 1), 4, 2),
    (1, (3, 3, 2), 7, 7),
    (2, (8, 5, 4), 16, 8),
    (1, (6, 7, 9), 32, 16),
    (2, (4, 4, 6), 64, 32),
]


def _check_against_lax(x, kernel, bias, g, fn):
    """fn(x, kernel, bias) vs the lax conv: forward and all three gradients; worst relative errors."""

    def loss(f):
        return lambda x, kernel, bias: jnp.sum(f(x, kernel, bias) * g)

    lax_conv = lambda *a: conv3d_same(*a, impl="lax")
    want = [lax_conv(x, kernel, bias), *jax.grad(loss(lax_conv), argnums=(0, 1, 2))(x, kernel, bias)]
    got = [jax.jit(fn)(x, kernel, bias), *jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(x, kernel, bias)]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    return [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want)]


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: f"n{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}to{c[3]}")
def test_winograd_matches_lax_forward_and_gradient(case):
    n, shape, cin, cout = case
    errors = _check_against_lax(*_inputs(n, shape, 3, cin, cout), lambda *a: conv3d_same(*a, impl="winograd"))
    # float32 rounding; the worst seen: 4.5e-7 with F(2, 3) only, 2.2e-6 with F(4, 3) on two axes
    assert max(errors) < 5e-6


@pytest.mark.parametrize("budget_tiles", [1, 6, 20, 60])
def test_winograd_slabs(monkeypatch, budget_tiles):
    # A slab budget of a few tiles' transformed data splits the batch of 4 into several
    # slabs: one tile row, part of the height, part of the depth, whole samples.
    n, shape, cin, cout = 4, (6, 9, 7), 16, 8
    layout = conv_module._winograd_layout((n, *shape, cin), cout)
    tile_bytes = layout.positions * (cin + cout) * 4
    monkeypatch.setattr(conv_module, "_WINOGRAD_SLAB_BYTES", budget_tiles * tile_bytes)
    layout = conv_module._winograd_layout((n, *shape, cin), cout)
    assert layout.count > 1
    # The slabs cover the volume, and each holds at most the budget (or a single tile row).
    assert all(p >= s for p, s in zip(layout.size, shape))
    assert layout.counts[0] * layout.slab[0] == n
    assert [e * c for e, c in zip(layout.extent[:2], layout.counts[1:])] == list(layout.size[:2])
    per_slab = layout.slab[0] * math.prod(layout.tiles)
    assert per_slab <= budget_tiles or per_slab == layout.tiles[2]
    x, kernel, bias, g = _inputs(n, shape, 3, cin, cout, seed=budget_tiles % 7)
    _check_against_lax(x, kernel, bias, g, lambda *a: conv3d_same(*a, impl="winograd"))


def test_winograd_tile_sizes():
    # F(4, 3) only where it pads no more than F(2, 3), and on two axes at most (accuracy);
    # a 48^3 volume gets 4 x 4 x 2 tiles (README, "Performance").
    assert conv_module._winograd_tile_sizes((48, 48, 48)) == (4, 4, 2)
    for shape in itertools.product(range(1, 14), repeat=3):
        sizes = conv_module._winograd_tile_sizes(shape)
        assert set(sizes) <= {2, 4} and sizes.count(4) <= 2
        assert all(-(-s // m) * m == -(-s // 2) * 2 for s, m in zip(shape, sizes))


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_1d_transform_is_exact_correlation(m):
    # y = A^T [(G g) * (B^T d)] must be the "valid" correlation of d (m + 2 taps) with g (3).
    bt, gm, at = conv_module._winograd_matrices(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(at @ ((gm @ g) * (bt @ d)), np.correlate(d, g, "valid"), rtol=1e-12, atol=1e-12)


def test_winograd_falls_back_for_other_kernels():
    # 1x1x1 is a matrix product, 5x5x5 and 2x2x2 use fold2d: impl="winograd" still gives lax's result.
    for k, cin, cout in ((1, 5, 3), (5, 2, 3), (2, 3, 2)):
        x, kernel, bias, _ = _inputs(2, (4, 5, 6), k, cin, cout)
        np.testing.assert_allclose(conv3d_same(x, kernel, bias, impl="winograd"),
                                   conv3d_same(x, kernel, bias, impl="lax"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fold2d", "winograd"])
def test_bfloat16_products_agree(impl):
    x, kernel, bias, _ = _inputs(2, (4, 5, 6), 3, 8, 4)
    a = conv3d_same(x, kernel, bias, jnp.bfloat16, impl="lax")
    b = conv3d_same(x, kernel, bias, jnp.bfloat16, impl=impl)
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)

    def grads(i):
        loss = lambda x, k: jnp.sum(conv3d_same(x, k, bias, jnp.bfloat16, impl=i) ** 2)
        return jax.grad(loss, argnums=(0, 1))(x, kernel)

    (dx_lax, dk_lax), (dx, dk) = grads("lax"), grads(impl)
    np.testing.assert_allclose(dx, dx_lax, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(dk, dk_lax, rtol=5e-2, atol=5e-2 * float(jnp.max(jnp.abs(dk_lax))))


def test_choice_by_backend_and_explicit(monkeypatch):
    assert resolve_conv_impl(backend="cpu") == "winograd"
    assert resolve_conv_impl("auto", backend="gpu") == "lax"
    assert resolve_conv_impl("auto", backend="tpu") == "lax"
    # On the CPU small inputs (cheaper to trace as one conv) go to lax; a training batch stays Winograd.
    assert resolve_conv_impl(backend="cpu", voxels=8**3) == "lax"
    assert resolve_conv_impl(backend="cpu", voxels=WINOGRAD_MIN_VOXELS - 1) == "lax"
    assert resolve_conv_impl(backend="cpu", voxels=WINOGRAD_MIN_VOXELS) == "winograd"
    assert resolve_conv_impl(backend="cpu", voxels=12 * 10**3) == "winograd"
    assert resolve_conv_impl(backend="gpu", voxels=10**9) == "lax"
    for impl in CONV_IMPLS:
        assert resolve_conv_impl(impl, backend="cpu") == resolve_conv_impl(impl, backend="gpu") == impl
        assert resolve_conv_impl(impl, backend="cpu", voxels=8) == impl
    # The choice is an argument, never read from the environment.
    monkeypatch.setenv("ARSSR_CONV_IMPL", "lax")
    assert resolve_conv_impl(backend="cpu") == "winograd"
    for bad in ("direct", "", None, "LAX"):
        with pytest.raises(ValueError, match="auto, lax, fold2d, winograd"):
            resolve_conv_impl(bad)
    x, kernel, bias, _ = _inputs(1, (3, 3, 3), 3, 1, 1)
    with pytest.raises(ValueError, match="'direct'"):
        conv3d_same(x, kernel, bias, impl="direct")


def test_auto_runs_lax_below_the_winograd_size_and_winograd_from_it():
    # Bit for bit: "auto" on the CPU is exactly one of the two formulations, chosen by input size.
    for shape, expected in (((1, 5, 6, 7), "lax"), ((1, 16, 16, 16), "winograd"), ((2, 16, 16, 8), "winograd")):
        x, kernel, bias, _ = _inputs(shape[0], shape[1:], 3, 2, 3)
        assert jax.default_backend() == "cpu"
        np.testing.assert_array_equal(conv3d_same(x, kernel, bias), conv3d_same(x, kernel, bias, impl=expected))


def test_module_implementations_share_parameters():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 4, 6, 3)), jnp.float32)
    params = Conv3d(6, impl="lax").init(jax.random.key(0), x)
    a = Conv3d(6, impl="lax").apply(params, x)
    for impl in CONV_IMPL_CHOICES:
        b = Conv3d(6, impl=impl).apply(params, x)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
