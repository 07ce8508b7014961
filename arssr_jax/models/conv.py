"""A 3D "same" convolution with bias, channels-last: the one conv every model uses.

Three formulations compute the same cross-correlation (equal within float32 rounding,
forward and backward: tests/test_conv.py):

- ``"lax"``: one ``lax.conv_general_dilated`` over (N, X, Y, Z, C); what GPUs and TPUs
  run best.
- ``"fold2d"``: the first spatial axis folded into the batch and the k^3 kernel split
  into its k depth taps: k 2D convolutions over depth-shifted slices, summed, because
  XLA's CPU backend runs 2D convolutions (and their input gradients) much faster than
  the same work as one 3D convolution. A custom VJP keeps the backward pass in this
  form: the input gradient is the same folded convolution with the flipped, transposed
  kernel; the kernel gradient is the 2D kernel-gradient convolution of each depth tap,
  over batch chunks of about ``_KERNEL_GRAD_CHUNK_VOXELS`` voxels (XLA's CPU
  kernel-gradient convolution slows down sharply on larger inputs).
- ``"winograd"``: Winograd F(m0 x m1 x m2, 3x3x3), for the fewest multiplications per
  output (4.5 instead of the direct 27 with 4 x 4 x 2 tiles). Per axis, F(m, 3) turns
  an (m + 2)-voxel input tile into m outputs with m + 2 products; m is 4 on up to two
  axes whose length it pads no more than m = 2 does, else 2 (F(4, 3) on all three axes
  rounds about 3x worse). Tiles and kernel are transformed one axis at a time,
  multiplied as one channel matrix product per transformed position, and transformed
  back, in float32 whatever ``dtype`` (bfloat16 tiles double the error). The
  transformed input is several times the input, so the volume goes through in slabs
  of at most about ``_WINOGRAD_SLAB_BYTES`` of transformed data (cache-sized
  temporaries), laid out by :class:`WinogradLayout`. The custom VJP stays in this
  form: the input gradient is the same convolution of the output gradient with the
  flipped, transposed kernel, the kernel gradient a sum of products over the slabs.

Off ``"lax"``, a 1x1x1 kernel is a plain matrix product, and ``"winograd"`` runs other
kernel sizes as ``"fold2d"``: ``_FORMULATIONS`` is the one table of what runs. The
choice is explicit (``ModelConfig.conv_impl`` -> the encoders -> ``Conv3d(impl=...)``);
``"auto"`` is resolved by :func:`resolve_conv_impl` alone: ``"winograd"`` on the CPU
backend for inputs of at least ``WINOGRAD_MIN_VOXELS`` voxels, ``"lax"`` elsewhere.
Measured speeds: README, "Performance" (printed by eval/benchmark_conv.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("lax", "fold2d", "winograd")
CONV_IMPL_CHOICES = ("auto", *CONV_IMPLS)
_DIMENSIONS = ("NDHWC", "DHWIO", "NDHWC")
_DIMENSIONS_2D = ("NHWC", "HWIO", "NHWC")
_KERNEL_GRAD_CHUNK_VOXELS = 4096
_MAX_UNROLLED_CHUNKS = 64  # XLA's CPU conv inside lax.scan runs ~10-40x slower: unroll
_WINOGRAD_SLAB_BYTES = 32 << 20
# Below this many input voxels Winograd's traced program (~160 operations a conv against
# one) costs more to trace than it saves in running: an 8^3 upsample traces the encoder
# in 0.26 s with lax against 0.82 s (whole process 1.7 against 2.2 s); the two break
# even between 24^3 and 32^3 whole volumes. Training batches (12 x 10^3) stay Winograd.
WINOGRAD_MIN_VOXELS = 16**3


def resolve_conv_impl(impl: str = "auto", backend: str | None = None, voxels: int | None = None) -> str:
    """The formulation ``impl`` names; ``"auto"``: ``"winograd"`` on the CPU backend
    (``backend``, default JAX's default backend) for inputs of at least
    ``WINOGRAD_MIN_VOXELS`` voxels (``voxels``: N x X x Y x Z; None counts as large),
    ``"lax"`` on any other backend and for smaller inputs."""
    if not isinstance(impl, str) or impl not in CONV_IMPL_CHOICES:
        raise ValueError(f"conv implementation must be one of {', '.join(CONV_IMPL_CHOICES)}; got {impl!r}")
    if impl == "auto":
        large = voxels is None or voxels >= WINOGRAD_MIN_VOXELS
        return "winograd" if (backend or jax.default_backend()) == "cpu" and large else "lax"
    return impl


def _same_pads(k: int) -> tuple[int, int]:
    """lax's "SAME" padding for stride 1: (k - 1) // 2 before, k // 2 after."""
    return (k - 1) // 2, k // 2


def _conv_lax(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1, 1), padding="SAME", dimension_numbers=_DIMENSIONS,
        preferred_element_type=jnp.float32,
    )


def _conv2d(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME", dimension_numbers=_DIMENSIONS_2D,
        preferred_element_type=jnp.float32,
    )


def _depth_slices(x, k):
    """The k depth-shifted copies of x (zero padded), each folded to (N * X, Y, Z, C)."""
    n, d, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), _same_pads(k), (0, 0), (0, 0), (0, 0)))
    return [xp[:, t:t + d].reshape(n * d, h, w, c) for t in range(k)]


def _fold2d_forward(x, kernel):
    n, d, h, w, _ = x.shape
    k = kernel.shape[0]
    out = None
    for tap, xs in zip(range(k), _depth_slices(x, k)):
        y = _conv2d(xs, kernel[tap])
        out = y if out is None else out + y
    return out.reshape(n, d, h, w, kernel.shape[-1])


def _kernel_grad_2d(xs, gs, kernel_shape):
    """d(sum(conv2d(xs, w) * gs)) / dw, float32 (XLA's own kernel-gradient convolution)."""
    _, vjp = jax.vjp(lambda w: _conv2d(xs, w), jnp.zeros(kernel_shape, xs.dtype))
    return vjp(gs.astype(jnp.float32))[0].astype(jnp.float32)


def _chunked_kernel_grad_2d(xs, gs, kernel_shape):
    """_kernel_grad_2d summed over batch chunks of about _KERNEL_GRAD_CHUNK_VOXELS voxels."""
    b, h, w = xs.shape[:3]
    per = max(1, _KERNEL_GRAD_CHUNK_VOXELS // (h * w))
    chunks = -(-b // per)
    if chunks <= _MAX_UNROLLED_CHUNKS:
        total = None
        for s in range(0, b, per):
            part = _kernel_grad_2d(xs[s:s + per], gs[s:s + per], kernel_shape)
            total = part if total is None else total + part
        return total
    pad = chunks * per - b  # zero slices add nothing to the gradient
    xs = jnp.pad(xs, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(chunks, per, *xs.shape[1:])
    gs = jnp.pad(gs, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(chunks, per, *gs.shape[1:])

    def body(total, chunk):
        return total + _kernel_grad_2d(chunk[0], chunk[1], kernel_shape), None

    total, _ = jax.lax.scan(body, jnp.zeros(kernel_shape, jnp.float32), (xs, gs))
    return total


@jax.custom_vjp
def _fold2d(x, kernel):
    return _fold2d_forward(x, kernel)


def _fold2d_fwd(x, kernel):
    return _fold2d_forward(x, kernel), (x, kernel)


def _fold2d_bwd(residuals, g):
    x, kernel = residuals
    k = kernel.shape[0]
    n, d, h, w, _ = x.shape
    gc = g.astype(x.dtype)
    # Input gradient: the correlation of g with the flipped kernel, in/out swapped.
    # For even k the "SAME" padding is asymmetric; flipping swaps its two sides.
    flipped = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
    if k % 2:
        dx = _fold2d_forward(gc, flipped)
    else:
        dx = jax.vjp(lambda v: _conv_lax(v, kernel), x)[1](g)[0]
    # Kernel gradient, per depth tap: a 2D kernel gradient over the folded batch.
    gs = gc.reshape(n * d, h, w, g.shape[-1])
    tap_shape = kernel.shape[1:]
    dk = jnp.stack([_chunked_kernel_grad_2d(xs, gs, tap_shape) for xs in _depth_slices(x, k)])
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_fold2d.defvjp(_fold2d_fwd, _fold2d_bwd)


# Winograd F(m, 3) per axis: y = A^T [(G g) * (B^T d)] for an (m + 2)-tap input tile d.
# Interpolation points (and infinity): F(2, 3) is exact in its transforms; for F(4, 3) the
# asymmetric set {0, 1, -1, 2, -1/2} rounds ~3x less than the usual {0, +-1, +-2}.
_WINOGRAD_POINTS = {2: (0, 1, -1), 4: (0, 1, -1, 2, Fraction(-1, 2))}
_WINOGRAD_WIDE_AXES = 2  # F(4, 3) on at most two axes: on all three the error is 3x larger (6e-6..8e-6)


def _vandermonde(points, columns):
    """Rows [1, p, ..., p^(columns - 1)] for each point, then [0, ..., 0, 1] for infinity."""
    rows = [[Fraction(p) ** k for k in range(columns)] for p in points]
    return rows + [[Fraction(0)] * (columns - 1) + [Fraction(1)]]


def _inverse(matrix):
    """Exact inverse of a square matrix of Fractions (Gauss-Jordan)."""
    n = len(matrix)
    rows = [list(r) + [Fraction(int(i == j)) for j in range(n)] for i, r in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [a - rows[r][col] * b for a, b in zip(rows[r], rows[col])]
    return [r[n:] for r in rows]


@functools.lru_cache(maxsize=None)
def _winograd_matrices(m: int):
    """(B^T, G, A^T) of F(m, 3) as float64 arrays, built exactly from the points.

    Correlation is the transpose of polynomial multiplication: evaluate at the points
    (A^T = V_m^T, G = V_3), multiply, interpolate (B^T = V^-T). Each row of B^T is
    scaled to the smallest integers (its factor moved into G) so the input transform
    rounds only in its sums.
    """
    points = _WINOGRAD_POINTS[m]
    bt = [list(col) for col in zip(*_inverse(_vandermonde(points, m + 2)))]
    g = _vandermonde(points, 3)
    for j, row in enumerate(bt):
        scale = math.lcm(*(v.denominator for v in row)) / Fraction(math.gcd(*(v.numerator for v in row)))
        bt[j] = [v * scale for v in row]
        g[j] = [v / scale for v in g[j]]
    at = [list(col) for col in zip(*_vandermonde(points, m))]
    return tuple(np.array(a, np.float64) for a in (bt, g, at))


def _winograd_tile_sizes(spatial) -> tuple[int, ...]:
    """Output tile size per axis: 4 on the first two axes where it pads no more than 2 does, else 2.

    F(4, 3) needs 6 transformed taps per 4 outputs where F(2, 3) needs 4 per 2: 1.33x
    fewer products and transformed data per axis (1.78x for a 4 x 4 x 2 tile).
    """
    sizes, wide = [], 0
    for s in spatial:
        four = wide < _WINOGRAD_WIDE_AXES and -(-s // 4) * 4 == -(-s // 2) * 2
        sizes.append(4 if four else 2)
        wide += four
    return tuple(sizes)


def _weighted_sum(coefs, parts):
    """sum(c * p) over the nonzero coefficients (no multiply for +-1)."""
    out = None
    for c, p in zip(coefs, parts):
        if c:
            term = p if c == 1 else -p if c == -1 else p * np.float32(c)
            out = term if out is None else out + term
    return out if out is not None else jnp.zeros_like(parts[0])


def _winograd_input(xs, tiles, sizes):
    """(nb, m0 a + 2, m1 b + 2, m2 c + 2, C) float32 -> (P, nb*a*b*c, C): B^T d B per axis.

    P = prod(m + 2). One axis at a time (m + 2 strided slices and as many weighted sums),
    so XLA emits three cheap elementwise passes rather than P-term sums.
    """
    v = xs
    for i, (t, m) in enumerate(zip(tiles, sizes)):
        axis = 2 * i + 1  # i component axes in front, then the batch, then spatial axis i
        parts = [jax.lax.slice_in_dim(v, j, j + m * (t - 1) + 1, stride=m, axis=axis) for j in range(m + 2)]
        v = jnp.stack([_weighted_sum(row, parts) for row in _winograd_matrices(m)[0]], axis=i)
    return v.reshape(-1, math.prod(v.shape[3:-1]), xs.shape[-1])


def _winograd_output(mm, nb, tiles, sizes):
    """(P, nb*a*b*c, Co) -> (nb, m0 a, m1 b, m2 c, Co): A^T m A per axis."""
    y = mm.reshape(*(m + 2 for m in sizes), nb, *tiles, mm.shape[-1])
    for i, m in enumerate(sizes):
        parts = [jax.lax.index_in_dim(y, j, axis=i, keepdims=False) for j in range(m + 2)]
        y = jnp.stack([_weighted_sum(row, parts) for row in _winograd_matrices(m)[2]], axis=i)
    y = y.transpose(3, 4, 0, 5, 1, 6, 2, 7)  # (nb, a, m0, b, m1, c, m2, Co)
    return y.reshape(nb, *(m * t for m, t in zip(sizes, tiles)), mm.shape[-1])


def _winograd_output_adjoint(g, tiles, sizes):
    """The transpose of _winograd_output: (nb, m0 a, m1 b, m2 c, Co) -> (P, nb*a*b*c, Co)."""
    nb, co = g.shape[0], g.shape[-1]
    (a, b, c), (m0, m1, m2) = tiles, sizes
    y = g.reshape(nb, a, m0, b, m1, c, m2, co).transpose(2, 4, 6, 0, 1, 3, 5, 7)
    for i, m in enumerate(sizes):
        at = _winograd_matrices(m)[2]
        parts = [jax.lax.index_in_dim(y, r, axis=i, keepdims=False) for r in range(m)]
        y = jnp.stack([_weighted_sum(at[:, j], parts) for j in range(m + 2)], axis=i)
    return y.reshape(-1, nb * a * b * c, co)


def _kernel_transforms(sizes):
    """The G matrix of each axis's F(m, 3), float32."""
    return [jnp.asarray(_winograd_matrices(m)[1], jnp.float32) for m in sizes]


def _winograd_kernel(kernel, sizes):
    """(3, 3, 3, Ci, Co) -> (P, Ci, Co) float32: G g G^T per axis."""
    u = jnp.einsum("ai,bj,ck,ijkxy->abcxy", *_kernel_transforms(sizes), kernel.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return u.reshape(-1, *kernel.shape[3:])


@dataclasses.dataclass(frozen=True)
class WinogradLayout:
    """How the Winograd convolution walks a volume (all static, from the shapes).

    ``sizes``: the output tile size m per spatial axis; ``tiles``: tiles per slab along
    each spatial axis; ``slab``: (batch items, depth tiles, height tiles) per slab (a
    slab spans the width); ``counts``: slabs along the batch, depth and height;
    ``size``: the padded output size (whole slabs); ``extent``: a slab's spatial output
    extent (its input extent is 2 more per axis).
    """

    sizes: tuple
    tiles: tuple
    slab: tuple
    counts: tuple
    size: tuple
    extent: tuple

    @property
    def positions(self) -> int:
        """Transformed positions of a tile: prod(m + 2)."""
        return math.prod(m + 2 for m in self.sizes)

    @property
    def count(self) -> int:
        return math.prod(self.counts)

    def start(self, i):
        """(batch, x, y, 0, 0) where slab ``i`` begins in the padded input and output."""
        (_, depth, height), (nb, sd, sh) = self.counts, self.slab
        b, z, y = i // (depth * height), (i // height) % depth, i % height
        return (b * nb, z * self.sizes[0] * sd, y * self.sizes[1] * sh, 0, 0)


def _winograd_layout(shape, cout) -> WinogradLayout:
    """The layout for input ``shape`` (N, X, Y, Z, Cin) and ``cout`` output channels.

    A slab holds at most about _WINOGRAD_SLAB_BYTES of transformed input and product
    (P * (Ci + Co) floats a tile): whole samples if they fit, else depth, then height
    slices of one sample (balanced, so the last slab pads least).
    """
    n, d, h, w, cin = shape
    sizes = _winograd_tile_sizes((d, h, w))
    td, th, tw = (-(-s // m) for s, m in zip((d, h, w), sizes))
    positions = math.prod(m + 2 for m in sizes)
    fit = max(1, _WINOGRAD_SLAB_BYTES // (positions * (cin + cout) * 4))
    balanced = lambda total, most: -(-total // -(-total // max(1, most)))
    if fit >= td * th * tw:
        nb = max(k for k in range(1, n + 1) if n % k == 0 and k <= max(1, fit // (td * th * tw)))
        slab = (nb, td, th)
    elif fit >= th * tw:
        slab = (1, balanced(td, fit // (th * tw)), th)
    else:
        slab = (1, 1, balanced(th, fit // tw))
    _, sd, sh = slab
    counts = (n // slab[0], -(-td // sd), -(-th // sh))
    size = (sizes[0] * sd * counts[1], sizes[1] * sh * counts[2], sizes[2] * tw)
    extent = (sizes[0] * sd, sizes[1] * sh, size[2])
    return WinogradLayout(sizes, (sd, sh, tw), slab, counts, size, extent)


def _over_slabs(layout: WinogradLayout, step, init):
    """``carry = step(carry, start)`` for each slab in turn, ``start`` where it begins
    (:meth:`WinogradLayout.start`); a lone slab is one call, no loop."""
    if layout.count == 1:
        return step(init, (0, 0, 0, 0, 0))
    return jax.lax.fori_loop(0, layout.count, lambda i, carry: step(carry, layout.start(i)), init)


def _window(a, start, shape):
    """The window of ``a`` of ``shape`` at ``start``: ``a`` itself when it is all of it."""
    return a if a.shape == tuple(shape) else jax.lax.dynamic_slice(a, start, shape)


def _pad_to(x, size, halo):
    """Zero-pad the spatial axes of x to ``size`` plus ``halo`` voxels on each side."""
    return jnp.pad(x, ((0, 0), *((halo, p + halo - s) for p, s in zip(size, x.shape[1:4])), (0, 0)))


def _slab_input(layout: WinogradLayout, cin):
    """The shape of a slab's input window (2 more than its output per spatial axis)."""
    return (layout.slab[0], *(e + 2 for e in layout.extent), cin)


def _winograd_forward(x, kernel):
    n, d, h, w, cin = x.shape
    cout = kernel.shape[-1]
    layout = _winograd_layout(x.shape, cout)
    xp = _pad_to(x, layout.size, 1)
    u = _winograd_kernel(kernel, layout.sizes)

    def step(y, start):
        xs = _window(xp, start, _slab_input(layout, cin))
        v = _winograd_input(xs.astype(jnp.float32), layout.tiles, layout.sizes)
        m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
        part = _winograd_output(m, xs.shape[0], layout.tiles, layout.sizes)
        return part if part.shape == y.shape else jax.lax.dynamic_update_slice(y, part, start)

    y = _over_slabs(layout, step, jnp.zeros((n, *layout.size, cout), jnp.float32))
    return y[:, :d, :h, :w] if layout.size != (d, h, w) else y


def _winograd_kernel_grad(x, g, kernel_shape):
    """d(sum(winograd(x, k) * g)) / dk: sum over slabs of V^T (A-adjoint of g), then G^T . G."""
    cin, cout = x.shape[-1], kernel_shape[-1]
    layout = _winograd_layout(x.shape, cout)
    xp, gp = _pad_to(x, layout.size, 1), _pad_to(g, layout.size, 0)

    def step(du, start):
        xs = _window(xp, start, _slab_input(layout, cin))
        gs = _window(gp, start, (layout.slab[0], *layout.extent, cout))
        v = _winograd_input(xs.astype(jnp.float32), layout.tiles, layout.sizes)
        dm = _winograd_output_adjoint(gs.astype(jnp.float32), layout.tiles, layout.sizes)
        return du + jax.lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)

    du = _over_slabs(layout, step, jnp.zeros((layout.positions, cin, cout), jnp.float32))
    du = du.reshape(*(m + 2 for m in layout.sizes), cin, cout)
    return jnp.einsum("ai,bj,ck,abcxy->ijkxy", *_kernel_transforms(layout.sizes), du,
                      precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _winograd(x, kernel):
    return _winograd_forward(x, kernel)


def _winograd_fwd(x, kernel):
    return _winograd_forward(x, kernel), (x, kernel)


def _winograd_bwd(residuals, g):
    x, kernel = residuals
    gc = g.astype(x.dtype)
    dx = _winograd_forward(gc, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4))
    dk = _winograd_kernel_grad(x, gc, kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def _pointwise(x, kernel):
    """A 1x1x1 kernel: one matrix product over the channels."""
    return jnp.dot(x, kernel[0, 0, 0], preferred_element_type=jnp.float32)


# The one selection table: formulation -> {kernel shape: function}, None for any other shape.
# Off lax a 1x1x1 kernel is a matrix product; Winograd covers 3x3x3, fold2d the rest.
_FOLDED = {(1, 1, 1): _pointwise, None: _fold2d}
_FORMULATIONS = {
    "lax": {None: _conv_lax},
    "fold2d": _FOLDED,
    "winograd": {**_FOLDED, (3, 3, 3): _winograd},
}


def conv3d_same(x, kernel, bias, dtype=jnp.float32, impl: str = "auto"):
    """Cross-correlation of x (N, X, Y, Z, Cin) with kernel (k, k, k, Cin, Cout), zero 'same' padding.

    Products in ``dtype`` (``"winograd"``: float32), sums and result float32. ``impl``:
    "auto", "lax", "fold2d" or "winograd" (see the module docstring); every choice
    gives the same result within float32 rounding.
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    by_shape = _FORMULATIONS[resolve_conv_impl(impl, voxels=math.prod(x.shape[:-1]))]
    y = by_shape.get(tuple(kernel.shape[:3]), by_shape[None])(x, kernel)
    return y + bias.astype(jnp.float32)


class Conv3d(nn.Module):
    """kernel^3 convolution, stride 1, zero padding kernel // 2, bias.

    Parameters ``kernel`` (k, k, k, in, out) and ``bias`` (out,) are float32; the
    products run in ``dtype`` (float32 by default, bfloat16 as an option) and
    accumulate in float32. ``impl`` chooses the formulation ("auto": by backend and
    input size); it changes no parameter.
    """

    features: int
    kernel: int = 3
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel,) * 3 + (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return conv3d_same(x, kernel, bias, self.dtype, self.impl)
