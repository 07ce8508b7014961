"""Split the MNI152 2009 T1 template (shipped with nilearn, 1 mm) into train and held-out slabs.

The default model is trained on real MR data available offline: the template's
inferior part (axis 2 < 105, 197 x 233 x 105) is the training volume, its superior part
(axis 2 >= 115, 197 x 233 x 74, a 10-slice gap between them) is held out for
evaluation. Writes ``train/mni_inferior.nii.gz`` and ``heldout/mni_superior.nii.gz``
under OUT_DIR, with the template's affine shifted to each slab's position.

    python train/prepare_mni.py data/mni
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

TRAIN_SLICES = slice(0, 105)
HELDOUT_SLICES = slice(115, None)


def slab(image, axis2: slice) -> nib.Nifti1Image:
    data = np.asarray(image.get_fdata(), np.float32)[:, :, axis2]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ [0, 0, axis2.start or 0] + image.affine[:3, 3]
    return nib.Nifti1Image(data, affine)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    out = Path(args.out_dir)
    for name, part in (("train/mni_inferior.nii.gz", TRAIN_SLICES), ("heldout/mni_superior.nii.gz", HELDOUT_SLICES)):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        image = slab(template, part)
        nib.save(image, out / name)
        print(f"wrote {out / name}: {image.shape}")


if __name__ == "__main__":
    main()
