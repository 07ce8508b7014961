"""No-reference sharpness metrics of 2D images: PSI and LPC-SI (higher = sharper).

Both are written from their papers' descriptions; the parameter defaults are
the published ones and are listed in each docstring. Use
:func:`arssr_jax.metrics.slicewise` to score a 3D volume slice by slice.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from arssr_jax.errors import ArSSRError
from arssr_jax.metrics._validation import as_image, check_data_range

__all__ = ["psi", "lpc_si"]


# --------------------------------------------------------------------------- PSI


def _sobel_edges(img: np.ndarray) -> np.ndarray:
    """Thin Sobel edges: squared gradient magnitude above 4x its image mean, kept
    only where it is a local maximum along the dominant gradient axis."""
    gx = ndimage.sobel(img, axis=1, mode="nearest")
    gy = ndimage.sobel(img, axis=0, mode="nearest")
    mag2 = gx * gx + gy * gy
    cutoff = 4.0 * mag2.mean()
    if cutoff <= 0:
        return np.zeros(img.shape, dtype=bool)
    p = np.pad(mag2, 1, mode="edge")
    up, down = p[:-2, 1:-1], p[2:, 1:-1]
    left, right = p[1:-1, :-2], p[1:-1, 2:]
    ax, ay = np.abs(gx), np.abs(gy)
    along_x = (ax >= ay) & (left < mag2) & (right <= mag2)
    along_y = (ay >= ax) & (up < mag2) & (down <= mag2)
    edges = (mag2 > cutoff) & (along_x | along_y)
    edges[0, :] = edges[-1, :] = False
    edges[:, 0] = edges[:, -1] = False
    return edges


def _monotone_run(img: np.ndarray, axis: int, step: int, increasing: bool):
    """For each pixel, how many steps (in direction ``step`` = +1/-1 along ``axis``)
    the intensity keeps strictly increasing (or decreasing), i.e. the distance to
    the local extremum; ``valid`` is False where that run reaches the image border."""
    a = np.moveaxis(img, axis, 0)
    if step > 0:
        a = a[::-1]
    # In ``a`` the trace moves towards index 0. From index i the trace continues
    # to i-1 iff a[i-1] > a[i] (increasing) / a[i-1] < a[i] (decreasing).
    diff = a[:-1] - a[1:]
    cont = diff > 0 if increasing else diff < 0
    stop = np.empty(a.shape, dtype=bool)
    stop[0] = True  # index 0 is the border: a trace that gets there is invalid
    stop[1:] = ~cont
    idx = np.arange(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
    last_stop = np.maximum.accumulate(np.where(stop, idx, 0), axis=0)
    length = idx - last_stop
    valid = last_stop >= 1
    if step > 0:
        length, valid = length[::-1], valid[::-1]
    return np.moveaxis(length, 0, axis), np.moveaxis(valid, 0, axis)


def _edge_widths(img: np.ndarray, angle_tolerance: float, w_jnb: float) -> np.ndarray:
    """Perceptually corrected edge width at every usable edge pixel (0 elsewhere)."""
    edges = _sobel_edges(img)
    gy, gx = np.gradient(img)  # central differences, one-sided at the border
    phi = np.degrees(np.arctan2(gy, gx))
    has_grad = (gx != 0) | (gy != 0)
    widths = np.zeros(img.shape)
    rows, cols = np.indices(img.shape)
    coords = (rows, cols)
    runs = {}
    # (trace axis, gradient sign along it, gradient angle of that case in degrees)
    for axis, sign, centre in ((0, 1, 90.0), (0, -1, -90.0), (1, 1, 0.0), (1, -1, 180.0)):
        dev = (phi - centre + 180.0) % 360.0 - 180.0
        sel = edges & has_grad & (np.abs(dev) < angle_tolerance)
        if not sel.any():
            continue
        for key in ((axis, sign, True), (axis, -sign, False)):
            if key not in runs:
                runs[key] = _monotone_run(img, *key)
        up_len, up_ok = runs[(axis, sign, True)]  # towards the local maximum
        dn_len, dn_ok = runs[(axis, -sign, False)]  # towards the local minimum
        sel &= up_ok & dn_ok
        if not sel.any():
            continue
        r, c = rows[sel], cols[sel]
        pos = coords[axis][sel]
        hi_pos = pos + sign * up_len[sel]
        lo_pos = pos - sign * dn_len[sel]
        hi = img[(hi_pos, c)] if axis == 0 else img[(r, hi_pos)]
        lo = img[(lo_pos, c)] if axis == 0 else img[(r, lo_pos)]
        w = (up_len[sel] + dn_len[sel]) / np.cos(np.radians(dev[sel]))
        slope = np.divide(hi - lo, w, out=np.zeros_like(w), where=w > 0)
        w = np.where(w >= w_jnb, w - slope, w)
        widths[sel] = w
    return widths


def psi(image, *, block_size: int = 32, percentile: float = 22.0, angle_tolerance: float = 8.0,
        w_jnb: float = 3.0, threshold_w: float = 2.0, data_range=None) -> float:
    """Perceptual Sharpness Index of a 2D image (Feichtenhofer, Fassold & Schallauer,
    IEEE Signal Processing Letters 20(4), 2013). Higher = sharper; 0 when no edge
    block qualifies (e.g. a constant image).

    Steps and defaults:

    1. Intensities are scaled to [0, 1] by ``data_range`` (default: the image's own
       ``max - min``), as the paper works on 8-bit images divided by 255.
    2. Edges: Sobel gradient magnitude, threshold at squared magnitude > 4 x its
       image mean (the usual automatic Sobel threshold), thinned to one pixel by
       non-maximum suppression along the dominant gradient axis.
    3. Edge width, measured along the gradient direction: for edge pixels whose
       gradient angle (central differences) is within ``angle_tolerance`` = 8
       degrees of vertical or horizontal, trace the intensity profile along that
       axis to the local maximum (uphill) and local minimum (downhill); width =
       the summed distances / cos(angle deviation). Traces that run into the
       image border are discarded. Both horizontal and vertical edges are used.
    4. Just-noticeable-blur correction: widths ``w >= w_jnb`` (3 pixels) become
       ``w - (I_max - I_min) / w`` (the edge slope is subtracted).
    5. Blocks of ``block_size`` x ``block_size`` (32 x 32; partial blocks at the
       bottom/right are dropped): a block counts if its width sum is
       >= ``threshold_w`` (2); its value is the mean non-zero width.
    6. Pooling: the ``percentile`` = 22 % of counted blocks with the smallest
       mean widths (the sharpest) are averaged; PSI = 1 / that average.

    A perfect one-pixel step edge therefore scores 1.0.
    """
    img = as_image(image, "image", ndims=(2,))
    if img.shape[0] < block_size or img.shape[1] < block_size:
        raise ArSSRError(
            f"image shape {img.shape} is smaller than one {block_size}x{block_size} PSI block; "
            "pass a larger slice or a smaller block_size."
        )
    if not 0 < percentile <= 100:
        raise ArSSRError(f"percentile={percentile!r} must be in (0, 100]; the default is 22.")
    rng = float(img.max() - img.min()) if data_range is None else check_data_range(data_range)
    if rng == 0:
        return 0.0
    img = (img - img.min()) / rng

    widths = _edge_widths(img, angle_tolerance, w_jnb)
    nr, nc = img.shape[0] // block_size, img.shape[1] // block_size
    blocks = widths[: nr * block_size, : nc * block_size].reshape(nr, block_size, nc, block_size)
    w_sum = blocks.sum(axis=(1, 3))
    count = (blocks != 0).sum(axis=(1, 3))
    use = (w_sum >= threshold_w) & (count > 0)
    if not use.any():
        return 0.0
    block_width = np.sort(w_sum[use] / count[use])
    n_used = max(1, math.ceil(round(block_width.size * percentile / 100.0, 9)))
    return float(n_used / block_width[:n_used].sum())


# ------------------------------------------------------------------------ LPC-SI


def _log_gabor_bank(shape, scales, n_orient, min_wavelength, sigma_on_f, d_theta_on_sigma):
    """Radial (per scale) and angular (per orientation) log-Gabor transfer functions
    on the unshifted FFT grid."""
    rows, cols = shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.fftfreq(cols)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0  # avoid log(0); the DC term is zeroed below
    theta = np.arctan2(-fy, fx)
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)  # Butterworth, cut-off 0.45, order 15
    radial = []
    for s in scales:
        f0 = 1.0 / (min_wavelength * s)
        g = np.exp(-(np.log(radius / f0) ** 2) / (2.0 * np.log(sigma_on_f) ** 2)) * lowpass
        g[0, 0] = 0.0
        radial.append(g)
    theta_sigma = np.pi / n_orient / d_theta_on_sigma
    angular = []
    for o in range(n_orient):
        angle = o * np.pi / n_orient
        dtheta = np.abs(np.arctan2(np.sin(theta - angle), np.cos(theta - angle)))
        angular.append(np.exp(-(dtheta ** 2) / (2.0 * theta_sigma ** 2)))
    return np.stack(radial), np.stack(angular)


def lpc_si(image, *, scales=(1.0, 1.5, 2.0), weights=(1.0, -3.0, 2.0), n_orient: int = 8,
           c: float = 2.0, beta_k: float = 1e-4, border=None, data_range=None,
           min_wavelength: float = 4.0, sigma_on_f: float = 0.75,
           d_theta_on_sigma: float = 1.5) -> float:
    """Local Phase Coherence Sharpness Index of a 2D image (Hassen, Wang & Salama,
    IEEE Trans. Image Processing 22(7), 2013). In [0, 1]; higher = sharper.

    Steps and defaults:

    1. Intensities are scaled so ``data_range`` (default: the image's own
       ``max - min``) spans 255, the 8-bit scale the constant ``c`` assumes.
    2. Complex log-Gabor filter bank applied with numpy FFTs: ``n_orient`` = 8
       orientations (k*pi/8), 3 scales with ratios s1, s2, s3 = 1, 3/2, 2
       (wavelengths 4, 6, 8 px: ``min_wavelength`` = 4), radial bandwidth
       ``sigma_on_f`` = 0.75, angular std pi/8/1.5, times a Butterworth low-pass
       (cut-off 0.45 cycles/px, order 15).
    3. LPC per orientation: ``cos(sum_s w_s * phase_s)`` with ``weights`` w =
       (1, -3, 2) (the values for s = 1, 3/2, 2); negative values set to 0.
    4. Orientation pooling weighted by the finest-scale magnitude with a noise
       threshold ``T = mean + 2 std`` (over the interior) subtracted:
       ``LPC = sum_j e_j * LPC_j / (sum_j e_j + c)``, ``c`` = 2.
    5. Spatial pooling on the interior (``border`` = round(min(rows, cols) / 16)
       pixels cropped per side): LPC values sorted in descending order,
       weights ``u_k = exp(-((k - 1) / (K - 1)) / beta_k)``, ``beta_k`` = 1e-4;
       LPC-SI = sum(u_k * LPC_(k)) / sum(u_k).

    A constant image scores 0.
    """
    img = as_image(image, "image", ndims=(2,))
    if min(img.shape) < 8:
        raise ArSSRError(f"image shape {img.shape} is too small for LPC-SI; pass a slice of at least 8x8 pixels.")
    if len(scales) != len(weights) or len(scales) < 2:
        raise ArSSRError("scales and weights must have the same length (>= 2); the defaults are (1, 1.5, 2) and (1, -3, 2).")
    rng = float(img.max() - img.min()) if data_range is None else check_data_range(data_range)
    if rng == 0:
        return 0.0
    img = img * (255.0 / rng)
    rows, cols = img.shape
    b = int(math.floor(min(rows, cols) / 16.0 + 0.5)) if border is None else int(border)
    if b < 0 or rows - 2 * b < 2 or cols - 2 * b < 2:
        raise ArSSRError(f"border={border!r} leaves no interior in a {rows}x{cols} image; use a smaller border.")
    inner = (slice(b, rows - b), slice(b, cols - b))

    radial, angular = _log_gabor_bank(img.shape, scales, n_orient, min_wavelength, sigma_on_f,
                                      d_theta_on_sigma)
    spectrum = np.fft.fft2(img)
    w = np.asarray(weights, dtype=np.float64)
    num = np.zeros(img.shape)
    den = np.zeros(img.shape)
    for o in range(n_orient):
        resp = np.fft.ifft2(spectrum[None] * radial * angular[o][None], axes=(-2, -1))
        phase = np.tensordot(w, np.angle(resp), axes=(0, 0))
        lpc = np.maximum(np.cos(phase), 0.0)
        energy = np.abs(resp[0])
        e_in = energy[inner]
        thresh = e_in.mean() + 2.0 * e_in.std(ddof=1)
        energy = np.maximum(energy - thresh, 0.0)
        num += energy * lpc
        den += energy
    lpc_map = num / (den + c)

    values = np.sort(lpc_map[inner].ravel())[::-1]
    k = np.arange(values.size, dtype=np.float64)
    u = np.exp(-(k / (values.size - 1)) / beta_k)
    return float(np.sum(u * values) / np.sum(u))
