"""Baselines of the ArSSR paper's comparison (REFERENCE.md section 5).

Interpolation (functions, not networks), both onto the voxel-centre HR grid ArSSR
decodes: HR voxel i of m along an axis of n LR voxels sits at the continuous LR
index p = (i + 0.5) * n / m - 0.5 (the centre of the same [-1, 1] cube):

* :func:`tricubic` - order-3 B-spline interpolation (``scipy.ndimage.map_coordinates``
  with the spline prefilter), boundary mode ``'reflect'`` (half-sample symmetric:
  the signal is mirrored about the outer voxel *faces*, the faces of the [-1, 1] cube,
  as in the centred LR simulation of ``arssr_jax.data.degrade``). It equals
  ``scipy.ndimage.zoom(lr, m / n, order=3, grid_mode=True, mode='reflect')``
  whenever that zoom gives m voxels.
* :func:`nearest` - nearest-neighbour on the same grid (a sanity floor).

Fixed-scale CNNs (flax linen, channels-last ``(N, X, Y, Z, 1)``). Each takes the
tricubic-upsampled LR volume (already the HR size) and returns the HR estimate; one
model is trained per scale, as in the paper. ``BASELINES`` maps name -> module class:

* ``SRCNN3D`` (Pham et al., ISBI 2017): conv f1^3 x n1 + ReLU, conv f2^3 x n2 + ReLU,
  conv f3^3 x 1. Defaults are the 9-1-5 kernels with 64/32 filters of the SRCNN
  family the paper evaluates; no global residual by default (``residual=True``
  adds the input back, the variant of Pham et al. 2019).
* ``DCSRN`` (Chen et al., ISBI 2018): a 3^3 conv with 2k filters, one dense block of
  4 units (each ELU -> 3^3 conv with k = 24 filters, its output concatenated to its
  input), then a 1^3 reconstruction conv to one channel. The paper puts a batch
  normalisation before each ELU; we leave it out by default (``norm=False``) so the
  model is a pure function of its parameters (no batch statistics to carry, train
  and test behave alike); ``norm=True`` uses a LayerNorm over channels instead,
  which needs no running statistics.
* ``ResCNN`` (Du et al. 2020): ``arssr_jax.models.encoders.ResCNN`` with
  ``feature_dim=1``: its output is ``input + conv_end(...)``, i.e. a residual CNN
  predicting a correction of the interpolated input (global residual).

Model directories of baselines: ``config.json`` = ``{"format": "arssr-jax-baseline/1",
"baseline": name, "scale": s, "options": {...}, "metadata": {...}}`` and
``params.msgpack`` (Flax msgpack of the params), written atomically.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from scipy import ndimage

from arssr_jax.errors import ArSSRError
from arssr_jax.models.conv import Conv3d
from arssr_jax.models.encoders import ResCNN

TRICUBIC_BOUNDARY_MODE = "reflect"
BASELINE_FORMAT = "arssr-jax-baseline/1"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"


# --------------------------------------------------------------------------- interpolation


def hr_positions(n: int, m: int) -> np.ndarray:
    """Continuous LR indices of the ``m`` HR voxel centres over an axis of ``n`` LR voxels."""
    return (np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5


def _target_shape(lr_shape, shape=None, scale=None) -> tuple:
    if shape is not None:
        shape = tuple(int(m) for m in shape)
        if len(shape) != len(lr_shape) or any(m < 1 for m in shape):
            raise ArSSRError(f"target shape {shape} must be {len(lr_shape)} positive integers")
        return shape
    if scale is None:
        raise ArSSRError("give a target shape or a scale")
    scales = np.broadcast_to(np.asarray(scale, np.float64), (len(lr_shape),))
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise ArSSRError(f"scale must be positive and finite, got {scale}")
    return tuple(max(1, int(np.floor(n * s + 1e-9))) for n, s in zip(lr_shape, scales))


def interpolation_matrix(n: int, m: int, order: int = 3, mode: str = TRICUBIC_BOUNDARY_MODE) -> np.ndarray:
    """(m, n) matrix W: the order-``order`` spline interpolant of any n samples, evaluated
    at the m HR voxel centres, is W @ samples (prefilter included; float64)."""
    positions = hr_positions(n, m)[None]
    columns = [ndimage.map_coordinates(np.eye(n)[j], positions, order=order, mode=mode, prefilter=order > 1,
                                       output=np.float64) for j in range(n)]
    return np.stack(columns, axis=1)


def _interpolate(lr, order: int, shape=None, scale=None, mode: str = TRICUBIC_BOUNDARY_MODE) -> np.ndarray:
    lr = np.asarray(lr)
    if lr.ndim != 3:
        raise ArSSRError(f"interpolation needs a 3D volume, got shape {lr.shape}")
    shape = _target_shape(lr.shape, shape, scale)
    data = lr.astype(np.float64)
    # A tensor-product spline is separable: apply one 1D interpolation matrix per axis
    # (identical to map_coordinates over the 3D grid, and much cheaper).
    for axis, (n, m) in enumerate(zip(lr.shape, shape)):
        weights = interpolation_matrix(n, m, order, mode)
        data = np.moveaxis(np.tensordot(weights, data, axes=(1, axis)), 0, axis)
    return data.astype(np.float32)


def tricubic(lr, shape=None, scale=None, mode: str = TRICUBIC_BOUNDARY_MODE) -> np.ndarray:
    """Order-3 spline upsampling of ``lr`` onto the voxel-centre HR grid.

    ``shape``: the HR shape (preferred: decode by target shape); else ``scale`` gives
    int(n * s) voxels per axis as ArSSR's grid does. Computed in float64, returned float32.
    """
    return _interpolate(lr, 3, shape, scale, mode)


def nearest(lr, shape=None, scale=None) -> np.ndarray:
    """Nearest-neighbour upsampling onto the same voxel-centre HR grid."""
    return _interpolate(lr, 0, shape, scale, "nearest")


INTERPOLATORS: dict[str, Callable] = {"tricubic": tricubic, "nearest": nearest}


# --------------------------------------------------------------------------- networks


class SRCNN3D(nn.Module):
    """Three convolutions: f1^3 x n1 + ReLU, f2^3 x n2 + ReLU, f3^3 x 1."""

    kernels: Sequence[int] = (9, 1, 5)
    filters: Sequence[int] = (64, 32)
    residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f1, f2, f3 = self.kernels
        n1, n2 = self.filters
        y = nn.relu(Conv3d(n1, kernel=f1, dtype=self.dtype, name="conv1")(x))
        y = nn.relu(Conv3d(n2, kernel=f2, dtype=self.dtype, name="conv2")(y))
        y = Conv3d(1, kernel=f3, dtype=self.dtype, name="conv3")(y)
        return x + y if self.residual else y

    def receptive_radius(self) -> int:
        return sum(k // 2 for k in self.kernels)


class DCSRN(nn.Module):
    """Densely connected SR network: 2k-filter conv, dense units (ELU -> conv k), 1^3 conv."""

    growth: int = 24
    num_units: int = 4
    norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Conv3d(2 * self.growth, dtype=self.dtype, name="conv_in")(x)
        for u in range(self.num_units):
            h = nn.LayerNorm(name=f"norm{u}")(y) if self.norm else y
            h = Conv3d(self.growth, dtype=self.dtype, name=f"unit{u}")(nn.elu(h))
            y = jnp.concatenate([y, h], axis=-1)
        return Conv3d(1, kernel=1, dtype=self.dtype, name="reconstruct")(y)

    def receptive_radius(self) -> int:
        return 1 + self.num_units


class ResCNNBaseline(nn.Module):
    """Du et al.'s residual CNN as a fixed-scale baseline: ResCNN with one output channel."""

    num_features: int = 64
    num_blocks: int = 3
    convs_per_block: int = 6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return ResCNN(feature_dim=1, num_features=self.num_features, num_blocks=self.num_blocks,
                      convs_per_block=self.convs_per_block, dtype=self.dtype, name="net")(x)

    def receptive_radius(self) -> int:
        return 2 + self.num_blocks * self.convs_per_block


BASELINES: dict[str, type] = {"SRCNN3D": SRCNN3D, "DCSRN": DCSRN, "ResCNN": ResCNNBaseline}


def build_baseline(name: str, options: dict | None = None) -> nn.Module:
    if name not in BASELINES:
        raise ArSSRError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    options = dict(options or {})
    try:
        return BASELINES[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except TypeError as error:
        raise ArSSRError(f"bad options {options} for baseline {name}: {error}") from None


def init_baseline(module: nn.Module, rng, shape=(8, 8, 8)) -> dict:
    """Random parameters (their shapes do not depend on ``shape``); one jitted init."""
    volume = jnp.zeros((1, *shape, 1), jnp.float32)
    return jax.jit(lambda key: module.init(key, volume)["params"])(rng)


# --------------------------------------------------------------------------- applying


def _windows(n: int, core: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(window_start, window_stop, core_start, core_stop) covering [0, n) with fixed-size windows.

    Every window has size min(n, core + 2 halo); each core lies at least ``halo``
    voxels inside its window unless the window edge is the volume edge, so a network
    of receptive radius <= halo gives exactly its full-volume output on the core.
    """
    size = min(n, core + 2 * halo)
    core = max(1, size - 2 * halo) if size < n else n
    out = []
    for start in range(0, n, core):
        stop = min(n, start + core)
        ws = min(max(start - halo, 0), n - size)
        out.append((ws, ws + size, start, stop))
    return out


def apply_baseline(module: nn.Module, params, volume, *, tile: int = 64, batch_size: int = 1) -> np.ndarray:
    """Run a baseline CNN on a 3D (cubic-upsampled) volume in overlapping tiles.

    Tiles have a halo of the network's receptive radius, so the result equals the
    whole-volume output exactly (one compile: every window has the same shape).
    """
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ArSSRError(f"baseline input must be a 3D volume, got shape {volume.shape}")
    halo = module.receptive_radius()
    axes = [_windows(n, tile, halo) for n in volume.shape]
    fn = _jitted_apply(module)
    out = np.empty(volume.shape, np.float32)
    jobs = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    for first in range(0, len(jobs), batch_size):
        group = jobs[first:first + batch_size]
        crops = np.stack([volume[a[0]:a[1], b[0]:b[1], c[0]:c[1]] for a, b, c in group])
        pred = np.asarray(fn(params, jnp.asarray(crops[..., None])))[..., 0]
        for (a, b, c), p in zip(group, pred):
            out[a[2]:a[3], b[2]:b[3], c[2]:c[3]] = p[a[2] - a[0]:a[3] - a[0], b[2] - b[0]:b[3] - b[0],
                                                      c[2] - c[0]:c[3] - c[0]]
    return out


@functools.lru_cache(maxsize=16)
def _jitted_apply(module):
    # Modules are frozen dataclasses (hashable): one jitted apply per architecture.
    return jax.jit(lambda params, x: module.apply({"params": params}, x))


def run_baseline(module, params, lr, shape, *, tile: int = 64) -> np.ndarray:
    """LR volume -> tricubic onto ``shape`` -> CNN -> HR estimate (float32)."""
    return apply_baseline(module, params, tricubic(lr, shape=shape), tile=tile)


# --------------------------------------------------------------------------- model directories


def save_baseline(directory, name: str, scale: float, params, options: dict | None = None,
                  metadata: dict | None = None) -> Path:
    """Write a baseline model directory atomically (an existing one is replaced whole)."""
    from arssr_jax.weights.model_dir import write_model_files

    build_baseline(name, options)  # validate
    document = {"format": BASELINE_FORMAT, "baseline": name, "scale": float(scale),
                "options": dict(options or {}), "metadata": metadata or {}}
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    return write_model_files(directory, document, _plain(tree))


def _plain(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def is_baseline_dir(directory) -> bool:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == BASELINE_FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def load_baseline(directory) -> tuple[nn.Module, dict, dict]:
    """(module, params, document) of a baseline directory, shapes checked against its config."""
    directory = Path(directory)
    config_path, params_path = directory / CONFIG_FILE, directory / PARAMS_FILE
    if not config_path.is_file() or not params_path.is_file():
        raise ArSSRError(f"{directory} is not a baseline model directory (needs {CONFIG_FILE} and {PARAMS_FILE})")
    try:
        document = json.loads(config_path.read_text())
        if document.get("format") != BASELINE_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {BASELINE_FORMAT!r}")
        name, scale = document["baseline"], float(document["scale"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ArSSRError(f"{config_path} is not a baseline config ({error}); train or save the baseline again") from None
    module = build_baseline(name, document.get("options"))
    try:
        params = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types
        raise ArSSRError(f"{params_path} is damaged ({type(error).__name__}); save the baseline again") from None
    expected = jax.eval_shape(lambda: init_baseline(module, jax.random.key(0)))
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want != have:
        raise ArSSRError(f"parameters in {directory} do not fit its {name} config; the model files are inconsistent")
    document["scale"] = scale
    return module, params, document


# --------------------------------------------------------------------------- training


def make_training_pairs(hr_volumes, scale: float, degradation: str = "centred") -> list[tuple[np.ndarray, np.ndarray]]:
    """(cubic-upsampled simulated LR, HR) per volume, exactly as the evaluation builds them."""
    from arssr_jax.evaluation.simulate import simulate_lr

    pairs = []
    for hr in hr_volumes:
        hr = np.asarray(hr, np.float32)
        lr = simulate_lr(hr, scale, degradation)
        pairs.append((tricubic(lr, shape=hr.shape), hr))
    return pairs


def _random_patches(pairs, patch: int, batch: int, rng: np.random.Generator):
    xs, ys = [], []
    # One patch shape for the whole batch: patch^3, cut down to the smallest volume.
    size = [min([patch] + [y.shape[a] for _, y in pairs]) for a in range(3)]
    for _ in range(batch):
        x, y = pairs[int(rng.integers(len(pairs)))]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(y.shape, size)]
        region = tuple(slice(a, a + s) for a, s in zip(start, size))
        xs.append(x[region])
        ys.append(y[region])
    return np.stack(xs)[..., None], np.stack(ys)[..., None]


def train_baseline(name: str, hr_volumes, scale: float, steps: int, *, options: dict | None = None,
                   patch_size: int = 32, batch_size: int = 4, learning_rate: float = 1e-4, seed: int = 0,
                   degradation: str = "centred", params=None, progress: bool = False,
                   log: Callable[[int, float], None] | None = None):
    """Train a fixed-scale baseline with Adam on the mean L1 loss of random patch pairs.

    ``hr_volumes``: 3D arrays normalised to [0, 1]. Each step draws ``batch_size``
    patches of ``patch_size``^3 voxels at the same place in the HR volume and in its
    cubic-upsampled simulated LR (:func:`make_training_pairs`). The step is a pure
    jitted function ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    Returns ``(module, params, losses)``.
    """
    import optax

    module = build_baseline(name, options)
    if steps < 1:
        raise ArSSRError(f"steps must be >= 1, got {steps}")
    pairs = make_training_pairs(hr_volumes, scale, degradation)
    rng = np.random.default_rng(seed)
    if params is None:
        params = init_baseline(module, jax.random.key(seed))
    optimiser = optax.adam(learning_rate)
    opt_state = optimiser.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean(jnp.abs(module.apply({"params": p}, x) - y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    from tqdm.auto import tqdm

    losses = []
    bar = tqdm(range(steps), desc=f"train {name} x{scale:g}", disable=None if progress else True)
    for t in bar:
        x, y = _random_patches(pairs, patch_size, batch_size, rng)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(loss))
        if log is not None:
            log(t, losses[-1])
        if progress and t % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return module, params, losses
