"""HR training volumes: find, read once, check, normalise (the rule inference uses).

Volumes read from NIfTI files go through the volume cache (``arssr_jax.data.cache``)
when a cache folder is given: each is converted once into a normalised float32 ``.npy``
and memory-mapped, so memory does not grow with the dataset, and grain's worker
processes re-open the files by path instead of receiving copies of the arrays.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from arssr_jax.data.cache import cached_arrays, open_cached
from arssr_jax.data.reading import normalise_volume, read_volume
from arssr_jax.errors import ArSSRError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclasses.dataclass(frozen=True, eq=False)
class VolumeSet:
    """Normalised float32 volumes (nibabel axis order) and a name for each.

    ``files``: for volumes memory-mapped from the volume cache, the ``.npy`` file each
    array maps (None for an array held in memory; ``files`` None: all in memory). A
    pickled VolumeSet (grain sends its dataset to worker processes by pickling it)
    carries those paths instead of the arrays, and unpickling maps the files again, so
    every process shares the operating system's page cache instead of holding a copy.
    """

    arrays: Tuple[np.ndarray, ...]
    names: Tuple[str, ...]
    files: Optional[Tuple[Optional[str], ...]] = None

    def __post_init__(self):
        if self.files is not None and len(self.files) != len(self.arrays):
            raise ValueError(f"VolumeSet: {len(self.files)} files for {len(self.arrays)} arrays")

    def __len__(self) -> int:
        return len(self.arrays)

    def __repr__(self) -> str:
        shapes = ", ".join(str(a.shape) for a in self.arrays[:3])
        more = ", ..." if len(self.arrays) > 3 else ""
        mapped = "" if self.files is None else f", {sum(f is not None for f in self.files)} memory-mapped"
        return f"VolumeSet({len(self)} volumes: {shapes}{more}{mapped})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.files is not None:
            state["arrays"] = tuple(None if f is not None else a for a, f in zip(self.arrays, self.files))
        return state

    def __setstate__(self, state: dict) -> None:
        files = state.get("files")
        if files is not None:
            state = dict(state)
            state["arrays"] = tuple(open_cached(f) if f is not None else a
                                    for a, f in zip(state["arrays"], files))
        for key, value in state.items():
            object.__setattr__(self, key, value)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_volume_files(source: Union[str, os.PathLike, Sequence]) -> list:
    """NIfTI paths named by a directory, a list file, a NIfTI file, or a sequence of them.

    A directory gives its *.nii / *.nii.gz files, sorted by name. Any other file not
    ending in .nii / .nii.gz is a text list: one path per line, blank lines and
    lines starting with '#' skipped, relative paths relative to the list file.
    """
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    files = []
    for item in source:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _is_nifti(p))
            if not found:
                raise ArSSRError(f"{path}: no *.nii or *.nii.gz files in this directory; "
                                 "point the data paths at a folder of HR NIfTI volumes")
            files.extend(str(p) for p in found)
        elif not path.exists():
            raise ArSSRError(f"{path}: no such file or directory; check the data paths")
        elif _is_nifti(path):
            files.append(str(path))
        else:
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise ArSSRError(f"{path}: cannot read it as a list of NIfTI paths ({err}); "
                                 "give a directory, NIfTI files, or a text file with one "
                                 "path per line") from None
            listed = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            if not listed:
                raise ArSSRError(f"{path}: the list file names no volumes; add one NIfTI path "
                                 "per line")
            for entry in listed:
                p = Path(entry)
                if not p.is_absolute():
                    p = path.parent / p
                if not p.is_file():
                    raise ArSSRError(f"{p}: listed in {path} but not a file; fix the list")
                files.append(str(p))
    if not files:
        raise ArSSRError("no training volumes given; set the data paths to a directory, "
                         "a list file or NIfTI files")
    return files


def load_volumes(source, cache_dir=None, progress: bool = True) -> VolumeSet:
    """Every volume, normalised: read into memory, or memory-mapped from the volume cache.

    ``source``: a directory, a list file, a NIfTI path, a sequence of paths, a
    sequence of 3D arrays (named ``array[i]``), or a :class:`VolumeSet` (returned as is).
    ``cache_dir``: for NIfTI files, the volume cache folder (``DataConfig.cache_dir``;
    see :mod:`arssr_jax.data.cache`): volumes are converted there once (a progress bar
    when ``progress``) and memory-mapped. None reads every volume into memory. Arrays
    are always held in memory. Either way the arrays hold the same values.
    """
    if isinstance(source, VolumeSet):
        return source
    if isinstance(source, np.ndarray):
        source = [source]
    if (isinstance(source, Sequence) and not isinstance(source, (str, bytes))
            and len(source) > 0 and all(isinstance(a, np.ndarray) for a in source)):
        names = [f"array[{i}]" for i in range(len(source))]
        arrays = [normalise_volume(a, n) for a, n in zip(source, names)]
        return VolumeSet(tuple(arrays), tuple(names))
    files = find_volume_files(source)
    if cache_dir is not None:
        arrays, mapped = cached_arrays(files, cache_dir, progress=progress)
        return VolumeSet(arrays, tuple(files), mapped)
    arrays = [read_volume(f) for f in files]
    return VolumeSet(tuple(arrays), tuple(files))


def check_patch_fits(volumes: VolumeSet, patch_size: int) -> None:
    """Every volume must hold a patch of ``patch_size`` voxels along every axis."""
    if len(volumes) == 0:
        raise ArSSRError("no training volumes given; set the data paths")
    for array, name in zip(volumes.arrays, volumes.names):
        if min(array.shape) < patch_size:
            raise ArSSRError(f"{name}: shape {array.shape} is smaller than the patch size "
                             f"{patch_size} on some axis; remove the volume or lower "
                             "patch_size")
