"""What ``--adapt`` costs: adaptation and decoding of a thick-slice scan, timed apart.

A 1 mm head (default: the training source Colin 27, ``data/train/colin27_1mm.nii.gz``) is cut
to the output size, made 1 x 1 x 4 mm by averaging four slices along k (a box profile), written
as NIfTI and brought back to 1 mm by ``upsample_nifti(..., scale=(1, 1, 4), adapt=Adaptation())``,
as ``arssr-jax upsample IN OUT --scale 1 1 4 --adapt`` runs it. Printed per size: the pairs and
compilation (setup), the training steps with validation, the rest (loading the model, decoding,
the slice consistency, writing), and the whole; one JSON line each. Times only: the output is
not scored (the source is one the model trained on).

    python eval/benchmark_adapt.py                                   # 96x128x128 and 182x218x184 outputs
    python eval/benchmark_adapt.py --sizes 96 128 128 --steps 50      # one size, fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def head_of_size(data: np.ndarray, size) -> np.ndarray:
    """``data`` cut (centred) or zero-padded (evenly) to ``size``."""
    out = np.zeros(size, np.float32)
    src, dst = [], []
    for n, m in zip(data.shape, size):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = data[tuple(src)]
    return out


def run(source, size, config, folder):
    import nibabel as nib

    from arssr_jax import upsample_nifti
    from arssr_jax.adapt import Adaptation
    from arssr_jax.slice_profile import thick_slices

    data = np.asarray(nib.load(source).get_fdata(), np.float32)
    hr = head_of_size(data, size)
    lr = thick_slices(hr, 2, 4)
    in_path, out_path = os.path.join(folder, "thick.nii.gz"), os.path.join(folder, "out.nii.gz")
    nib.save(nib.Nifti1Image(lr, np.diag([1.0, 1.0, 4.0, 1.0])), in_path)
    adaptation = Adaptation(config)
    start = time.perf_counter()
    written = upsample_nifti(in_path, out_path, scale=(1, 1, 4), adapt=adaptation)
    total = time.perf_counter() - start
    result = adaptation.results[-1]
    return {"output": list(written.data.shape), "lr": list(lr.shape), "steps": result.steps_run,
            "setup_s": round(result.setup_seconds, 1), "train_s": round(result.train_seconds, 1),
            "rest_s": round(total - result.seconds, 1), "total_s": round(total, 1),
            "s_per_step": round(result.train_seconds / max(1, result.steps_run), 3), "cores": os.cpu_count()}


def main(argv=None):
    from arssr_jax.adapt import AdaptConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="data/train/colin27_1mm.nii.gz", help="a 1 mm head (NIfTI)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 128, 182, 218, 184],
                        help="output sizes, three numbers each (k a multiple of 4)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default: AdaptConfig's)")
    args = parser.parse_args(argv)
    if len(args.sizes) % 3 or any(args.sizes[k] % 4 for k in range(2, len(args.sizes), 3)):
        parser.error("--sizes takes three numbers per output, the third a multiple of 4")
    if not os.path.isfile(args.source):
        parser.error(f"no file {args.source}: run python train/prepare_data.py data, or give --source")
    config = AdaptConfig() if args.steps is None else AdaptConfig(steps=args.steps)
    print(f"{'output':>14s} {'steps':>5s} {'setup s':>8s} {'train s':>8s} {'s/step':>7s} {'decode+io s':>11s} {'total s':>8s}")
    for k in range(0, len(args.sizes), 3):
        size = tuple(args.sizes[k:k + 3])
        with tempfile.TemporaryDirectory() as folder:
            row = run(args.source, size, config, folder)
        print(f"{'x'.join(map(str, row['output'])):>14s} {row['steps']:5d} {row['setup_s']:8.1f} {row['train_s']:8.1f} "
              f"{row['s_per_step']:7.3f} {row['rest_s']:11.1f} {row['total_s']:8.1f}", flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
