"""Running a convolutional network over a volume in overlapping tiles, exactly.

Each tile's core is read with a halo of the network's receptive radius around it, so the
stitched output equals the whole-volume output. Every window has the same size (edge
windows are shifted inward, not clipped), so one compiled program serves every tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from arssr_jax.progress import progress_bar


@dataclass(frozen=True)
class Tile:
    read: tuple  # slices of the volume the network sees (core + halo, shifted inside)
    core: tuple  # slices of the volume this tile's output fills
    crop: tuple  # slices of the tile's output that are its core


def _axis_tiles(n: int, core: int, halo: int) -> list[tuple[slice, slice, slice]]:
    core = max(1, min(int(core), n))
    window = min(n, core + 2 * halo)
    if window == n:
        core = n  # a window that spans the axis already holds every core: one tile
    out = []
    for start in range(0, n, core):
        stop = min(start + core, n)
        lo = min(max(0, start - halo), n - window)
        out.append((slice(lo, lo + window), slice(start, stop), slice(start - lo, stop - lo)))
    return out


def plan_tiles(shape, core, halo) -> list[Tile]:
    """Cover ``shape`` with cores of ``core`` voxels per axis (an int or one per axis), each
    read with ``halo`` around it.

    Every tile reads a window of the same size, min(n, core + 2 halo) per axis: windows at
    the volume's edge are shifted inward rather than clipped. A shifted window still holds
    its core's whole receptive field, or reaches the volume's true border, where the
    network's own padding applies, as it does on the whole volume.
    """
    cores = (core,) * len(shape) if np.ndim(core) == 0 else tuple(core)
    per_axis = [_axis_tiles(n, c, halo) for n, c in zip(shape, cores)]
    return [
        Tile(*(tuple(part[k] for part in parts) for k in range(3)))
        for index in np.ndindex(*[len(a) for a in per_axis])
        for parts in [[per_axis[axis][i] for axis, i in enumerate(index)]]
    ]


def choose_tile_core(shape, halo, max_tile_voxels, max_tiles_per_axis=8) -> tuple:
    """Tile cores that cover ``shape`` with the least work (tiles x window voxels) while each
    window (core + halo, clipped to the volume) fits ``max_tile_voxels``.

    With a large halo (RDN: 28 voxels) small cubic tiles would mostly recompute halos, so
    every split of 1..max_tiles_per_axis tiles per axis is weighed; the volume itself when it fits.
    """
    if math.prod(shape) <= max_tile_voxels:
        return tuple(shape)
    best = None
    for counts in np.ndindex(*(min(n, max_tiles_per_axis) for n in shape)):
        cores = [math.ceil(n / (c + 1)) for n, c in zip(shape, counts)]
        windows = [min(n, core + 2 * halo) for n, core in zip(shape, cores)]
        if math.prod(windows) > max_tile_voxels:
            continue
        work = math.prod(math.ceil(n / core) for n, core in zip(shape, cores)) * math.prod(windows)
        if best is None or work < best[0]:
            best = (work, tuple(cores))
    if best is None:  # nothing fits: the smallest windows the split allows
        return tuple(max(1, math.ceil(n / max_tiles_per_axis)) for n in shape)
    return best[1]


def tiled_apply(apply: Callable, volume, core, halo: int, channels: int | None = None,
                progress: bool = False, desc: str = "tiles") -> np.ndarray:
    """``apply(window) -> output`` over ``volume`` (X, Y, Z) tile by tile, stitched: shape
    (X, Y, Z) when ``channels`` is None, else (X, Y, Z, channels); float32.

    ``apply`` must map a window to an output of the same spatial shape, and depend on no
    voxel further than ``halo`` away: then the result is ``apply(volume)`` exactly.
    """
    volume = np.asarray(volume, np.float32)
    tiles = plan_tiles(volume.shape, core, halo)
    extra = () if channels is None else (int(channels),)
    out = np.empty(volume.shape + extra, np.float32)
    for tile in progress_bar(tiles, desc=desc, unit="tile", enabled=progress and len(tiles) > 1):
        out[tile.core] = np.asarray(apply(volume[tile.read]))[tile.crop]
    return out
