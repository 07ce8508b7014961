"""One training example from one volume: pure numpy, deterministic given a Generator.

:func:`make_patch` cuts the HR patch and degrades it into the LR patch; an *example
maker* (:class:`ExampleMaker`) turns that draw into the arrays one batch element holds.
The data layer's own is :data:`make_sample` (the LR patch and K points of the HR patch);
a training task may bring another that starts from the same :func:`make_patch` (the
pipeline takes any).

Order of random draws (fixed, so a seed fixes the sample):
  1. the scale(s);  2. the patch position (possibly several tries);
  3. augmentations (only those enabled);  4. the example's own draws (make_sample: the K
  HR coordinates).

Background rule: a candidate HR patch (the first int(lr_size * s) voxels of a
``patch_size`` cube at a random position) is rejected when less than
``min_foreground`` of its voxels exceed ``foreground_threshold``; up to
``max_tries`` positions are tried and, if none passes, the candidate with the
largest foreground fraction is used. The scale is drawn once, before the
positions, so rejection does not bias the scale distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Protocol, Sequence

import numpy as np
from scipy import ndimage

from arssr_jax.coords import index_to_normalised, make_grid
from arssr_jax.data.config import AugmentConfig, DataConfig
from arssr_jax.data.degrade import degrade


def draw_scales(rng: np.random.Generator, config: DataConfig) -> np.ndarray:
    """Per-axis scales (3,), float64; equal on all axes unless ``anisotropic``."""
    count = 3 if config.anisotropic else 1
    if config.rounding == "reference":
        s = np.round(rng.uniform(config.scale_min, config.scale_max + 0.04, size=count), 1)
    else:
        s = rng.uniform(config.scale_min, config.scale_max, size=count)
    return np.broadcast_to(s, (3,)).astype(np.float64)


def hr_shape(lr_size: int, scales) -> tuple:
    """HR patch shape ``int(lr_size * s)`` per axis (the reference's truncation)."""
    return tuple(int(lr_size * float(s)) for s in scales)


def _start_range(n: int, patch: int, margin: int) -> tuple:
    margin_eff = min(margin, (n - patch) // 2)
    return margin_eff, n - margin_eff - patch


def foreground_fraction(region: np.ndarray, threshold: float) -> float:
    return float(np.count_nonzero(region > threshold)) / region.size


def choose_patch_start(volume: np.ndarray, region: Sequence[int], rng: np.random.Generator,
                       config: DataConfig) -> tuple:
    """Start index of a ``patch_size`` cube whose first ``region`` voxels pass the rule."""
    ranges = [_start_range(n, config.patch_size, config.margin) for n in volume.shape]
    tries = config.max_tries if config.min_foreground > 0 else 1
    best, best_fraction = None, -1.0
    for _ in range(tries):
        start = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
        if config.min_foreground <= 0:
            return start
        box = tuple(slice(a, a + r) for a, r in zip(start, region))
        fraction = foreground_fraction(volume[box], config.foreground_threshold)
        if fraction >= config.min_foreground:
            return start
        if fraction > best_fraction:
            best, best_fraction = start, fraction
    return best


def _random_quadratic(shape, rng: np.random.Generator) -> np.ndarray:
    """A random quadratic polynomial of the normalised patch coordinates, no constant term."""
    axes = [index_to_normalised(np.arange(n, dtype=np.float64), n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    return sum(c * t for c, t in zip(rng.uniform(-1.0, 1.0, size=len(terms)), terms))


def mask_cut(hr: np.ndarray, rng: np.random.Generator, ramp: bool = False) -> np.ndarray:
    """``hr`` set to 0 where a random quadratic surface crossing the patch says "outside";
    with ``ramp``, the inside also fades towards the cut (see ``AugmentConfig.mask_ramp``)."""
    f = _random_quadratic(hr.shape, rng)
    level = np.quantile(f, rng.uniform(0.2, 0.8))  # 20-80 % of the patch is cut away
    inside = f > level
    if not ramp:
        return np.where(inside, hr, 0.0)
    floor, width = rng.uniform(0.0, 1.0), rng.uniform(1.0, 6.0)
    distance = ndimage.distance_transform_edt(inside)  # >= 1 inside, 0 outside
    weight = floor + (1.0 - floor) * np.minimum(1.0, (distance - 1.0) / width)
    return np.where(inside, hr * weight, 0.0)


def _bias_field(shape, strength: float, rng: np.random.Generator) -> np.ndarray:
    f = _random_quadratic(shape, rng)
    f = f - f.mean()
    peak = np.abs(f).max()
    if peak > 0:
        f = f * (strength / peak)
    return np.exp(f)


CONTRAST_KNOTS = np.arange(0.0, 1.2, 0.15)


def random_contrast(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``hr`` through a random piecewise-linear intensity curve (held constant past the last knot)."""
    values = rng.uniform(0.0, 1.0, size=len(CONTRAST_KNOTS))
    values[0] = rng.uniform(0.0, 0.1)
    return np.interp(hr, CONTRAST_KNOTS, values)


def rician(hr: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``hr`` plus complex Gaussian noise of standard deviation ``sigma``."""
    real = hr + rng.normal(0.0, sigma, size=hr.shape)
    imaginary = rng.normal(0.0, sigma, size=hr.shape)
    return np.sqrt(real * real + imaginary * imaginary)


def _random_blobs(shape, rng: np.random.Generator, low: float, high: float):
    """1-6 Gaussian blobs at random places (sigma U(0.7, 2.5) voxels), each with an amplitude U(low, high)."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij", sparse=True)
    for _ in range(int(rng.integers(1, 7))):
        centre = rng.uniform(0, np.asarray(shape) - 1)
        sigma, amplitude = rng.uniform(0.7, 2.5), rng.uniform(low, high)
        squared = sum((a - c) ** 2 for a, c in zip(axes, centre))
        yield amplitude * np.exp(-squared / (2 * sigma * sigma))


def bright_spots(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``hr`` plus 1-6 Gaussian blobs (sigma U(0.7, 2.5) voxels, peak U(0.3, 2)) at random places."""
    out = hr.copy()
    for blob in _random_blobs(hr.shape, rng, 0.3, 2.0):
        out = out + blob
    return out


def dark_spots(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``hr`` darkened by 1-6 Gaussian holes (sigma U(0.7, 2.5) voxels, depth U(0.5, 1)):
    x (1 - depth g) per hole, so it stays >= 0 and a full-depth hole reaches 0 at its centre."""
    out = hr.copy()
    for hole in _random_blobs(hr.shape, rng, 0.5, 1.0):
        out = out * (1.0 - hole)
    return out


def augment_hr(hr: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    """Apply the enabled HR augmentations in this order: flip, permute, contrast, gamma,
    scale, bias field, bright spots, dark spots, blur, Rician noise, mask cut."""
    if aug.flip:
        flips = rng.random(3) < 0.5
        hr = hr[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    if aug.permute:
        hr = np.transpose(hr, rng.permutation(3))
    hr = np.ascontiguousarray(hr, dtype=np.float64)
    if aug.contrast and rng.random() < aug.contrast:
        hr = random_contrast(hr, rng)
    if aug.gamma:
        hr = np.clip(hr, 0.0, None) ** np.exp(rng.uniform(-aug.gamma, aug.gamma))
    if aug.intensity_scale:
        hr = hr * rng.uniform(1.0 - aug.intensity_scale, 1.0 + aug.intensity_scale)
    if aug.bias_field:
        hr = hr * _bias_field(hr.shape, aug.bias_field, rng)
    if aug.bright_spots and rng.random() < aug.bright_spots:
        hr = bright_spots(hr, rng)
    if aug.dark_spots and rng.random() < aug.dark_spots:
        hr = dark_spots(hr, rng)
    if aug.blur and rng.random() < aug.blur:
        hr = ndimage.gaussian_filter(hr, rng.uniform(0.3, 1.5), mode="reflect")
    if aug.rician_noise:
        hr = rician(hr, rng.uniform(0.0, aug.rician_noise), rng)
    if aug.mask_cut and rng.random() < aug.mask_cut:
        ramp = bool(aug.mask_ramp) and rng.random() < aug.mask_ramp
        hr = mask_cut(hr, rng, ramp)
    return hr.astype(np.float32)


def sample_coords(hr: np.ndarray, k: int, rng: np.random.Generator):
    """K distinct HR voxels: normalised voxel-centre coordinates (K, 3) and values (K, 1)."""
    flat = rng.choice(hr.size, size=k, replace=False)
    index = np.stack(np.unravel_index(flat, hr.shape), axis=-1).astype(np.float64)
    coords = index_to_normalised(index, np.asarray(hr.shape, np.float64)).astype(np.float32)
    values = hr.reshape(-1)[flat].reshape(k, 1).astype(np.float32)
    return coords, values


def sample_cubes(hr: np.ndarray, k: int, edge: int, rng: np.random.Generator):
    """K / edge^3 distinct cubes of edge^3 neighbouring HR voxels (they may overlap), cube
    after cube, each in C order: normalised voxel-centre coordinates (K, 3), values (K, 1)."""
    corners = tuple(n - edge + 1 for n in hr.shape)
    flat = rng.choice(int(np.prod(corners)), size=k // edge ** 3, replace=False)
    corner = np.stack(np.unravel_index(flat, corners), axis=-1)
    offset = np.stack(np.unravel_index(np.arange(edge ** 3), (edge,) * 3), axis=-1)
    index = (corner[:, None, :] + offset[None, :, :]).reshape(-1, 3)
    coords = index_to_normalised(index.astype(np.float64), np.asarray(hr.shape, np.float64)).astype(np.float32)
    values = hr[tuple(index.T)].reshape(-1, 1).astype(np.float32)
    return coords, values


def make_patch(volume: np.ndarray, config: DataConfig, rng: np.random.Generator,
               scales=None):
    """(hr, lr, scales): an HR patch and its LR (both 3D float32), before coordinate draws."""
    if scales is None:
        scales = draw_scales(rng, config)
    shape = hr_shape(config.lr_size, scales)
    start = choose_patch_start(volume, shape, rng, config)
    hr = volume[tuple(slice(a, a + m) for a, m in zip(start, shape))]
    if config.augment.any_hr:
        hr = augment_hr(hr, rng, config.augment)
    hr = np.ascontiguousarray(hr, dtype=np.float32)
    lr = degrade(hr, config.lr_size, config.degrade, config.antialias)
    if config.augment.noise_std:
        sigma = rng.uniform(0.0, config.augment.noise_std)
        lr = (lr + rng.normal(0.0, sigma, size=lr.shape)).astype(np.float32)
    if config.augment.clip_lr and rng.random() < config.augment.clip_lr:
        lr = np.maximum(lr, 0.0)
    return hr, lr, np.asarray(scales, np.float64)


Example = Dict[str, np.ndarray]


class ExampleMaker(Protocol):
    """Turns one volume into one training example: ``(volume, config, rng) -> {name: array}``,
    float32 arrays of the same shapes for every call with the same config (they are stacked
    into batches). It draws from ``rng`` only, so the seed fixes the example.

    grain's worker processes receive it pickled: make it a small frozen dataclass, as
    :class:`PointSample`, defined at module level. ``validate(config)`` raises :class:`~arssr_jax.errors.ArSSRError` for a config it
    cannot serve (naming the field) and returns the config.
    """

    def __call__(self, volume: np.ndarray, config: DataConfig, rng: np.random.Generator) -> Example: ...

    def validate(self, config: DataConfig) -> DataConfig: ...


@dataclasses.dataclass(frozen=True)
class PointSample:
    """The LR patch and K = ``samples_per_step`` distinct voxels of its HR patch (what ArSSR
    trains on; with ``sample_cube`` > 1 the first ``config.cube_targets`` lie in cubes, and the
    scattered rest may repeat a cube's voxel): ``lr (n, n, n, 1)``, ``coords (K, 3)``
    (normalised voxel centres), ``values (K, 1)``, all float32. The draws of
    :func:`make_patch`, then the K coordinates."""

    def __call__(self, volume: np.ndarray, config: DataConfig, rng: np.random.Generator) -> Example:
        hr, lr, _ = make_patch(volume, config, rng)
        in_cubes, k = config.cube_targets, config.samples_per_step
        draws = ([sample_cubes(hr, in_cubes, config.sample_cube, rng)] if in_cubes else []) + \
                ([sample_coords(hr, k - in_cubes, rng)] if in_cubes < k else [])
        coords, values = (np.concatenate(parts) for parts in zip(*draws))  # cubes first, then scattered
        return {"lr": lr[..., None], "coords": coords, "values": values}

    def validate(self, config: DataConfig) -> DataConfig:
        return config.validate(points=True)


make_sample = PointSample()  # the default example of the input pipeline


DEFAULT_VALIDATION_SCALES = (2.0, 2.5, 3.0, 3.5, 4.0)


def validation_samples(volumes, config: DataConfig,
                       scales: Sequence[float] = DEFAULT_VALIDATION_SCALES,
                       patches_per_volume: int = 1, seed: int = 0) -> List[Dict[str, np.ndarray]]:
    """A fixed set of validation patches where every HR voxel is a target.

    For each volume v and patch j (position drawn from ``(seed, v, j)``, the same
    for every scale, foreground rule applied to the largest HR patch), and each
    scale s in ``scales`` (isotropic, used as given, no augmentation), returns
    ``{"lr": (n, n, n, 1), "hr": (m, m, m, 1), "coords": (m^3, 3), "scale": (3,),
    "volume": int}``, float32 except ``volume``; ``coords`` is
    ``coords.make_grid(hr shape)`` in the same row-major order as ``hr``.
    """
    from arssr_jax.data.volumes import check_patch_fits, load_volumes
    from arssr_jax.errors import ArSSRError

    volumes = load_volumes(volumes)
    config.validate(points=False)
    check_patch_fits(volumes, config.patch_size)
    biggest = max(hr_shape(config.lr_size, (s,))[0] for s in scales)
    if biggest > config.patch_size:
        raise ArSSRError(f"validation scales {tuple(scales)}: int(lr_size * s) = {biggest} "
                         f"exceeds patch_size {config.patch_size}; lower the scales")
    out = []
    for v, volume in enumerate(volumes.arrays):
        for j in range(patches_per_volume):
            rng = np.random.default_rng([seed, v, j])
            start = choose_patch_start(volume, (biggest,) * 3, rng, config)
            for s in scales:
                shape = hr_shape(config.lr_size, (s, s, s))
                hr = np.ascontiguousarray(
                    volume[tuple(slice(a, a + m) for a, m in zip(start, shape))], np.float32)
                lr = degrade(hr, config.lr_size, config.degrade, config.antialias)
                out.append({"lr": lr[..., None], "hr": hr[..., None],
                            "coords": make_grid(hr.shape),
                            "scale": np.full(3, s, np.float32), "volume": v})
    return out
