"""Adapting a model to the scan in hand: self-supervised fine-tuning on pairs cut from the scan.

A training task on one volume (no second training loop): the pairs are made here with the
data code's conventions, the step is :func:`arssr_jax.training.step.make_train_step` over
:func:`~arssr_jax.training.step.arssr_loss` with the training's Adam (its learning rate held
in the optimiser state, so one compilation serves every rate), the state a
:class:`~arssr_jax.training.state.TrainState` started from the given parameters (as
:func:`~arssr_jax.training.state.start_from`: Adam moments at zero).

Two modes, told from the voxel size (:func:`scan_mode`):

* **anisotropic** (one axis's spacing at least ``AdaptConfig.anisotropy`` times the other
  two's: a thick-slice scan). The information the model lacks along the thick axis is
  present along the thin ones. A pair: a block of the scan whose in-plane axis ``a`` (one of
  the two thin ones) is measured by slices ``r`` = spacing(thick) / spacing(a) of its voxels
  apart with the slice profile (:mod:`arssr_jax.slice_profile`: a box of the slice
  thickness by default, i.e. the mean of ``r`` voxels; a Gaussian of a given FWHM; a gap
  when the thickness is below the spacing), then its axes permuted so that the degraded
  axis lies where the thick axis lies in the scan: the model always learns to upsample the
  array axis it will upsample at inference. The target is the block before degradation,
  queried at its voxel centres (LR slice j's centre is the centre of its ``r`` HR voxels:
  the voxel-centre convention of :mod:`arssr_jax.coords` whenever the HR extent is ``r``
  times the LR's). The other two axes of a pair are the other thin axis and the scan's own
  thick axis, not degraded (the decoder queries their LR voxel centres); the pairs are cut
  from the scan brought to about its in-plane spacing along the thick axis (tricubic), so
  that both undegraded axes have the spacing the thin axes have at inference (cut from the
  scan as it is, a pair would show the thick spacing on two axes; on the training source
  that gave 0.25 dB less after the same steps). Random flips
  (by reversing the LR and negating the coordinates, exact for any ratio) and the choice of
  the thin axis (a 90 degree in-plane rotation) add variety.
* **isotropic** (only with ``AdaptConfig(isotropic=True)``): at scale s, cubes of the scan as
  HR and the same cubes degraded by a scale drawn from ``[s (1 - jitter), s (1 + jitter)]``
  (at least 1.1) as LR, with the training degradation (centred cubic,
  :func:`arssr_jax.data.degrade`) or, for a share ``box_fraction`` of them, the average over
  each LR voxel (an acquisition's box), with flips and axis permutations. Off by default: the
  pairs teach the model the scan's next coarser scale, not the finer one it is asked for, and
  their held-out part cannot tell. On the training source Colin 27 2 mm (``eval/evaluate.py
  --adapt --adapt-isotropic``; the shipped model 31.40 / 26.87 / 24.95 dB at x2 / x3 / x4) it
  gave 31.42 / 25.49 / 23.46 while the held-out pairs improved every time. Without it an
  isotropic scan is decoded by the start model and one line says so.

Validation: a slab of the scan (``validation_fraction`` of one axis, along the thick axis
when it has enough slices) gives no training pairs; fixed pairs from it score the start
model and checkpoints at every ``steps / checkpoints`` steps (PSNR on the normalised
intensities, L1 beside it). The best is returned; the start model is kept when no
checkpoint beats it.

Deterministic for a seed: the pairs come from ``numpy.random.default_rng`` seeded from
``AdaptConfig.seed``, the state's key from ``jax.random.PRNGKey(seed)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from arssr_jax.consistency import grid_scales
from arssr_jax.coords import index_to_normalised
from arssr_jax.data.degrade import degrade_centred
from arssr_jax.errors import ArSSRError
from arssr_jax.models import ArSSR, decode_in_blocks, default_decode_block, encode
from arssr_jax.progress import progress_counter
from arssr_jax.slice_profile import ANISOTROPY, PROFILES, apply_profile, profile_margin, thick_axis

MODES = ("anisotropic", "isotropic")
MIN_PAIR_SCALE = 1.1  # isotropic pairs are degraded by at least this much
FOREGROUND_THRESHOLD = 0.1  # normalised intensity; a pair's block should show some of the head
MIN_FOREGROUND = 0.2
POSITION_TRIES = 8


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """How to adapt. The defaults were chosen on the training source only (Colin 27's 1 mm head,
    a central 96 x 128 x 128 crop made 1 x 1 x 4 mm by averaging four slices, brought back to
    1 mm; PSNR over the crop): tricubic 29.11 dB, the shipped model 29.65; adapted with
    lr 1e-4: 29.96 (100 steps, pairs cut from the thick scan as it is), 30.20 (100 steps,
    pairs from the scan brought to its in-plane spacing, as now), 30.32 (200 steps); lr 3e-4,
    200 steps (its best held-out pairs at step 100): 30.60; lr 5e-4, batch 2, 1024 samples,
    100 steps: 29.92. About 0.9 s a step on 2 CPU cores.

    steps:            optimiser steps (at most; ``time_budget`` may stop earlier).
    learning_rate:    Adam's, constant.
    batch_size:       pairs per step.
    lr_patch:         LR voxels of a pair along the axis the model upsamples (isotropic: a
                      pair's LR cube edge).
    inplane_patch:    anisotropic: a pair's voxels along its two undegraded axes (the other
                      thin axis, and the thick axis brought to the in-plane spacing).
    samples:          HR voxels per pair the loss is taken at (K).
    seed:             fixes the pairs, the validation set and the state's key.
    profile:          anisotropic slice profile, "box" or "gaussian".
    thickness:        the slice thickness in mm (box; None: the slice spacing, a contiguous
                      stack; smaller than the spacing: a gap).
    fwhm:             the Gaussian profile's FWHM in mm (None: the thickness, else the spacing).
    validation_fraction: share of one axis held out for validation.
    validation_pairs: fixed pairs scored at every checkpoint.
    checkpoints:      validation points (every steps / checkpoints steps; the best is kept).
    time_budget:      seconds of training (None: no limit); a checkpoint is scored when it runs out.
    anisotropy:       a spacing this many times the others' makes an axis thick.
    isotropic:        fine-tune on isotropic scans too (False: they keep the start model; see the
                      module's docstring for why).
    scale_jitter:     isotropic: pairs' scale drawn within s (1 +- jitter).
    box_fraction:     isotropic: share of pairs degraded by a voxel average (rest: the training's
                      centred cubic), training and validation alike. 0 by default: on the training
                      source's 2 mm head at x2 (its LR the centred cubic degradation), 200 steps
                      with half the pairs box-averaged left the model 1.28 dB below the shipped
                      one (29.89 vs 31.16 dB, consistency 0); cubic pairs only: 31.18 (+0.02). Use
                      0.5 for a scan whose voxels average over their extent, as an acquisition's do.
    """

    # how long and how fast
    steps: int = 200
    learning_rate: float = 3e-4
    time_budget: Optional[float] = None
    seed: int = 0
    # the pairs
    batch_size: int = 4
    lr_patch: int = 8
    inplane_patch: int = 24
    samples: int = 2048
    # the scan's acquisition
    profile: str = "box"
    thickness: Optional[float] = None
    fwhm: Optional[float] = None
    anisotropy: float = ANISOTROPY
    # isotropic scans
    isotropic: bool = False
    scale_jitter: float = 0.2
    box_fraction: float = 0.0
    # validation
    validation_fraction: float = 0.25
    validation_pairs: int = 8
    checkpoints: int = 4

    def __post_init__(self):
        def integer(name, least):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ArSSRError(f"adapt {name} must be an integer of at least {least}, got {value!r:.40}")
            object.__setattr__(self, name, int(value))

        def number(name, low, high=math.inf, optional=False, low_open=True):
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer)) \
                and math.isfinite(float(value)) and (float(value) > low if low_open else float(value) >= low) \
                and float(value) <= high
            if not ok:
                bound = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high < math.inf else "")
                raise ArSSRError(f"adapt {name} must be a finite number {bound}, got {value!r:.40}")
            object.__setattr__(self, name, float(value))

        integer("steps", 1)
        integer("batch_size", 1)
        integer("lr_patch", 2)
        integer("inplane_patch", 1)
        integer("samples", 1)
        integer("seed", 0)
        integer("validation_pairs", 1)
        integer("checkpoints", 1)
        number("learning_rate", 0.0, 1.0)
        number("thickness", 0.0, optional=True)
        number("fwhm", 0.0, optional=True)
        number("validation_fraction", 0.0, 0.5)
        number("time_budget", 0.0, optional=True)
        number("anisotropy", 1.0)
        number("scale_jitter", 0.0, 0.9, low_open=False)
        number("box_fraction", 0.0, 1.0, low_open=False)
        if not isinstance(self.isotropic, (bool, np.bool_)):
            raise ArSSRError(f"adapt isotropic must be True or False, got {self.isotropic!r:.40}")
        if self.profile not in PROFILES:
            raise ArSSRError(f"adapt profile must be one of {', '.join(PROFILES)}, got {self.profile!r:.40}")

    def replace(self, **changes) -> "AdaptConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class AdaptResult:
    """What :func:`adapt` did. ``params``: the ones to decode with (the start's when
    ``kept_start``). Scores are on the validation pairs (normalised intensities):
    ``{"psnr": dB, "l1": mean absolute error}``; ``history`` lists ``(step, psnr, l1)`` of
    every checkpoint scored, the start's first."""

    params: Any
    mode: str
    thick_axis: Optional[int]
    ratio: float  # anisotropic: the slice spacing over the in-plane one; isotropic: the scale
    start_score: dict
    adapted_score: dict
    kept_start: bool
    best_step: int
    steps_run: int
    history: list
    losses: list
    setup_seconds: float  # making pairs and compiling
    train_seconds: float  # the steps and the validation
    message: str
    config: Optional[AdaptConfig] = None

    @property
    def seconds(self) -> float:
        return self.setup_seconds + self.train_seconds

    @property
    def gain_db(self) -> float:
        return self.adapted_score["psnr"] - self.start_score["psnr"]


# --------------------------------------------------------------------------- the mode


def scan_mode(voxel_size, scales=None, anisotropy: float = ANISOTROPY) -> tuple:
    """("anisotropic", thick axis) when one axis's spacing is at least ``anisotropy`` times
    each other's; ("isotropic", None) when no axis is; ArSSRError when two axes are thick
    and the user's ``scales`` do not single one of them out (the largest scale, on one axis)."""
    spacing = _three_positive(voxel_size, "voxel size")
    thick = thick_axis(spacing, anisotropy)
    if thick is not None:
        return "anisotropic", thick
    if max(spacing) < anisotropy * min(spacing):
        return "isotropic", None
    # Two axes coarser than the third: the thick axis is the one the user upsamples most.
    coarse = [k for k in range(3) if spacing[k] >= anisotropy * min(spacing)]
    if scales is not None:
        s = _three_positive(scales, "scale")
        top = [k for k in range(3) if s[k] == max(s)]
        if len(top) == 1 and top[0] in coarse and max(s) > 1:
            return "anisotropic", top[0]
    sizes = " x ".join(f"{v:g}" for v in spacing)
    raise ArSSRError(f"cannot tell the thick axis of a {sizes} mm scan (two axes are coarser than the third); "
                     "give a scale that is largest on the thick axis alone, e.g. --scale 1 1 4")


def _three_positive(value, name) -> tuple:
    try:
        values = np.broadcast_to(np.asarray(value, np.float64), (3,))
    except (TypeError, ValueError):
        raise ArSSRError(f"{name} must be one number or three, got {value!r:.60}") from None
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ArSSRError(f"{name} must be positive and finite, got {value!r:.60}")
    return tuple(float(v) for v in values)


# --------------------------------------------------------------------------- pairs


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where pairs come from and their sizes (all voxel counts of the scan)."""

    train: tuple  # (lo, hi) per axis
    val: tuple
    split_axis: int
    n: int  # LR voxels along the degraded axis (isotropic: the LR cube edge)
    p: int = 0  # anisotropic: other thin axis
    q: int = 0  # anisotropic: the scan's thick axis


def _slab(shape, axis, val_len):
    train = tuple((0, n) if k != axis else (0, n - val_len) for k, n in enumerate(shape))
    val = tuple((0, n) if k != axis else (n - val_len, n) for k, n in enumerate(shape))
    return train, val


def _extents(train, val):
    return [min(b - a, d - c) for (a, b), (c, d) in zip(train, val)]


class _Anisotropic:
    """Pairs of a thick-slice scan (see the module's docstring)."""

    mode = "anisotropic"

    def __init__(self, volume, spacing, thick, config: AdaptConfig):
        from arssr_jax.coords import centre_positions
        from arssr_jax.interpolation import resample_axes

        self.thick, self.config = thick, config
        self.thin = tuple(k for k in range(3) if k != thick)
        self.ratios = {a: spacing[thick] / spacing[a] for a in self.thin}
        self.ratio = float(np.mean(list(self.ratios.values())))
        # The scan brought to about its in-plane spacing along the thick axis (tricubic): the
        # pairs' undegraded axes then have the spacing the input's thin axes have at inference.
        count = max(1, int(round(volume.shape[thick] * self.ratio)))
        positions = [np.arange(n, dtype=np.float64) for n in volume.shape]
        positions[thick] = centre_positions(count, volume.shape[thick])
        self.volume = resample_axes(volume, positions, dtype=np.float32).astype(np.float32)
        self.widths = {}
        for a in self.thin:
            if config.profile == "box":
                mm = config.thickness if config.thickness is not None else spacing[thick]
            else:
                mm = config.fwhm if config.fwhm is not None else (config.thickness or spacing[thick])
            self.widths[a] = mm / spacing[a]
        self.margins = {a: profile_margin(config.profile, self.ratios[a], self.widths[a]) for a in self.thin}
        self.layout = self._layout(self.volume.shape, config)

    def cut_length(self, a, n):
        return int(math.ceil(n * self.ratios[a] - 1e-9)) + 2 * self.margins[a]

    def _sizes(self, ext, config):
        """(n, p, q) that fit the extents ``ext`` (the smaller of the two parts per axis), or None."""
        room = min(ext)  # every axis may hold the degraded one or an undegraded one
        n = config.lr_patch
        while n >= 2 and max(self.cut_length(a, n) for a in self.thin) > min(ext[a] for a in self.thin):
            n -= 1
        p = q = min(config.inplane_patch, room)
        return (n, p, q) if n >= 2 and p >= 2 else None

    def _layout(self, shape, config):
        """The held-out slab (along the thick axis if it fits, else a thin one) and the pair
        sizes: the first slab that fits full-size pairs, else the one with the largest."""
        order = [self.thick] + sorted(self.thin, key=lambda k: -shape[k])
        best = None
        for axis in order:
            for val_len in (int(math.ceil(config.validation_fraction * shape[axis])), shape[axis] // 3, shape[axis] // 2):
                if not 0 < val_len < shape[axis]:
                    continue
                train, val = _slab(shape, axis, val_len)
                sizes = self._sizes(_extents(train, val), config)
                if sizes and sizes == (config.lr_patch, config.inplane_patch, config.inplane_patch):
                    return _Layout(train, val, axis, *sizes)
                if sizes and (best is None or sizes > best[0]):
                    best = sizes, _Layout(train, val, axis, *sizes)
        if best is not None:
            return best[1]
        raise ArSSRError(f"the scan ({'x'.join(map(str, shape))} voxels brought to its in-plane spacing) is too "
                         f"small to adapt to: a pair needs two slices {self.ratio:.2g} in-plane voxels apart in a "
                         "held-out part and in the rest; upsample it without adapting")

    def pair(self, region, rng, count):
        """One pair: LR (model order) and ``count`` targets (coords, values)."""
        c, L = self.config, self.layout
        a = self.thin[int(rng.integers(2))]
        b = self.thin[0] if a == self.thin[1] else self.thin[1]
        r, margin = self.ratios[a], self.margins[a]
        extent = {a: self.cut_length(a, L.n), b: L.p, self.thick: L.q}
        block = _choose_block(self.volume, region, extent, rng)
        lr = apply_profile(block, a, L.n, r, c.profile, self.widths[a], offset=margin)
        inside = int(math.ceil(L.n * r - 0.5 - 1e-9))  # HR voxels whose centre lies in the LR extent
        hr = np.take(block, np.arange(margin, margin + inside), axis=a)
        # model position <- scan axis: the degraded axis where the thick one lies at inference
        rest = [k for k in range(3) if k != self.thick]
        if rng.random() < 0.5:
            rest = rest[::-1]
        perm = [0, 0, 0]
        perm[self.thick], perm[rest[0]], perm[rest[1]] = a, b, self.thick
        lr, hr = np.transpose(lr, perm), np.transpose(hr, perm)
        flat = rng.choice(hr.size, size=count, replace=hr.size < count)
        index = np.stack(np.unravel_index(flat, hr.shape), axis=-1).astype(np.float64)
        coords = index_to_normalised(index, np.asarray(hr.shape, np.float64))
        d = self.thick  # the degraded axis's position: its HR voxels are 1/r LR voxels apart
        coords[:, d] = 2.0 * (index[:, d] + 0.5) / (L.n * r) - 1.0
        values = hr.reshape(-1)[flat]
        return _flipped(lr, coords, values, rng)


class _Isotropic:
    """Pairs of an isotropic scan at scale s (see the module's docstring)."""

    mode = "isotropic"
    thick = None

    def __init__(self, volume, scale, config: AdaptConfig):
        self.volume, self.config = volume, config
        self.ratio = max(float(scale), MIN_PAIR_SCALE)
        self.low = max(MIN_PAIR_SCALE, self.ratio * (1.0 - config.scale_jitter))
        self.high = max(MIN_PAIR_SCALE, self.ratio * (1.0 + config.scale_jitter))
        self.layout = self._layout(volume.shape, config)

    def _layout(self, shape, config):
        axis = int(np.argmax(shape))
        n = config.lr_patch
        while n >= 2:
            biggest = int(round(n * self.high))
            val_len = max(int(math.ceil(config.validation_fraction * shape[axis])), biggest)
            if shape[axis] - val_len >= biggest and all(shape[k] >= biggest for k in range(3)):
                return _Layout(*_slab(shape, axis, val_len), axis, n)
            n -= 1
        raise ArSSRError(f"the scan ({'x'.join(map(str, shape))} voxels) is too small to adapt to at scale "
                         f"{self.ratio:g}; upsample it without adapting")

    def pair(self, region, rng, count, scale=None, box=None):
        n = self.layout.n
        s = rng.uniform(self.low, self.high) if scale is None else scale
        m = max(n + 1, int(round(n * s)))
        block = _choose_block(self.volume, region, {0: m, 1: m, 2: m}, rng)
        box = (rng.random() < self.config.box_fraction) if box is None else box
        if box:
            lr = block
            for axis in range(3):
                lr = apply_profile(lr, axis, n, m / n, "box")
        else:
            lr = degrade_centred(block, n)
        perm = rng.permutation(3)
        lr, hr = np.transpose(lr, perm), np.transpose(block, perm)
        flat = rng.choice(hr.size, size=count, replace=hr.size < count)
        index = np.stack(np.unravel_index(flat, hr.shape), axis=-1).astype(np.float64)
        coords = index_to_normalised(index, np.asarray(hr.shape, np.float64))
        return _flipped(lr, coords, hr.reshape(-1)[flat], rng)

    def validation_pair(self, region, rng, count, j):
        boxes = int(round(self.config.box_fraction * self.config.validation_pairs))
        return self.pair(region, rng, count, scale=self.ratio, box=j < boxes)


def _flipped(lr, coords, values, rng):
    """Random flips: the LR reversed along an axis and the targets' coordinates negated
    there (exact: LR voxel centres are symmetric about 0 in the cube)."""
    flips = rng.random(3) < 0.5
    lr = lr[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    coords = coords * np.where(flips, -1.0, 1.0)
    return (np.ascontiguousarray(lr, np.float32)[..., None], coords.astype(np.float32),
            np.asarray(values, np.float32)[:, None])


def _choose_block(volume, region, extent, rng):
    """A block of ``extent`` (axis -> voxels) inside ``region`` (lo, hi per axis), preferring one
    that shows the head: the first of a few random positions with enough foreground, else the
    one with the most."""
    best, best_fraction = None, -1.0
    for _ in range(POSITION_TRIES):
        start = [int(rng.integers(lo, hi - extent[k] + 1)) for k, (lo, hi) in enumerate(region)]
        block = volume[tuple(slice(s, s + extent[k]) for k, s in enumerate(start))]
        fraction = float(np.mean(block > FOREGROUND_THRESHOLD))
        if fraction >= MIN_FOREGROUND:
            return block
        if fraction > best_fraction:
            best, best_fraction = block, fraction
    return best


def _batch(pairs):
    lr, coords, values = zip(*pairs)
    return {"lr": np.stack(lr), "coords": np.stack(coords), "values": np.stack(values)}


# --------------------------------------------------------------------------- adaptation


def _training_module(module: ArSSR) -> ArSSR:
    """The network as training sees it: inference-only output damping (if the config still
    has it) switched off, as the training task does."""
    config = module.config
    if getattr(config, "dim_damping", 0):
        return ArSSR(config.replace(dim_damping=0.0))
    return module


@functools.lru_cache(maxsize=8)
def _compiled(module: ArSSR):
    """(the jitted train step, its optimiser, the jitted validation score) for a training
    module: built once, so adapting many scans, at any learning rate, compiles once per shape.
    The optimiser is the training's Adam (``OptimConfig``'s moments) with its learning rate
    held in the optimiser state (``optax.inject_hyperparams``), not compiled in."""
    import optax

    from arssr_jax.training.config import OptimConfig
    from arssr_jax.training.step import arssr_loss, make_train_step

    optim = OptimConfig()
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=optim.learning_rate, b1=optim.b1, b2=optim.b2,
                                              eps=optim.eps)
    step = jax.jit(make_train_step(arssr_loss(module), tx, lambda count: jnp.nan))  # the rate: in opt_state
    block = default_decode_block()

    @jax.jit
    def score(params, batch):
        features = encode(module, params, batch["lr"])
        pred = decode_in_blocks(module, params, features, batch["coords"], block)
        error = pred - batch["values"]
        return jnp.mean(error * error), jnp.mean(jnp.abs(error))

    return step, tx, score


def _with_rate(opt_state, rate: float):
    """An ``inject_hyperparams`` optimiser state with its learning rate set to ``rate``."""
    hyperparams = dict(opt_state.hyperparams, learning_rate=jnp.asarray(rate, jnp.float32))
    return opt_state._replace(hyperparams=hyperparams)


def _score(score, params, batch) -> dict:
    mse, l1 = (float(x) for x in score(params, batch))
    return {"psnr": float(-10.0 * math.log10(max(mse, 1e-12))), "l1": l1}


def adapt(module: ArSSR, params, volume, voxel_size, scales, config: AdaptConfig = AdaptConfig(), *,
          progress: bool = False) -> AdaptResult:
    """Fine-tune ``params`` of ``module`` on pairs cut from ``volume`` itself (see the module).

    ``volume``: the LR scan normalised to [0, 1] (nibabel (i, j, k) order); ``voxel_size``: its
    spacing in mm (3,); ``scales``: the per-axis factors it will be upsampled by (isotropic
    mode adapts to their largest; anisotropic mode to the spacing ratio, and uses ``scales``
    only to tell the thick axis when the spacing cannot).
    """
    from arssr_jax.training.state import TrainState

    if not isinstance(config, AdaptConfig):
        raise ArSSRError(f"adapt takes an AdaptConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3 or not np.all(np.isfinite(volume)):
        raise ArSSRError(f"adapt takes a finite 3D volume, got shape {volume.shape}")
    spacing = _three_positive(voxel_size, "voxel size")
    scale = _three_positive(scales, "scale")
    mode, thick = scan_mode(spacing, scale, config.anisotropy)
    if mode == "isotropic" and not config.isotropic:
        return _not_adapted(params, max(scale), time.perf_counter() - t0, config)
    source = (_Anisotropic(volume, spacing, thick, config) if mode == "anisotropic"
              else _Isotropic(volume, max(scale), config))
    layout = source.layout

    # Fixed validation pairs from the held-out slab, with their own stream.
    val_rng = np.random.default_rng([config.seed, 1])
    val_count = config.samples
    if mode == "isotropic":
        val_pairs = [source.validation_pair(layout.val, val_rng, val_count, j) for j in range(config.validation_pairs)]
    else:
        val_pairs = [source.pair(layout.val, val_rng, val_count) for _ in range(config.validation_pairs)]
    val_batch = _batch(val_pairs)

    step_fn, tx, scorer = _compiled(_training_module(module))
    score = functools.partial(_score, scorer)

    start_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=start_params,
                       opt_state=_with_rate(tx.init(start_params), config.learning_rate),
                       rng=jax.random.PRNGKey(config.seed))
    start_score = score(start_params, val_batch)
    rng = np.random.default_rng([config.seed, 0])
    setup_seconds = time.perf_counter() - t0

    marks = sorted({max(1, int(round(config.steps * (i + 1) / config.checkpoints))) for i in range(config.checkpoints)})
    history = [(0, start_score["psnr"], start_score["l1"])]
    best_params, best_score, best_step = start_params, start_score, 0
    losses = []
    t1 = time.perf_counter()
    bar = progress_counter(config.steps, "adapt", unit="step", enabled=progress)
    steps_run = 0
    try:
        for step in range(1, config.steps + 1):
            batch = _batch([source.pair(layout.train, rng, config.samples) for _ in range(config.batch_size)])
            state, metrics = step_fn(state, batch)
            losses.append(metrics["loss"])
            steps_run = step
            out_of_time = config.time_budget is not None and time.perf_counter() - t1 >= config.time_budget
            if step in marks or out_of_time:
                current = score(state.params, val_batch)
                history.append((step, current["psnr"], current["l1"]))
                if current["psnr"] > best_score["psnr"]:
                    best_params, best_score, best_step = state.params, current, step
            if step % 10 == 0 or step == config.steps:
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", val=f"{best_score['psnr']:.2f} dB")
            bar.update(1)
            if out_of_time:
                break
    finally:
        bar.close()
    losses = [float(x) for x in losses]
    train_seconds = time.perf_counter() - t1
    kept = best_step == 0
    gain = best_score["psnr"] - start_score["psnr"]
    if kept:
        after = max((h[1] for h in history[1:] if math.isfinite(h[1])), default=float("nan"))
        message = (f"adaptation did not improve the scan's held-out pairs ({start_score['psnr']:.2f} dB at the "
                   f"start, {after:.2f} dB at best after it): keeping the start model")
    else:
        message = (f"adapted ({mode}, {steps_run} steps, {setup_seconds + train_seconds:.0f} s): held-out pairs "
                   f"{start_score['psnr']:.2f} -> {best_score['psnr']:.2f} dB (+{gain:.2f}) at step {best_step}")
    return AdaptResult(params=params if kept else best_params, mode=mode, thick_axis=thick, ratio=float(source.ratio),
                       start_score=start_score, adapted_score=best_score, kept_start=kept, best_step=best_step,
                       steps_run=steps_run, history=history, losses=losses, setup_seconds=setup_seconds,
                       train_seconds=train_seconds, message=message, config=config)


def _not_adapted(params, scale, seconds, config) -> AdaptResult:
    """The result for an isotropic scan left as it is (``AdaptConfig.isotropic`` off)."""
    unscored = {"psnr": float("nan"), "l1": float("nan")}
    message = ("isotropic scan: not adapted, decoding with the start model (adapting isotropic scans lost "
               "up to 1.5 dB on the training source; AdaptConfig(isotropic=True) or --adapt-isotropic forces it)")
    return AdaptResult(params=params, mode="isotropic", thick_axis=None, ratio=float(scale), start_score=unscored,
                       adapted_score=unscored, kept_start=True, best_step=0, steps_run=0, history=[], losses=[],
                       setup_seconds=seconds, train_seconds=0.0, message=message, config=config)


__all__ = ["AdaptConfig", "AdaptResult", "adapt", "scan_mode", "MODES"]


# --------------------------------------------------------------------------- in the inference pipeline


class Adaptation:
    """Adapt the model to each scan before it is decoded: give it as ``adapt=`` to
    :class:`arssr_jax.inference.Upsampler` (``up(volume, ..., adapt=...)``, ``up.nifti(...,
    adapt=...)``), :func:`arssr_jax.upsample` or :func:`arssr_jax.upsample_nifti`.

    ``config``: how (:class:`AdaptConfig`); ``save_to``: a folder the adapted model is written to
    (a model directory ``--model`` loads, with the upsampler's inference options); ``log``: a
    callable given the one-line summary of each adaptation. ``results`` lists every
    :class:`AdaptResult`, latest last.
    """

    def __init__(self, config: AdaptConfig | None = None, *, save_to=None, log=None):
        self.config = AdaptConfig() if config is None else config
        if not isinstance(self.config, AdaptConfig):
            raise ArSSRError(f"Adaptation takes an AdaptConfig, got {type(self.config).__name__}")
        self.save_to, self.log, self.results = save_to, log, []

    def adapted(self, upsampler, volume, voxel_size, grid, progress=False):
        """``upsampler`` with parameters adapted to ``volume`` (normalised as the network sees it).
        Without the scan's voxel size the requested per-axis scales stand in for its spacing (the
        axis upsampled most is the thick one)."""
        from arssr_jax.inference import Upsampler

        scales = grid_scales(grid)
        spacing = scales if voxel_size is None else voxel_size
        result = adapt(upsampler.module, upsampler.params, volume, spacing, scales, self.config, progress=progress)
        self.results.append(result)
        if self.log is not None:
            self.log(result.message)
        options = upsampler.options
        if result.mode == "anisotropic" and options.slice_profile is None:
            # The slices measure the tissue with the profile the pairs were made with: the output
            # is brought into agreement with them that way (the point step costs the adapted model).
            width = self.config.thickness if self.config.profile == "box" else self.config.fwhm
            options = options.replace(slice_profile=self.config.profile, slice_thickness=width)
        if self.save_to is not None:
            from arssr_jax.weights import save_model

            scored = lambda score: score["psnr"] if math.isfinite(score["psnr"]) else None  # JSON has no NaN
            metadata = {"adapted": result.message, "start_psnr": scored(result.start_score),
                        "adapted_psnr": scored(result.adapted_score), "mode": result.mode}
            save_model(self.save_to, upsampler.config, result.params, metadata, upsampler.options)
        return Upsampler((upsampler.module, result.params), options=options)
