"""Pure training and validation steps.

``train_step(state, batch) -> (state, metrics)`` for any ``loss_fn(params, batch)``
(:mod:`arssr_jax.training.tasks` gives ArSSR's and the baselines'). ArSSR: ``batch =
{"lr": (b, n, n, n, 1), "coords": (b, K, 3), "values": (b, K, 1)}``, loss = mean
|pred - values| over all b*K predictions. With ``axis_name`` set (inside ``jax.pmap``) the loss and gradients are
averaged over the mapped devices with ``lax.pmean``, so every device applies the same
update: the global batch's mean gradient, as one device would compute it.

A step whose loss or gradient norm is not finite leaves the state unchanged and
reports ``finite = False``; the loop then stops (the state stays the last good one).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arssr_jax import metrics
from arssr_jax.coords import grid_for_shape, normalised_to_index
from arssr_jax.inference import decode_grid
from arssr_jax.metrics.reference import SSIM_K1, SSIM_K2
from arssr_jax.models import ArSSR, decode_in_blocks, default_decode_block, encode
from arssr_jax.training.state import TrainState


def l1_loss(pred, values, reduce=True):
    error = jnp.abs(pred.astype(jnp.float32) - values.astype(jnp.float32))
    return jnp.mean(error) if reduce else error


def l2_loss(pred, values, reduce=True):
    error = jnp.square(pred.astype(jnp.float32) - values.astype(jnp.float32))
    return jnp.mean(error) if reduce else error


LOSS_FUNCTIONS = {"l1": l1_loss, "l2": l2_loss}


BALANCE_BINS = 10


def intensity_balance_weights(values, exponent: float):
    """Per-sample weights (N, K, 1) for targets ``values`` (N, K, 1): each patch's K targets
    binned into tenths of that patch's own range, a target weighted by (its bin's count) **
    -exponent, scaled to mean 1 per patch. 0: all 1; 1: every occupied bin counts equally."""
    v = values[..., 0].astype(jnp.float32)
    low, high = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
    relative = (v - low) / jnp.maximum(high - low, 1e-12)
    bins = jnp.clip((relative * BALANCE_BINS).astype(jnp.int32), 0, BALANCE_BINS - 1)
    counts = jax.vmap(lambda b: jnp.bincount(b, length=BALANCE_BINS))(bins)
    weights = jnp.take_along_axis(counts, bins, axis=1).astype(jnp.float32) ** -exponent
    return jax.lax.stop_gradient(weights / weights.mean(axis=1, keepdims=True))[..., None]


SSIM_C1, SSIM_C2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # the evaluation's (K1 R)^2, (K2 R)^2 for normalised intensities (R = 1)


def cube_ssim(pred, values, cube_voxels: int):
    """SSIM of each run of ``cube_voxels`` consecutive targets (one cube of
    ``DataConfig.sample_cube``): (N, K, 1) -> (N, K / cube_voxels). The evaluation's formula
    (sample covariance, the metric's K1 and K2, data range 1) with the cube as the window."""
    n = cube_voxels
    x = pred[..., 0].astype(jnp.float32).reshape(pred.shape[0], -1, n)
    y = values[..., 0].astype(jnp.float32).reshape(values.shape[0], -1, n)
    mx, my = x.mean(-1), y.mean(-1)
    dx, dy = x - mx[..., None], y - my[..., None]
    vx, vy = (dx * dx).sum(-1) / (n - 1), (dy * dy).sum(-1) / (n - 1)
    cxy = (dx * dy).sum(-1) / (n - 1)
    return ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))


def arssr_loss(model: ArSSR, loss: str = "l1", balance: float = 0.0, ssim_weight: float = 0.0,
               cube: int = 1, cube_targets: Optional[int] = None) -> Callable:
    """Mean L1 (or L2) of the model's predictions at the batch's coordinates; with
    ``balance`` > 0, weighted by :func:`intensity_balance_weights` (rare intensities count more);
    with ``ssim_weight`` > 0, plus ``ssim_weight`` x the mean (1 - SSIM) of the batch's
    ``cube``^3-voxel cubes (:func:`cube_ssim`), so an output smoother than the truth costs.
    The cubes are the first ``cube_targets`` targets (None: all of them)."""

    block = default_decode_block()
    error = LOSS_FUNCTIONS[loss]

    def loss_fn(params, batch):
        features = encode(model, params, batch["lr"])
        pred = decode_in_blocks(model, params, features, batch["coords"], block)
        if not balance:
            value = error(pred, batch["values"])
        else:
            per_sample = error(pred, batch["values"], reduce=False)
            value = jnp.mean(per_sample * intensity_balance_weights(batch["values"], balance))
        if ssim_weight:
            n = pred.shape[1] if cube_targets is None else cube_targets
            value = value + ssim_weight * jnp.mean(1.0 - cube_ssim(pred[:, :n], batch["values"][:, :n], cube ** 3))
        return value

    return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable,
                    axis_name: Optional[str] = None) -> Callable:
    """The pure step for ``loss_fn(params, batch)``/``tx``; pass ``axis_name`` under pmap."""

    def train_step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": loss, "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "grad_norm": grad_norm, "finite": finite}
        return new_state, metrics

    return train_step


class Validator:
    """Predicts every voxel of fixed validation patches; reports mean L1 and PSNR.

    ``samples``: dicts with ``lr (n, n, n, 1)``, ``hr (m, m, m, 1)``, ``coords (m^3, 3)``,
    ``scale (3,)`` (as ``arssr_jax.data.validation_samples`` makes them: ``coords`` are the
    HR patch's voxel centres, ``coords.make_grid(m, m, m)``). The encoder runs once per patch
    (one compilation per LR shape); the HR voxel centres are decoded by
    :func:`arssr_jax.inference.decode_grid`, in chunks of at most ``chunk`` voxels (one
    compilation per HR shape), as inference decodes. PSNR uses data_range = max(gt) - min(gt)
    per patch (the paper's convention); the metrics are means over patches, plus per scale.
    """

    def __init__(self, model: ArSSR, samples, chunk: int = 32768):
        self.model = model
        self.samples = list(samples)
        self.chunk = int(chunk)
        self._encode = jax.jit(lambda params, lr: model.apply({"params": params}, lr, method=ArSSR.encode))

    def predict(self, params, sample) -> np.ndarray:
        """The prediction at every HR voxel centre of one sample, shaped like ``sample["hr"]``."""
        features = self._encode(params, jnp.asarray(sample["lr"])[None])[0]
        hr_shape = np.shape(sample["hr"])
        grid = grid_for_shape(features.shape[:3], hr_shape[:3])
        return decode_grid(self.model, params, features, grid, chunk=self.chunk).reshape(hr_shape)

    def __call__(self, params) -> dict:
        if not self.samples:
            return {}
        l1s, psnrs, by_scale = [], [], {}
        for sample in self.samples:
            pred = self.predict(params, sample)
            hr = np.asarray(sample["hr"], np.float32)
            l1, p = float(np.mean(np.abs(pred - hr))), psnr(pred, hr)
            l1s.append(l1)
            psnrs.append(p)
            by_scale.setdefault(_scale_key(sample), []).append(p)
        return _summary(l1s, psnrs, by_scale)

    interpolation_name = "trilinear"

    def interpolation(self) -> dict:
        """The same metrics for trilinear interpolation of the LR patch at the HR voxel
        centres (edge values repeated beyond the outermost LR voxel centres)."""
        from scipy import ndimage

        l1s, psnrs, by_scale = [], [], {}
        for sample in self.samples:
            hr = np.asarray(sample["hr"], np.float32)
            lr = np.asarray(sample["lr"], np.float64)[..., 0]
            coords = np.asarray(sample["coords"], np.float64)
            index = normalised_to_index(coords, np.asarray(lr.shape, np.float64))
            pred = ndimage.map_coordinates(lr, index.T, order=1, mode="nearest").reshape(hr.shape)
            l1s.append(float(np.mean(np.abs(pred - hr))))
            psnrs.append(psnr(pred, hr))
            by_scale.setdefault(_scale_key(sample), []).append(psnrs[-1])
        return _summary(l1s, psnrs, by_scale)


class BaselineValidator:
    """A fixed-scale baseline CNN on whole validation patches: mean L1 and PSNR.

    Each patch's input is its LR tricubic-upsampled onto the HR grid (computed once);
    :meth:`interpolation` scores that input itself, the bar the CNN must clear.
    """

    interpolation_name = "tricubic"

    def __init__(self, module, samples):
        from arssr_jax.interpolation import tricubic

        self.samples = list(samples)
        self.inputs = [tricubic(s["lr"][..., 0], shape=s["hr"].shape[:3]) for s in self.samples]
        self._apply = jax.jit(lambda params, x: module.apply({"params": params}, x))

    def predict(self, params, index: int) -> np.ndarray:
        x = jnp.asarray(self.inputs[index])[None, ..., None]
        return np.asarray(self._apply(params, x))[0]

    def _score(self, predict) -> dict:
        l1s, psnrs, by_scale = [], [], {}
        for i, sample in enumerate(self.samples):
            hr = np.asarray(sample["hr"], np.float32)
            pred = np.asarray(predict(i), np.float32).reshape(hr.shape)
            l1s.append(float(np.mean(np.abs(pred - hr))))
            psnrs.append(psnr(pred, hr))
            by_scale.setdefault(_scale_key(sample), []).append(psnrs[-1])
        return _summary(l1s, psnrs, by_scale)

    def __call__(self, params) -> dict:
        return self._score(lambda i: self.predict(params, i))

    def interpolation(self) -> dict:
        return self._score(lambda i: self.inputs[i])


def _scale_key(sample) -> str:
    return f"{float(np.asarray(sample['scale']).reshape(-1)[0]):g}"


def _summary(l1s, psnrs, by_scale) -> dict:
    if not l1s:
        return {}
    ordered = sorted(by_scale.items(), key=lambda kv: float(kv[0]))
    return {"val_l1": float(np.mean(l1s)), "val_psnr": float(np.mean(psnrs)),
            "val_psnr_by_scale": {k: float(np.mean(v)) for k, v in ordered}}


PSNR_CAP = 100.0  # dB: an exact match stays a finite number in log.jsonl and the averages


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """:func:`arssr_jax.metrics.psnr` (data_range = max(gt) - min(gt); 1 for a constant patch),
    capped at :data:`PSNR_CAP`."""
    return min(PSNR_CAP, metrics.psnr(pred, gt, data_range=float(np.ptp(gt)) or 1.0))
