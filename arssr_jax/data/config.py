"""Configuration of the training input pipeline: plain, typed, printable dataclasses."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Tuple, Union

from arssr_jax.errors import ArSSRError

ROUNDINGS = ("none", "reference")
DEGRADE_MODES = ("centred", "reference")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Optional augmentations of the HR patch (all off by default).

    Applied to the HR patch before degradation, so the LR input and the HR
    targets stay consistent; ``noise_std`` is the exception (see below).

    flip:            flip each axis with probability 1/2.
    permute:         random permutation of the three axes (the per-axis scales
                     follow their axes; the LR stays ``lr_size`` per axis).
    gamma:           intensity ``x ** g`` with ``log g ~ U(-gamma, gamma)``.
    intensity_scale: multiply by ``U(1 - a, 1 + a)``.
    bias_field:      multiply by ``exp(f)``, ``f`` a random quadratic polynomial of
                     the patch coordinates scaled so that ``max |f| = bias_field``.
    noise_std:       add Gaussian noise of standard deviation ``U(0, noise_std)`` to
                     the LR input only (after degradation): the model learns to
                     reconstruct clean HR from a noisy LR, not to reproduce noise.
    contrast:        probability of remapping the HR intensities through a random
                     piecewise-linear curve (knots every 0.15, values U(0, 1), the
                     first U(0, 0.1)): tissue contrasts the data does not have
                     (T2-, PD-, FLAIR-like inversions), as in domain randomisation.
    rician_noise:    magnitude (Rician) noise of sigma ``U(0, rician_noise)`` on the HR
                     patch, before degradation: the target is as noisy as a real scan,
                     so the model learns not to sharpen noise, and sees noisy
                     backgrounds instead of exact zeros.
    bright_spots:    probability of adding 1-6 small bright blobs to the HR patch (Gaussian,
                     sigma U(0.7, 2.5) HR voxels, peak U(0.3, 2)): vessels, fat, lesions,
                     intensities above the training volumes' range.
    dark_spots:      probability of darkening the HR patch with 1-6 small Gaussian holes (sigma
                     U(0.7, 2.5) HR voxels, x (1 - d g) with depth d ~ U(0.5, 1)): CSF pockets, sulci,
                     vessels and lesions darker than the tissue around them.
    blur:            probability of blurring the HR patch (Gaussian, sigma U(0.3, 1.5) voxels)
                     before the noise: intrinsically smooth images (templates averaged over
                     many brains, wide point-spread functions), so a gentle ramp in the LR is
                     not always taken for a blurred step edge.
    mask_cut:        probability of zeroing the HR patch outside a random curved surface
                     (a random quadric) after the noise: the hard edges of skull-stripped and
                     masked volumes, through tissue of any intensity.
    mask_ramp:       probability that a mask cut also fades the tissue towards the cut: inside,
                     intensity x (r + (1 - r) * min(1, (d - 1) / w)), d the distance to the cut in
                     voxels, r ~ U(0, 1), w ~ U(1, 6): templates averaged over many brains, whose
                     masks cut a partial-volume ramp, not a plateau, so the step is not moved inward.
    clip_lr:         probability of clipping the LR at 0, as a magnitude image is.
    """

    flip: bool = False
    permute: bool = False
    gamma: float = 0.0
    intensity_scale: float = 0.0
    bias_field: float = 0.0
    noise_std: float = 0.0
    contrast: float = 0.0
    rician_noise: float = 0.0
    bright_spots: float = 0.0
    dark_spots: float = 0.0
    blur: float = 0.0
    mask_cut: float = 0.0
    mask_ramp: float = 0.0
    clip_lr: float = 0.0

    @property
    def any_hr(self) -> bool:
        return bool(self.flip or self.permute or self.gamma or self.intensity_scale
                    or self.bias_field or self.contrast or self.rician_noise or self.bright_spots
                    or self.dark_spots or self.blur or self.mask_cut)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the training input pipeline needs.

    paths:               a directory (all *.nii / *.nii.gz, sorted), a text file
                         listing one NIfTI path per line, or NIfTI file paths.
                         Empty when volumes are given in memory.
    patch_size:          edge of the random HR patch cube, voxels.
    margin:              keep patches this many voxels from the volume faces when
                         the volume is large enough (reduced per axis otherwise).
    lr_size:             LR patch edge, voxels; the HR patch is the first
                         ``int(lr_size * s)`` voxels of the patch along each axis.
    scale_min/max:       scale range; ``s ~ U(scale_min, scale_max)``.
    anisotropic:         one scale per axis instead of one per patch.
    rounding:            'none' or 'reference' (``s = round(U(min, max + 0.04), 1)``).
    degrade:             'centred' (voxel-centre consistent cubic resampling) or
                         'reference' (``scipy.ndimage.zoom(hr, 1/s, order=3)``).
    antialias:           Gaussian pre-blur (sigma = (m/n - 1)/2 HR voxels) before
                         'centred' resampling; off like the reference.
    samples_per_step:    K, HR coordinates drawn per patch (without replacement) by the
                         point examples (``make_sample``); unused by whole-patch ones.
    sample_cube:         1: the K voxels are drawn independently. c > 1: they are K / c^3
                         distinct cubes of c x c x c neighbouring voxels (cubes may overlap),
                         cube after cube, so a loss can compare each cube's local mean,
                         spread and correlation (``TrainConfig.ssim_weight``).
    cube_fraction:       with sample_cube > 1, the fraction of the K targets drawn in cubes
                         (first); the rest are drawn independently, so a loss over all K still
                         sees scattered voxels. ``K * cube_fraction`` must be a whole number of cubes.
    batch_size:          global batch (all processes together) per step.
    seed:                the one seed everything is derived from.
    worker_count:        worker processes computing batches (0: in this process,
                         with ``read_threads`` background threads).
    prefetch:            batches buffered ahead (per worker when worker_count > 0).
    samples_per_volume:  patches per volume per epoch (the reference used 6).
    num_steps:           stop after this many steps (None: infinite stream).
    min_foreground:      reject a candidate HR patch when less than this fraction
                         of its voxels exceeds ``foreground_threshold``; 0 disables.
    foreground_threshold: normalised intensity separating foreground from background.
    max_tries:           candidate patch positions tried; after that the candidate
                         with the largest foreground fraction is kept.
    augment:             :class:`AugmentConfig`.
    cache_dir:           the volume cache (``arssr_jax.data.cache``): training NIfTI files
                         are converted once into normalised float32 ``.npy`` files here
                         and memory-mapped by every process and worker, so memory does not
                         grow with the dataset. Default ``~/.cache/arssr-jax/volumes``
                         (``$ARSSR_JAX_VOLUME_CACHE`` moves it); ``~`` and ``$VARS`` are
                         expanded; None reads every volume into memory. Batches are the
                         same either way.
    """

    paths: Tuple[str, ...] = ()
    patch_size: int = 40
    margin: int = 0
    lr_size: int = 10
    scale_min: float = 2.0
    scale_max: float = 4.0
    anisotropic: bool = False
    rounding: str = "none"
    degrade: str = "centred"
    antialias: bool = False
    samples_per_step: int = 8000
    sample_cube: int = 1
    cube_fraction: float = 1.0
    batch_size: int = 15
    seed: int = 0
    worker_count: int = 0
    prefetch: int = 2
    read_threads: int = 1
    samples_per_volume: int = 6
    num_steps: Optional[int] = None
    min_foreground: float = 0.25
    foreground_threshold: float = 0.05
    max_tries: int = 10
    augment: AugmentConfig = AugmentConfig()
    cache_dir: Optional[str] = "~/.cache/arssr-jax/volumes"

    def __post_init__(self):
        paths = self.paths
        if isinstance(paths, (str, os.PathLike)):
            paths = (paths,)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))

    @classmethod
    def reference(cls, paths: Union[str, Tuple[str, ...]] = (), **overrides) -> "DataConfig":
        """The reference's training data setup (docs/REFERENCE.md section 3)."""
        values = dict(paths=paths, patch_size=40, margin=40, lr_size=10, scale_min=2.0,
                      scale_max=4.0, rounding="reference", degrade="reference",
                      samples_per_step=8000, batch_size=15, samples_per_volume=6,
                      min_foreground=0.0)
        values.update(overrides)
        return cls(**values)

    # -- derived quantities -------------------------------------------------
    def scale_bounds(self) -> Tuple[float, float]:
        """Smallest and largest scale the sampler can draw."""
        if self.rounding == "reference":
            return (min(self.scale_min, round(self.scale_min, 1)),
                    round(self.scale_max + 0.04, 1))
        return (float(self.scale_min), float(self.scale_max))

    def hr_size_bounds(self) -> Tuple[int, int]:
        lo, hi = self.scale_bounds()
        return int(self.lr_size * lo), int(self.lr_size * hi)

    def samples_per_epoch(self, num_volumes: int) -> int:
        return self.samples_per_volume * num_volumes

    def steps_per_epoch(self, num_volumes: int) -> int:
        """Steps per epoch (last, partial batch counted), as a DataLoader without drop_last."""
        return math.ceil(self.samples_per_epoch(num_volumes) / self.batch_size)

    @property
    def cube_targets(self) -> int:
        """How many of the K targets lie in cubes (the first ones): 0 without cubes."""
        if self.sample_cube < 2:
            return 0
        return round(self.samples_per_step * self.cube_fraction / self.sample_cube ** 3) * self.sample_cube ** 3

    def validate(self, points: bool = True) -> "DataConfig":
        """Raise :class:`ArSSRError` naming the first bad field; return self.

        ``points``: the examples draw ``samples_per_step`` distinct voxels of every HR patch
        (``make_sample``), so K must not exceed the smallest HR patch; False for examples
        that draw none (whole patches, validation patches).
        """

        def bad(field, why):
            raise ArSSRError(f"DataConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("patch_size", "lr_size", "samples_per_step", "batch_size",
                      "samples_per_volume", "max_tries"):
            if int(getattr(self, field)) < 1:
                bad(field, "must be a positive integer")
        for field in ("margin", "worker_count", "prefetch", "read_threads"):
            if int(getattr(self, field)) < 0:
                bad(field, "must be >= 0")
        if self.rounding not in ROUNDINGS:
            bad("rounding", f"use one of {ROUNDINGS}")
        if self.degrade not in DEGRADE_MODES:
            bad("degrade", f"use one of {DEGRADE_MODES}")
        if not (self.scale_min >= 1.0):
            bad("scale_min", "must be >= 1 (this pipeline only down-samples)")
        if not (self.scale_max >= self.scale_min):
            bad("scale_max", f"must be >= scale_min={self.scale_min}")
        if not 0.0 <= self.min_foreground <= 1.0:
            bad("min_foreground", "must lie in [0, 1]")
        if self.num_steps is not None and self.num_steps < 0:
            bad("num_steps", "must be >= 0 or None")
        lo, hi = self.hr_size_bounds()
        if hi > self.patch_size:
            bad("patch_size", f"must be >= int(lr_size * max scale) = {hi}; raise "
                "patch_size or lower scale_max/lr_size")
        if points and self.samples_per_step > lo ** 3:
            bad("samples_per_step", f"K must be <= {lo ** 3} HR voxels of the smallest HR "
                f"patch ({lo}^3 at the smallest scale); lower K or raise scale_min")
        c = self.sample_cube
        if not isinstance(c, int) or c < 1 or c > lo:
            bad("sample_cube", f"the cube edge must be an integer from 1 to {lo} (the smallest HR patch's edge)")
        if not (isinstance(self.cube_fraction, (int, float)) and 0.0 < self.cube_fraction <= 1.0):
            bad("cube_fraction", "the fraction of targets drawn in cubes must lie in (0, 1]")
        if points and c > 1:
            cubes = self.cube_targets // c ** 3  # K x cube_fraction, rounded to whole cubes
            if abs(self.cube_targets - self.samples_per_step * self.cube_fraction) > 1e-6 or cubes < 1:
                bad("sample_cube", f"K x cube_fraction = {self.samples_per_step} x {self.cube_fraction:g} must be a "
                    f"whole number (>= 1) of {c}^3 = {c ** 3}-voxel cubes; change K, cube_fraction or the cube edge")
            if cubes > (lo - c + 1) ** 3:
                bad("sample_cube", f"{cubes} distinct cubes do not fit in the smallest HR patch ({lo}^3); lower K")
        a = self.augment
        for field in ("gamma", "intensity_scale", "bias_field", "noise_std", "rician_noise"):
            if getattr(a, field) < 0:
                raise ArSSRError(f"AugmentConfig.{field}={getattr(a, field)!r}: must be >= 0")
        for field in ("contrast", "bright_spots", "dark_spots", "blur", "mask_cut", "mask_ramp", "clip_lr"):
            if not 0.0 <= getattr(a, field) <= 1.0:
                raise ArSSRError(f"AugmentConfig.{field}={getattr(a, field)!r}: a probability, "
                                 "must lie in [0, 1]")
        if a.intensity_scale >= 1:
            raise ArSSRError(f"AugmentConfig.intensity_scale={a.intensity_scale!r}: must be < 1")
        return self
