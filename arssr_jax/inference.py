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
from arssr_jax.consistency import OUTPUT_COPIES, back_project, grid_scale, is_super_resolution, step_at
from arssr_jax.errors import ArSSRError
from arssr_jax.intensity import Normalisation
from arssr_jax.models import (
    ArSSR,
    ModelConfig,
    activation_bytes_per_voxel,
    decode_in_blocks,
    default_decode_block,
    encode,
    receptive_radius,
)
from arssr_jax.progress import progress_bar
from arssr_jax.tiling import choose_tile_core, tiled_apply

BYTES = 4  # float32


# --------------------------------------------------------------------------- memory


def available_memory_bytes() -> int:
    """Free memory of the default device: MemAvailable on a CPU host, free HBM on an accelerator."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- encoding


@functools.partial(jax.jit, static_argnums=0)
def _encode_one(model: ArSSR, params, volume):
    return encode(model, params, volume[None, ..., None])[0]


def encode_volume(model: ArSSR, params, volume, tile=None, max_tile_bytes=None, progress=False) -> np.ndarray:
    """Feature map (X, Y, Z, F) of one LR volume (X, Y, Z), encoded tile by tile.

    ``tile``: core size per axis (int or 3 ints); by default the largest that keeps one
    tile's activations under ``max_tile_bytes`` (half of free memory, at most 16 GiB).
    """
    config = model.config
    halo = receptive_radius(config)
    shape = volume.shape
    if tile is None:
        budget = max_tile_bytes or min(16 * 2**30, available_memory_bytes() // 2)
        core = choose_tile_core(shape, halo, max(1, budget // activation_bytes_per_voxel(config)))
    else:
        core = (int(tile),) * 3 if np.ndim(tile) == 0 else tuple(int(t) for t in tile)
        if len(core) != 3 or min(core) < 1:
            raise ArSSRError(f"--tile must be a positive number of LR voxels (or three), got {tile}")
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
    if chunk < 1:
        raise ArSSRError(f"--chunk must be a positive number of voxels, got {chunk}")
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


def resolve_model(model, padding=None, dim_damping=None):
    """(ArSSR module, params) from a spec (None = shipped default, a directory, a name) or a pair;
    ``padding`` and ``dim_damping`` override the model's own (None: keep it)."""
    if isinstance(model, tuple) and len(model) == 2:
        module, params = model
    else:
        from arssr_jax.weights import load_model

        module, params, _ = load_model(model)
    changes = {name: value for name, value in (("padding", padding), ("dim_damping", dim_damping))
               if value is not None and value != getattr(module.config, name)}
    if changes:
        try:
            module = ArSSR(module.config.replace(**changes))
        except ValueError as error:
            raise ArSSRError(str(error)) from None
    return module, params


def consistency_schedule(config: ModelConfig, consistency=None):
    """The model's own data-consistency step (or schedule of steps per scale), or
    ``consistency`` checked as a model's would be. Not folded into the module: the compiled
    encoder and decoder do not depend on it."""
    if consistency is None:
        return config.consistency
    try:
        return config.replace(consistency=consistency).consistency
    except ValueError as error:
        raise ArSSRError(str(error)) from None


def consistency_step(schedule, grid: grids.TargetGrid) -> float:
    """The step a schedule gives this grid (by its scale); 0 where the grid is no super-resolution."""
    return step_at(schedule, grid_scale(grid)) if is_super_resolution(grid) else 0.0


def target_grid(lr_shape, *, scale=None, shape=None, voxel_size=None, lr_voxel_size=None, grid=None):
    """The HR grid from exactly one of scale, shape, voxel_size (with lr_voxel_size) or grid."""
    given = [k for k, v in dict(scale=scale, shape=shape, voxel_size=voxel_size, grid=grid).items() if v is not None]
    if len(given) != 1:
        raise ArSSRError(f"give exactly one of scale, shape, voxel_size or grid (got {', '.join(given) or 'none'})")
    if scale is not None:
        return grids.grid_for_scale(lr_shape, scale)
    if shape is not None:
        return grids.grid_for_shape(lr_shape, shape)
    if voxel_size is not None:
        if lr_voxel_size is None:
            raise ArSSRError("voxel_size needs the input's voxel size (lr_voxel_size), e.g. from its affine")
        return grids.grid_for_voxel_size(lr_shape, lr_voxel_size, voxel_size)
    return grid


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


def upsample(
    volume,
    model=None,
    *,
    scale=None,
    shape=None,
    voxel_size=None,
    lr_voxel_size=None,
    grid=None,
    normalize=True,
    padding=None,
    consistency=None,
    dim_damping=None,
    chunk=None,
    tile=None,
    progress=False,
) -> np.ndarray:
    """Super-resolve a 3D array (nibabel order) onto the grid given by exactly one of:

    - ``scale``: one factor or three; int(n * s) voxels per axis (the reference's grid);
    - ``shape``: an exact HR shape over the same field of view;
    - ``voxel_size`` (mm, one or three) with the input's ``lr_voxel_size``;
    - ``grid``: a :class:`arssr_jax.coords.TargetGrid` (e.g. from ``grid_like``).

    ``model``: None (the shipped default model), a model directory, a training workdir,
    a shipped name, or a ``(module, params)`` pair. ``normalize``: map the input's 0.5th and
    99.5th percentiles to 0 and 1 (:class:`arssr_jax.intensity.Normalisation`, the rule the
    training volumes get) and restore its scale on output (off: intensities are fed as they are).
    ``consistency``: the fraction of the output's disagreement with the input removed after
    decoding, or (scale, step) pairs (:mod:`arssr_jax.consistency`; default: the model's own,
    0 for converted weights). ``dim_damping``: override the model's damping of the network's
    correction in dim voxels (``ModelConfig.dim_damping``; 0: the correction as it is).
    """
    volume = _checked_input(volume)
    grid = target_grid(volume.shape, scale=scale, shape=shape, voxel_size=voxel_size, lr_voxel_size=lr_voxel_size, grid=grid)
    module, params = resolve_model(model, padding, dim_damping)
    step = consistency_step(consistency_schedule(module.config, consistency), grid)
    copies = OUTPUT_COPIES if step else 1
    check_fits_in_memory(volume.shape, grid, module.config, output_copies=copies)
    norm = Normalisation.of(volume) if normalize else None
    lr = norm.apply(volume) if norm else np.asarray(volume, np.float32)
    features = encode_volume(module, params, lr, tile=tile, progress=progress)
    hr = decode_grid(module, params, features, grid, chunk=chunk, progress=progress)
    hr = back_project(hr, lr, grid, step)
    hr = norm.undo(hr) if norm else hr
    if not np.all(np.isfinite(hr)):
        bad = int(hr.size - np.count_nonzero(np.isfinite(hr)))
        raise ArSSRError(f"the model produced {bad} NaN/Inf voxel(s) of {hr.size}; nothing was written: check the "
                         "model's weights, and that the input's intensities are in the range it was trained on")
    return hr


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _checked_input(volume) -> np.ndarray:
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


class Upsampler:
    """A model loaded once, for many volumes: the compiled encoder and decoder are reused
    across inputs of the same shape (and target grid shape).

    ```python
    up = Upsampler()                     # the shipped model; or a directory, workdir, name, (module, params)
    hr = up(volume, scale=2)             # arrays, as :func:`upsample`
    up.nifti("a.nii.gz", "a_sr.nii.gz", scale=2)   # files, as :func:`upsample_nifti`
    ```

    ``padding``, ``consistency`` and ``dim_damping`` override the model's own; ``normalize``,
    ``chunk`` and ``tile`` set defaults that a call may override.
    """

    def __init__(self, model=None, *, padding=None, consistency=None, dim_damping=None, normalize=True, chunk=None,
                 tile=None):
        module, params = resolve_model(model, padding, dim_damping)
        self.consistency = consistency_schedule(module.config, consistency)
        # On the device once, not converted again for every call.
        self.module, self.params = module, jax.device_put(params) if params is not None else None
        self.config = module.config
        self.normalize, self.chunk, self.tile = normalize, chunk, tile

    @property
    def model(self):
        """The ``(module, params)`` pair, accepted wherever a model spec is."""
        return self.module, self.params

    def _options(self, normalize, chunk, tile):
        return dict(consistency=self.consistency, normalize=self.normalize if normalize is None else normalize,
                    chunk=self.chunk if chunk is None else chunk, tile=self.tile if tile is None else tile)

    def __call__(self, volume, *, scale=None, shape=None, voxel_size=None, lr_voxel_size=None, grid=None,
                 normalize=None, chunk=None, tile=None, progress=False) -> np.ndarray:
        """As :func:`upsample` with this model."""
        return upsample(volume, self.model, scale=scale, shape=shape, voxel_size=voxel_size,
                        lr_voxel_size=lr_voxel_size, grid=grid, progress=progress,
                        **self._options(normalize, chunk, tile))

    def nifti(self, in_path, out_path, *, scale=None, voxel_size=None, like=None, volume_index=None,
              normalize=None, chunk=None, tile=None, progress=False):
        """As :func:`upsample_nifti` with this model; returns the written Volume."""
        return upsample_nifti(in_path, out_path, self.model, scale=scale, voxel_size=voxel_size, like=like,
                              volume_index=volume_index, progress=progress, **self._options(normalize, chunk, tile))


def upsample_nifti(
    in_path,
    out_path,
    model=None,
    *,
    scale=None,
    voxel_size=None,
    like=None,
    volume_index=None,
    normalize=True,
    padding=None,
    consistency=None,
    dim_damping=None,
    chunk=None,
    tile=None,
    progress=False,
):
    """Read a NIfTI, super-resolve it onto the chosen grid and write it atomically.

    Exactly one of ``scale`` (one or three factors), ``voxel_size`` (mm, one or three) or
    ``like`` (path of an image whose grid, any affine, is decoded onto directly).
    Returns the written :class:`arssr_jax.nifti.Volume`.
    """
    from arssr_jax import nifti

    given = [k for k, v in dict(scale=scale, voxel_size=voxel_size, like=like).items() if v is not None]
    if len(given) != 1:
        raise ArSSRError(f"give exactly one of --scale, --voxel-size or --like (got {', '.join(given) or 'none'})")
    nifti.check_output_path(out_path, in_path)
    if like is not None and os.path.realpath(like) == os.path.realpath(out_path):
        raise ArSSRError(f"output {out_path} is the --like image; write to another path")
    lr = nifti.load(in_path, volume_index=volume_index)
    if like is not None:
        like_shape, like_affine = nifti.load_grid(like)  # checked before any work
        grid = grids.grid_like(lr.affine, like_shape, like_affine)
    elif scale is not None:
        grid = grids.grid_for_scale(lr.shape, scale)
    else:
        grid = grids.grid_for_voxel_size(lr.shape, lr.voxel_size, voxel_size)
    hr = upsample(
        lr.data, model, grid=grid, normalize=normalize, padding=padding, consistency=consistency,
        dim_damping=dim_damping, chunk=chunk, tile=tile, progress=progress
    )
    result = nifti.Volume(hr, grid.affine(lr.affine), lr.header)
    nifti.save(result, out_path, like_header=lr.header, description=nifti.output_description(lr.header))
    return result
