"""Write the default model's training volumes and the held-out evaluation volumes.

Training source (one subject):
  Colin 27 from Debian's ``mricron-data`` (``/usr/share/mricron/templates``): the head with
  skull and scalp, ``ch2.nii.gz`` (1 mm) and ``ch2better.nii.gz`` (0.5 mm), and its
  skull-stripped brain ``ch2bet.nii.gz`` (1 mm); and the 1 mm head averaged over 2x2x2 blocks
  (a 2 mm acquisition of the same head, so that x3-x4 training pairs also show a brain at
  6-8 mm, as users' 2 mm scans give)  ->  OUT/train/

Held-out sources (never used for training or for choosing a checkpoint):
  mni152   nilearn's MNI152 2009 T1 template, 1 mm, brain only (an average of 152 brains)
  anatomical  nibabel's bundled ``anatomical.nii``, a real single-subject 2 mm T1
  inia19   the INIA19 rhesus macaque T1 template, 0.5 mm, brain only (``mricron-data``)
  epi      nibabel's bundled ``example4d.nii.gz``, first volume: a real T2*-weighted
           gradient-echo EPI (another contrast: CSF bright, white matter dark), 2 x 2 x 2.2 mm,
           brain-masked
  ->  OUT/heldout/<source>.nii.gz, each cropped to its foreground's bounding box plus
  8 voxels (the background far from the head scores the same for every method).

    apt-get install mricron-data      # Colin 27 and INIA19
    pip install nilearn               # MNI152 (also in the test extras)
    python train/prepare_data.py data
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

MRICRON = Path(os.environ.get("MRICRON_TEMPLATES", "/usr/share/mricron/templates"))
TRAIN = {"colin27_1mm": "ch2.nii.gz", "colin27_05mm": "ch2better.nii.gz", "colin27_brain_1mm": "ch2bet.nii.gz"}
BLOCK_AVERAGED = {"colin27_2mm": ("ch2.nii.gz", 2)}
MARGIN = 8


def need(path: Path, how: str) -> Path:
    if not path.is_file():
        sys.exit(f"{path} is missing: {how}")
    return path


def mricron(name: str) -> nib.Nifti1Image:
    how = "install Debian's mricron-data (apt-get install mricron-data) or set MRICRON_TEMPLATES"
    return nib.load(need(MRICRON / name, how))


def block_average(image: nib.Nifti1Image, factor: int) -> nib.Nifti1Image:
    """The volume a voxel ``factor`` times larger would measure: the mean of each
    factor^3 block (an incomplete last block is dropped), with the affine of the block centres."""
    data = np.asarray(image.get_fdata(), np.float32)
    n = [s // factor for s in data.shape[:3]]
    blocks = data[: n[0] * factor, : n[1] * factor, : n[2] * factor]
    blocks = blocks.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))
    affine = image.affine.copy()
    affine[:3, :3] = image.affine[:3, :3] * factor
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, (factor - 1) / 2) + image.affine[:3, 3]
    return nib.Nifti1Image(blocks, affine)


def crop_to_foreground(image: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(image.get_fdata(), np.float32)
    inside = np.argwhere(data > np.percentile(data, 1) + 1e-6)
    lo = np.maximum(inside.min(axis=0) - MARGIN, 0)
    hi = np.minimum(inside.max(axis=0) + MARGIN + 1, data.shape)
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ lo + image.affine[:3, 3]
    return nib.Nifti1Image(data[tuple(slice(a, b) for a, b in zip(lo, hi))], affine)


def heldout_sources() -> dict:
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        sys.exit("nilearn is missing: pip install nilearn (it ships the MNI152 template)")
    return {
        "mni152": load_mni152_template(resolution=1),
        "anatomical": nib.load(nibabel_data("anatomical.nii")),
        "inia19": mricron("inia19-t1-brain.nii.gz"),
        "epi": first_volume(nib.load(nibabel_data("example4d.nii.gz"))),
    }


def nibabel_data(name: str) -> Path:
    path = Path(nib.__file__).parent / "tests" / "data" / name
    return need(path, "reinstall nibabel (pip install --force-reinstall nibabel)")


def first_volume(image: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(image.dataobj[..., 0], np.float32), image.affine)


def training_volumes():
    """(name, float32 image) of every training volume: the files as they are, then the block averages."""
    for name, file in TRAIN.items():
        image = mricron(file)
        yield name, nib.Nifti1Image(np.asarray(image.get_fdata(), np.float32), image.affine)
    for name, (file, factor) in BLOCK_AVERAGED.items():
        yield name, block_average(mricron(file), factor)


def write(image: nib.Nifti1Image, path: Path) -> None:
    nib.save(image, path)
    print(f"wrote {path}: {image.shape}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    out = Path(args.out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    for name, image in training_volumes():
        write(image, out / "train" / f"{name}.nii.gz")
    for name, image in heldout_sources().items():
        write(crop_to_foreground(image), out / "heldout" / f"{name}.nii.gz")


if __name__ == "__main__":
    main()
