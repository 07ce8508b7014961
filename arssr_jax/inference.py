"""Whole-volume super-resolution: normalise, encode in tiles, decode in fixed-size chunks.

The encoder runs once per tile (never once per HR slab as the reference CLI does).
Tiles overlap by the encoder's receptive radius, so the tiled feature map equals the
untiled one. Decoding walks the HR grid in chunks of a fixed number of voxels through
one compiled function: the chunk's coordinates are computed inside it from the chunk's
start index and the grid's index map, so no coordinate array of the whole grid exists.
Inside a chunk the MLP runs over blocks of voxels (4096 on the CPU) that stay in cache.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from arssr_jax import coords as grids
from arssr_jax.consistency import (
    OUTPUT_COPIES,
    back_project,
    back_project_slices,
    grid_scale,
    grid_scales,
    is_super_resolution,
    slices_measurable,
)
from arssr_jax.errors import ArSSRError
from arssr_jax.intensity import Normalisation
from arssr_jax.memory import available_memory_bytes
from arssr_jax.models import (
    ArSSR,
    ModelConfig,
    activation_bytes_per_voxel,
    decode_in_blocks,
    default_decode_block,
    encode,
    receptive_radius,
)
from arssr_jax.options import InferenceOptions
from arssr_jax.progress import progress_bar
from arssr_jax.slice_profile import thick_axis
from arssr_jax.tiling import choose_tile_core, tiled_apply

BYTES = 4  # float32


# --------------------------------------------------------------------------- memory


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- encoding


@functools.partial(jax.jit, static_argnums=0)
def _encode_one(model: ArSSR, params, volume):
    return encode(model, params, volume[None, ..., None])[0]


def encode_volume(model: ArSSR, params, volume, tile=None, max_tile_bytes=None, progress=False) -> np.ndarray:
    """Feature map (X, Y, Z, F) of one LR volume (X, Y, Z), encoded tile by tile.

    ``tile``: core size per axis (3 ints); by default the largest that keeps one tile's
    activations under ``max_tile_bytes`` (half of free memory, at most 16 GiB).
    """
    config = model.config
    halo = receptive_radius(config)
    shape = volume.shape
    if tile is None:
        budget = max_tile_bytes or min(16 * 2**30, available_memory_bytes() // 2)
        core = choose_tile_core(shape, halo, max(1, budget // activation_bytes_per_voxel(config)))
    else:
        core = tuple(tile)
    return tiled_apply(lambda window: _encode_one(model, params, jnp.asarray(window)), volume, core, halo,
                       channels=config.encoded_channels, progress=progress, desc="encode")


# --------------------------------------------------------------------------- decoding


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _decode_chunk(model: ArSSR, params, features, to_normalised, hr_shape, chunk, block, start):
    """Intensities of HR voxels start .. start + chunk - 1 (flat, row-major; clipped at the end).

    The MLP runs over ``block`` voxels at a time (``chunk`` is a multiple of it).
    """
    total = math.prod(hr_shape)
    flat = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int32), total - 1)
    ijk = jnp.stack(jnp.unravel_index(flat, hr_shape), axis=-1).astype(jnp.float32)
    coords = ijk @ to_normalised[:3, :3].T + to_normalised[:3, 3]
    return decode_in_blocks(model, params, features[None], coords[None], block)[0, :, 0]


def default_chunk() -> int:
    return 2**20 if jax.default_backend() != "cpu" else 2**16


def chunk_layout(total: int, chunk: int, block: int | None) -> tuple[int, int]:
    """(chunk, block) for decoding ``total`` voxels: block divides chunk, chunk <= the request.

    Among 1/2 .. 1 times the requested number of blocks per chunk, the one that pads the
    last chunk least (the largest of equals): 884,736 voxels in 65,536-voxel chunks would
    waste 3.7 % on padding, 12 blocks of 4096 per chunk waste nothing.
    """
    block = min(block or chunk, chunk, total)
    blocks = -(-total // block)
    most = max(1, min(chunk, total) // block)
    per_chunk = min(range(-(-most // 2), most + 1), key=lambda b: (-(-blocks // b) * b, -b))
    return per_chunk * block, block


def decode_grid(model: ArSSR, params, features, grid: grids.TargetGrid, chunk=None, progress=False,
                block=None) -> np.ndarray:
    """Decode a feature map (X, Y, Z, F) at every voxel centre of ``grid`` -> (HR shape) float32.

    ``chunk``: voxels per compiled call (at most; see :func:`chunk_layout`); ``block``:
    voxels per MLP pass inside a call (default
    :func:`arssr_jax.models.default_decode_block`).
    """
    chunk = int(chunk or default_chunk())
    lr_shape = features.shape[:3]
    to_normalised = jnp.asarray(grids.index_map_to_normalised(grid.index_map, lr_shape), jnp.float32)
    features = jnp.asarray(features)
    total = grid.num_voxels
    chunk, block = chunk_layout(total, chunk, block or default_decode_block())
    out = np.empty(total, np.float32)
    starts = range(0, total, chunk)
    pending = None  # keep one chunk in flight while the previous one is copied out
    for start in progress_bar(starts, desc="decode", unit="chunk", enabled=progress):
        values = _decode_chunk(model, params, features, to_normalised, tuple(grid.shape), chunk, block, start)
        if pending is not None:
            _store(out, *pending, total)
        pending = (start, values)
    if pending is not None:
        _store(out, *pending, total)
    return out.reshape(grid.shape)


def _store(out, start, values, total):
    n = min(len(values), total - start)
    out[start : start + n] = np.asarray(values[:n])


# --------------------------------------------------------------------------- the main job


def resolve_model(model, padding=None) -> tuple[ArSSR, dict, InferenceOptions]:
    """(module, params, the options saved with the model) from a spec (None = the shipped
    default, a directory, a training workdir, a name) or a ``(module, params)`` pair (default
    options); ``padding`` overrides the model's own (None: keep it)."""
    if isinstance(model, tuple) and len(model) == 2:
        (module, params), options = model, InferenceOptions()
    else:
        from arssr_jax.weights import load_model, load_options

        module, params, _ = load_model(model)
        options = load_options(model)
    if padding is not None and padding != module.config.padding:
        try:
            module = ArSSR(module.config.replace(padding=padding))
        except ValueError as error:
            raise ArSSRError(str(error)) from None
    return module, params, options


def target_grid(lr_shape, *, scale=None, shape=None, voxel_size=None, lr_voxel_size=None, grid=None, like=None,
                lr_affine=None) -> grids.TargetGrid:
    """The HR grid from exactly one of ``scale``, ``shape``, ``voxel_size`` (mm; with the
    input's ``lr_voxel_size``), ``like`` (an image path, or its (shape, affine), whose grid is
    used; with the input's ``lr_affine``) or ``grid``."""
    given = [k for k, v in dict(scale=scale, shape=shape, voxel_size=voxel_size, like=like, grid=grid).items()
             if v is not None]
    if len(given) != 1:
        raise ArSSRError(f"give exactly one of scale, shape, voxel_size, like or grid (got {', '.join(given) or 'none'})")
    if scale is not None:
        return grids.grid_for_scale(lr_shape, scale)
    if shape is not None:
        return grids.grid_for_shape(lr_shape, shape)
    if voxel_size is not None:
        if lr_voxel_size is None:
            raise ArSSRError("voxel_size needs the input's voxel size (lr_voxel_size), e.g. from its affine")
        return grids.grid_for_voxel_size(lr_shape, lr_voxel_size, voxel_size)
    if like is not None:
        like_shape, like_affine = like if isinstance(like, tuple) else like_grid(like)
        return grids.grid_like(lr_affine, like_shape, like_affine)
    return grid


def like_grid(like, out_paths=()) -> tuple:
    """(shape, affine) of the ``--like`` image (its header only), refused when it is one of the
    outputs (it would be overwritten)."""
    from arssr_jax import nifti

    for out_path in out_paths:
        if os.path.realpath(like) == os.path.realpath(out_path):
            raise ArSSRError(f"output {out_path} is the --like image; write to another path")
    return nifti.load_grid(like)


MAX_OUTPUT_VOXELS = 2**31 - 1


def check_fits_in_memory(lr_shape, grid: grids.TargetGrid, config: ModelConfig, what="the output",
                         output_copies: int = 1) -> None:
    """Refuse before allocating when the output (``output_copies`` arrays of it), the feature map
    and a tile would not fit."""
    if grid.num_voxels > MAX_OUTPUT_VOXELS:
        raise ArSSRError(
            f"{what} would have {grid.num_voxels:,} voxels ({'x'.join(map(str, grid.shape))}); "
            "that is more than one volume can hold: use a smaller scale or a larger voxel size"
        )
    needed = BYTES * (output_copies * grid.num_voxels + 2 * math.prod(lr_shape) * config.encoded_channels)
    available = available_memory_bytes()
    if needed > 0.8 * available:
        raise ArSSRError(
            f"{what} ({'x'.join(map(str, grid.shape))} voxels) and the feature map need about {_gib(needed)} "
            f"but only {_gib(available)} is free: use a smaller scale or voxel size, or crop the input"
        )


class Upsampler:
    """A model and its inference options, resolved and checked once, for any number of volumes:
    the compiled encoder and decoder are reused across inputs of the same shape (and target
    grid shape).

    ```python
    up = Upsampler()                       # the shipped model; or a directory, workdir, name, (module, params)
    hr = up(volume, scale=2)               # arrays (nibabel order) -> array
    up.nifti("a.nii.gz", "a_sr.nii.gz", scale=2)   # files; returns the written Volume
    ```

    ``options``: :class:`arssr_jax.options.InferenceOptions` to start from (default: those
    saved with the model); keyword ``overrides`` (``consistency``, ``normalize``, ``chunk``,
    ``tile``, ``slice_profile``, ``slice_thickness``) override them (None: keep); ``padding``
    overrides the model's feature padding.
    """

    def __init__(self, model=None, *, options: InferenceOptions | None = None, padding=None, **overrides):
        InferenceOptions().replace(**overrides)  # a bad value fails before the model is loaded
        module, params, saved = resolve_model(model, padding)
        self.options = (options or saved).replace(**overrides)
        # On the device once, not converted again for every call.
        self.module, self.params = module, jax.device_put(params) if params is not None else None

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @property
    def model(self):
        """The ``(module, params)`` pair, accepted wherever a model spec is."""
        return self.module, self.params

    def __call__(self, volume, *, scale=None, shape=None, voxel_size=None, lr_voxel_size=None, grid=None,
                 adapt=None, progress=False) -> np.ndarray:
        """Super-resolve a 3D array (nibabel order) onto the grid given by exactly one of:

        - ``scale``: one factor or three; int(n * s) voxels per axis (the reference's grid);
        - ``shape``: an exact HR shape over the same field of view;
        - ``voxel_size`` (mm, one or three) with the input's ``lr_voxel_size``;
        - ``grid``: a :class:`arssr_jax.coords.TargetGrid` (e.g. from ``grid_like``).

        ``adapt``: fine-tune on the input itself first (an :class:`arssr_jax.adapt.Adaptation`;
        ``lr_voxel_size`` tells it which axis is thick, else the scale does).
        """
        volume = checked_input(volume)
        grid = target_grid(volume.shape, scale=scale, shape=shape, voxel_size=voxel_size,
                           lr_voxel_size=lr_voxel_size, grid=grid)
        return self.decode_onto(volume, grid, lr_voxel_size=lr_voxel_size, adapt=adapt, progress=progress)

    def consistency_step(self, grid: grids.TargetGrid) -> float:
        """The data-consistency step for this grid (by its scale); 0 where it is no super-resolution."""
        return self.options.step_for(grid_scale(grid)) if is_super_resolution(grid) else 0.0

    def agree_with_input(self, hr, lr, grid: grids.TargetGrid, lr_voxel_size=None) -> np.ndarray:
        """The consistency step: along a thick-slice input's thick axis with its slice profile
        (``slice_profile``; the input's voxel size, else the grid's scales, tells the axis), else
        ``consistency``'s point step."""
        profile, thickness = self.options.slice_profile, self.options.slice_thickness
        if profile is not None:
            scales = grid_scales(grid)
            spacing = scales if lr_voxel_size is None else tuple(lr_voxel_size)
            axis = thick_axis(spacing)
            if axis is not None and slices_measurable(grid, lr.shape, axis):
                width = None if thickness is None else thickness / (spacing[axis] / scales[axis])  # in HR voxels
                return back_project_slices(hr, lr, grid, axis, profile, width)
        return back_project(hr, lr, grid, self.consistency_step(grid))

    def decode_onto(self, volume: np.ndarray, grid: grids.TargetGrid, lr_voxel_size=None, adapt=None,
                    progress=False) -> np.ndarray:
        """The pipeline on a checked input and its grid: normalise, adapt (optional), encode,
        decode, consistency step, undo the normalisation; refuses a non-finite result."""
        steps = self.consistency_step(grid) or adapt is not None  # adapting may choose its own step
        check_fits_in_memory(volume.shape, grid, self.config, output_copies=OUTPUT_COPIES if steps else 1)
        norm = Normalisation.of(volume) if self.options.normalize else None
        lr = norm.apply(volume) if norm else np.asarray(volume, np.float32)
        # Adaptation fine-tunes on the normalised input, as the network sees it (the training
        # stack it needs is imported by the adaptation object, never by this module).
        up = self if adapt is None else adapt.adapted(self, lr, lr_voxel_size, grid, progress=progress)
        features = encode_volume(up.module, up.params, lr, tile=self.options.tile, progress=progress)
        hr = decode_grid(up.module, up.params, features, grid, chunk=self.options.chunk, progress=progress)
        hr = up.agree_with_input(hr, lr, grid, lr_voxel_size)
        hr = norm.undo(hr) if norm else hr
        if not np.all(np.isfinite(hr)):
            bad = int(hr.size - np.count_nonzero(np.isfinite(hr)))
            raise ArSSRError(f"the model produced {bad} NaN/Inf voxel(s) of {hr.size}; nothing was written: check "
                             "the model's weights, and that the input's intensities are in the range it was trained on")
        return hr

    def nifti(self, in_path, out_path, *, scale=None, voxel_size=None, like=None, volume_index=None, adapt=None,
              progress=False):
        """Read a NIfTI, super-resolve it onto the grid of exactly one of ``scale`` (one or three
        factors), ``voxel_size`` (mm, one or three) or ``like`` (an image whose grid, any affine,
        is decoded onto directly) and write it atomically; returns the written Volume.
        ``adapt``: fine-tune on the scan itself first (:class:`arssr_jax.adapt.Adaptation`)."""
        from arssr_jax import nifti

        nifti.check_output_path(out_path, in_path)
        like = like_grid(like, [out_path]) if isinstance(like, (str, os.PathLike)) else like
        lr = nifti.load(in_path, volume_index=volume_index)
        grid = target_grid(lr.shape, scale=scale, voxel_size=voxel_size, lr_voxel_size=lr.voxel_size, like=like,
                           lr_affine=lr.affine)
        hr = self.decode_onto(lr.data, grid, lr_voxel_size=lr.voxel_size, adapt=adapt, progress=progress)
        result = nifti.Volume(hr, grid.affine(lr.affine), lr.header)
        nifti.save(result, out_path, like_header=lr.header, description=nifti.output_description(lr.header))
        return result


def upsample(volume, model=None, *, scale=None, shape=None, voxel_size=None, lr_voxel_size=None, grid=None,
             adapt=None, progress=False, **options) -> np.ndarray:
    """Super-resolve a 3D array with ``model`` (None: the shipped default; a directory, workdir,
    name or ``(module, params)`` pair) onto the grid of exactly one of ``scale``, ``shape``,
    ``voxel_size`` (with ``lr_voxel_size``) or ``grid``: :class:`Upsampler` once. ``options``:
    ``padding`` and the :class:`~arssr_jax.options.InferenceOptions` (``consistency``,
    ``normalize``, ``chunk``, ``tile``); ``adapt``: fine-tune on the input first
    (:class:`arssr_jax.adapt.Adaptation`)."""
    return Upsampler(model, **options)(volume, scale=scale, shape=shape, voxel_size=voxel_size,
                                       lr_voxel_size=lr_voxel_size, grid=grid, adapt=adapt, progress=progress)


def upsample_nifti(in_path, out_path, model=None, *, scale=None, voxel_size=None, like=None, volume_index=None,
                   adapt=None, progress=False, **options):
    """Read a NIfTI, super-resolve it and write it atomically (:meth:`Upsampler.nifti` once);
    returns the written :class:`arssr_jax.nifti.Volume`."""
    return Upsampler(model, **options).nifti(in_path, out_path, scale=scale, voxel_size=voxel_size, like=like,
                                             volume_index=volume_index, adapt=adapt, progress=progress)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def checked_input(volume) -> np.ndarray:
    """The API's input as a real 3D array, or an ArSSRError naming what is wrong with it."""
    try:
        volume = np.asarray(volume)
    except (TypeError, ValueError) as error:  # ragged nested lists and the like
        raise ArSSRError(f"upsample takes a 3D array of numbers; this input is not one ({error})") from None
    if volume.dtype.kind == "c":
        raise ArSSRError(f"the input volume is complex ({volume.dtype}); pass its magnitude (np.abs) or real part")
    if volume.dtype.kind not in "biuf":
        raise ArSSRError(f"the input volume has dtype {volume.dtype}, not real numbers; pass a numeric array "
                         "(e.g. np.asarray(volume, np.float32))")
    if volume.ndim != 3:
        raise ArSSRError(f"upsample takes a 3D volume, got shape {volume.shape}")
    if volume.size == 0:
        raise ArSSRError(f"the input volume is empty (shape {volume.shape}); give a volume with voxels")
    if volume.dtype.kind == "f":
        finite = np.isfinite(volume)
        if not finite.all():
            raise ArSSRError(f"the input volume has {int(volume.size - np.count_nonzero(finite))} NaN/Inf voxels; "
                             "fix or mask them")
        largest = float(np.max(np.abs(volume)))
        if largest > _FLOAT32_MAX:
            raise ArSSRError(f"the input volume has values up to {largest:.3g}, beyond float32's range (3.4e+38); "
                             "rescale it (e.g. divide by its maximum) first")
    return volume
