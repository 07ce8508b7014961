"""No-reference sharpness metrics of 2D images: PSI and LPC-SI (higher = sharper).

Both equal their authors' MATLAB code as MATLAB runs it (``PSI.m`` of
github.com/feichtenhofer/PSI; ``lpc_si.m`` version 1.0 by Rania Hassen, 2013), to float
rounding; ``tests/test_metrics_golden.py`` holds golden values from those files. Both
take any intensity scale and map ``data_range`` to 255, the 8-bit scale the originals
expect. Use :func:`arssr_jax.metrics.slicewise` to score a 3D volume slice by slice.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics._validation import as_image, check_data_range

__all__ = ["psi", "lpc_si"]

_TIE = 100 * np.finfo(np.float64).eps  # MATLAB edge()'s tolerance when |bx| and |by| tie


def _to_8bit_scale(img: np.ndarray, data_range) -> float:
    """The factor that maps ``data_range`` (default: the image's max - min) to 255; 0 for a
    constant image scored with the default range."""
    rng = float(img.max() - img.min()) if data_range is None else check_data_range(data_range)
    return 0.0 if rng == 0 else 255.0 / rng


# --------------------------------------------------------------------------- PSI


def _sobel_edges(img: np.ndarray) -> np.ndarray:
    """MATLAB's ``edge(img, 'sobel')`` (automatic threshold, thinning).

    bx, by: the image correlated with the Sobel kernels / 8, replicate padding;
    b = bx^2 + by^2, cutoff = 4 mean(b). An edge pixel has b > cutoff and is a local
    maximum of b across the edge: along the row when |bx| >= |by| - 100 eps, with
    b(r, c-1) <= b(r, c) > b(r, c+1); along the column when |by| >= |bx| - 100 eps, with
    b(r-1, c) <= b(r, c) > b(r+1, c); either suffices. A neighbour outside the image passes
    its comparison. (Octave's ``edge`` thins with another rule.)
    """
    p = np.pad(img, 1, mode="edge")
    nw, n, ne = p[:-2, :-2], p[:-2, 1:-1], p[:-2, 2:]
    w, e = p[1:-1, :-2], p[1:-1, 2:]
    sw, s, se = p[2:, :-2], p[2:, 1:-1], p[2:, 2:]
    bx = ((nw - ne) + 2.0 * (w - e) + (sw - se)) / 8.0
    by = ((nw - sw) + 2.0 * (n - s) + (ne - se)) / 8.0
    b = bx * bx + by * by
    cutoff = 4.0 * b.sum() / b.size
    q = np.pad(b, 1, mode="constant", constant_values=-np.inf)
    ax, ay = np.abs(bx), np.abs(by)
    along_row = (ax >= ay - _TIE) & (q[1:-1, :-2] <= b) & (b > q[1:-1, 2:])
    along_col = (ay >= ax - _TIE) & (q[:-2, 1:-1] <= b) & (b > q[2:, 1:-1])
    return (b > cutoff) & (along_row | along_col)


def _vertical_run(img: np.ndarray, down: bool, increasing: bool):
    """For every pixel, how many rows the intensity keeps strictly increasing (or
    decreasing) going up (or ``down``): the distance to the local extremum in that
    direction. ``valid`` is False where the run reaches the first (last) row, as
    ``PSI.m`` then discards the pixel."""
    a = img[::-1] if down else img  # the trace moves towards row 0 of ``a``
    step = a[:-1] - a[1:]  # a[i-1] - a[i]: the change when moving from row i to row i-1
    cont = step > 0 if increasing else step < 0
    stop = np.empty(a.shape, dtype=bool)
    stop[0] = True  # row 0 is the border: a trace that gets there is invalid
    stop[1:] = ~cont
    idx = np.arange(a.shape[0])[:, None]
    last_stop = np.maximum.accumulate(np.where(stop, idx, 0), axis=0)
    length, valid = idx - last_stop, last_stop >= 1
    if down:
        length, valid = length[::-1], valid[::-1]
    return length, valid


def _edge_widths(img: np.ndarray, edges: np.ndarray, angle_tolerance: float, w_jnb: float) -> np.ndarray:
    """PSI.m's corrected width at every edge pixel whose gradient is within
    ``angle_tolerance`` of +-90 degrees (a horizontal edge); 0 elsewhere. ``img`` in [0, 1]."""
    ix = np.empty_like(img)
    iy = np.empty_like(img)
    ix[:, 1:-1] = 0.5 * (img[:, 2:] - img[:, :-2])
    ix[:, 0], ix[:, -1] = img[:, 1] - img[:, 0], img[:, -1] - img[:, -2]
    iy[1:-1] = 0.5 * (img[2:] - img[:-2])
    iy[0], iy[-1] = img[1] - img[0], img[-1] - img[-2]
    phi = np.arctan2(iy, ix) * 180.0 / np.pi
    cand = edges & ((ix != 0) | (iy != 0))
    widths = np.zeros(img.shape)
    # Gradient at -90 deg: the intensity rises upwards (the maximum is up, the minimum down);
    # at +90 deg the other way round. Traces follow strict monotonicity to the extremum.
    for centre, max_is_up in ((-90.0, True), (90.0, False)):
        sel = cand & (np.abs(phi - centre) < angle_tolerance)
        if not sel.any():
            continue
        up_len, up_ok = _vertical_run(img, down=False, increasing=max_is_up)
        dn_len, dn_ok = _vertical_run(img, down=True, increasing=not max_is_up)
        sel &= up_ok & dn_ok
        r, c = np.nonzero(sel)
        if r.size == 0:
            continue
        wu, wd = up_len[r, c], dn_len[r, c]
        top, bottom = img[r - wu, c], img[r + wd, c]
        hi, lo = (top, bottom) if max_is_up else (bottom, top)
        w = (wu + wd) / np.cos((phi[r, c] - centre) * np.pi / 180.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (hi - lo) / w
        widths[r, c] = np.where(w >= w_jnb, w - slope, w)
    return widths


def psi(image, *, block_size: int = 32, percentile: float = 22.0, angle_tolerance: float = 8.0,
        w_jnb: float = 3.0, threshold_w: float = 2.0, data_range=None) -> float:
    """Perceptual Sharpness Index of a 2D image (Feichtenhofer, Fassold & Schallauer,
    IEEE Signal Processing Letters 20(4), 2013), equal to the authors' ``PSI.m``
    (github.com/feichtenhofer/PSI) with MATLAB's ``edge``. Higher = sharper.

    ``psi(x, data_range=r)`` = ``PSI(255 * x / r)`` (default ``r``: the image's own
    ``max - min``). Steps (defaults as in PSI.m):

    1. Edges of the 0-255 image: MATLAB's ``edge(I, 'sobel')`` (see :func:`_sobel_edges`).
    2. On I / 255: gradient by central differences (one-sided on the border), angle
       phi = atan2(Iy, Ix). Only edge pixels with |phi -+ 90| < ``angle_tolerance`` (8 deg;
       horizontal edges) are measured: trace up and down the column to the local maximum
       and minimum (strictly monotone steps); a trace reaching the first or last row drops
       the pixel. Width = (up + down steps) / cos(phi -+ 90).
    3. Just-noticeable-blur correction: widths ``w >= w_jnb`` (3) become
       ``w - (I_max - I_min) / w``.
    4. Blocks of ``block_size`` (32) pixels from the top-left corner; partial blocks and the
       outer ring of whole blocks are left out. A block counts if its width sum is
       >= ``threshold_w`` (2); its value is its mean non-zero width.
    5. The ceil(n x ``percentile`` / 100) (22 %) counted blocks with the smallest values
       are averaged; PSI = 1 / that average.

    0 when no block counts, as PSI.m gives, e.g. for a constant image or one with fewer
    than 3 blocks per side (under 96 x 96 pixels by default). A one-pixel horizontal step
    edge scores 1.0; vertical edges are not measured (as in PSI.m).
    """
    img = as_image(image, "image", ndims=(2,))
    if img.shape[0] < block_size or img.shape[1] < block_size:
        raise ArSSRError(
            f"image shape {img.shape} is smaller than one {block_size}x{block_size} PSI block; "
            "pass a larger slice or a smaller block_size."
        )
    if not 0 < percentile <= 100:
        raise ArSSRError(f"percentile={percentile!r} must be in (0, 100]; the default is 22.")
    factor = _to_8bit_scale(img, data_range)
    nr, nc = img.shape[0] // block_size, img.shape[1] // block_size
    if factor == 0 or nr < 3 or nc < 3:
        return 0.0
    img255 = img * factor
    widths = _edge_widths(img255 / 255.0, _sobel_edges(img255), angle_tolerance, w_jnb)

    inner = widths[block_size:(nr - 1) * block_size, block_size:(nc - 1) * block_size]
    blocks = inner.reshape(nr - 2, block_size, nc - 2, block_size)
    w_sum = blocks.sum(axis=1).sum(axis=-1)
    count = (blocks != 0).sum(axis=(1, 3))
    use = (w_sum >= threshold_w) & (count > 0)
    n_used = math.ceil(int(use.sum()) * (percentile / 100.0))
    if n_used == 0:
        return 0.0
    sharpest = np.sort(w_sum[use] / count[use])[:n_used]
    return float(n_used / sharpest.sum())


# ------------------------------------------------------------------------ LPC-SI


def _kovesi_frequencies(n: int) -> np.ndarray:
    """Kovesi's normalised frequency grid (as in lpc_si.m), in FFT order: k / n for even
    n (numpy's fftfreq) but k / (n - 1) for odd n, so it spans exactly [-0.5, 0.5]."""
    k = np.arange(-(n // 2), n - n // 2, dtype=np.float64)
    return np.fft.ifftshift(k / (n - 1 if n % 2 else n))


@functools.lru_cache(maxsize=4)
def _log_gabor_bank(shape, scales, n_orient, min_wavelength, sigma_on_f, d_theta_on_sigma):
    """lpc_si.m's filters on the unshifted FFT grid: the radial log-Gabor part per scale
    (times a Butterworth low-pass, cut-off 0.45, order 15) and the angular part per
    orientation; filter(s, o) = radial[s] * angular[o]. Cached per shape (read-only)."""
    x = _kovesi_frequencies(shape[1])[None, :]
    y = _kovesi_frequencies(shape[0])[:, None]
    radius = np.sqrt(x ** 2 + y ** 2)
    theta = np.arctan2(-y, x)
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)
    radius[0, 0] = 1.0  # avoid log(0); the DC term is zeroed below
    radial = np.empty((len(scales),) + tuple(shape))
    for i, s in enumerate(scales):
        f0 = 1.0 / (min_wavelength * s)
        radial[i] = np.exp(-(np.log(radius / f0) ** 2) / (2 * np.log(sigma_on_f) ** 2)) * lowpass
        radial[i, 0, 0] = 0.0
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    theta_sigma = np.pi / n_orient / d_theta_on_sigma
    angular = np.empty((n_orient,) + tuple(shape))
    for o in range(n_orient):
        angle = o * np.pi / n_orient
        ds = sin_t * np.cos(angle) - cos_t * np.sin(angle)
        dc = cos_t * np.cos(angle) + sin_t * np.sin(angle)
        angular[o] = np.exp(-(np.abs(np.arctan2(ds, dc)) ** 2) / (2 * theta_sigma ** 2))
    radial.flags.writeable = False
    angular.flags.writeable = False
    return radial, angular


def _phase_coherence(resp: np.ndarray, weights: tuple) -> np.ndarray:
    """cos(angle(prod_s resp_s ** w_s)) = cos(sum_s w_s angle(resp_s)), as lpc_si.m. For
    small integer weights: Re(p) / |p| of p = prod_s resp_s ** w_s, with conj(z) for 1 / z
    (no arctan); pixels where p under- or overflows fall back to the angles."""
    if not all(float(w).is_integer() and abs(w) <= 8 for w in weights):
        return np.cos(np.tensordot(np.asarray(weights, np.float64), np.angle(resp), axes=(0, 0)))
    prod = None
    for z, w in zip(resp, weights):
        if w == 0:
            continue
        z = z if w > 0 else np.conj(z)
        term = z
        for _ in range(int(abs(w)) - 1):
            term = term * z
        prod = term if prod is None else prod * term
    if prod is None:
        return np.ones(resp.shape[1:])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        cos = prod.real / np.abs(prod)
    bad = ~np.isfinite(cos)
    if bad.any():
        cos[bad] = np.cos(np.tensordot(np.asarray(weights, np.float64), np.angle(resp[:, bad]), axes=(0, 0)))
    return cos


def lpc_si(image, *, scales=(1.0, 1.5, 2.0), weights=(1.0, -3.0, 2.0), n_orient: int = 8,
           c: float = 2.0, beta_k: float = 1e-4, border=None, data_range=None,
           min_wavelength: float = 4.0, sigma_on_f: float = 0.75,
           d_theta_on_sigma: float = 1.5) -> float:
    """Local Phase Coherence Sharpness Index of a 2D image (Hassen, Wang & Salama,
    IEEE Trans. Image Processing 22(7), 2013), equal to the authors' ``lpc_si.m``
    version 1.0 (with Kovesi's log-Gabor filters). In [0, 1]; higher = sharper.

    ``lpc_si(x, data_range=r)`` = ``lpc_si.m(255 * x / r)`` (default ``r``: the image's own
    ``max - min``; the original takes 0-255 images, the scale its constant ``c`` assumes).
    Steps (defaults as in lpc_si.m):

    1. Log-Gabor filter bank applied with FFTs (periodic borders): ``n_orient`` = 8
       orientations (k pi / 8), scales ``scales`` = (1, 3/2, 2) times ``min_wavelength``
       = 4 px, radial bandwidth ``sigma_on_f`` = 0.75, angular std pi / 8 / 1.5, times a
       Butterworth low-pass (cut-off 0.45, order 15), on Kovesi's frequency grid (k / n
       for an even side n, k / (n - 1) for an odd one).
    2. LPC per orientation: ``cos(sum_s w_s phase_s)``, ``weights`` w = (1, -3, 2);
       negative values set to 0.
    3. Orientation pooling weighted by the finest-scale magnitude minus ``T = mean + 2 std``
       (over the interior), clipped at 0: ``LPC = sum_o e_o LPC_o / (sum_o e_o + c)``, c = 2.
    4. Spatial pooling on the interior (``border`` = round(min(rows, cols) / 16) pixels
       cropped per side): LPC values sorted in descending order with weights
       ``u_k = exp(-((k - 1) / (K - 1)) / beta_k)``, ``beta_k`` = 1e-4;
       LPC-SI = sum(u_k LPC_(k)) / sum(u_k).

    A constant image scores 0 (lpc_si.m gives NaN there).
    """
    img = as_image(image, "image", ndims=(2,))
    if min(img.shape) < 8:
        raise ArSSRError(f"image shape {img.shape} is too small for LPC-SI; pass a slice of at least 8x8 pixels.")
    if len(scales) != len(weights) or len(scales) < 2:
        raise ArSSRError("scales and weights must have the same length (>= 2); the defaults are (1, 1.5, 2) and (1, -3, 2).")
    factor = _to_8bit_scale(img, data_range)
    if factor == 0:
        return 0.0
    img = img * factor
    rows, cols = img.shape
    b = int(math.floor(min(rows, cols) / 16.0 + 0.5)) if border is None else int(border)
    if b < 0 or rows - 2 * b < 2 or cols - 2 * b < 2:
        raise ArSSRError(f"border={border!r} leaves no interior in a {rows}x{cols} image; use a smaller border.")
    inner = (slice(b, rows - b), slice(b, cols - b))

    radial, angular = _log_gabor_bank(
        img.shape, tuple(float(s) for s in scales), int(n_orient), float(min_wavelength),
        float(sigma_on_f), float(d_theta_on_sigma))
    weights = tuple(float(w) for w in weights)
    spectrum = scipy.fft.fft2(img)
    num = np.zeros(img.shape)
    den = np.zeros(img.shape)
    for o in range(n_orient):
        resp = scipy.fft.ifft2(spectrum[None] * (radial * angular[o]), axes=(-2, -1), overwrite_x=True)
        lpc = np.maximum(_phase_coherence(resp, weights), 0.0)
        energy = np.abs(resp[0])
        e_in = energy[inner]
        thresh = e_in.mean() + 2.0 * e_in.std(ddof=1)
        energy = np.maximum(energy - thresh, 0.0)
        num += lpc * energy
        den += energy
    lpc_map = num / (den + c)

    values = lpc_map[inner].ravel()
    n = values.size
    k = np.arange(n, dtype=np.float64)
    u = np.exp(-(k / (n - 1)) / beta_k)
    used = int(np.count_nonzero(u))  # the weights underflow to 0 after the top ~7.5 %
    top = np.sort(np.partition(values, n - used)[n - used:])[::-1] if used < n else np.sort(values)[::-1]
    return float(np.sum(top * u[:used]) / np.sum(u))
