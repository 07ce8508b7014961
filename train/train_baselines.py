"""Train the paper's fixed-scale baseline CNNs (one per scale) with the training system.

Every (network, scale) pair is one ``arssr-jax train --baseline NAME --scale S`` run
(the 'baseline' preset: L1, Adam, tricubic-upsampled LR patches as input), here with
the default model's data recipe (MNI152 training slab, the same augmentations and
learning rate) so the evaluation table compares like with like. Each workdir serves
evaluation directly:

    python train/prepare_mni.py data/mni
    python train/train_baselines.py --data data/mni/train --out runs/baselines --steps 300
    python eval/evaluate.py data/mni/heldout --out results --arssr ArSSR=default \\
        --baseline SRCNN3D:runs/baselines/SRCNN3D_x2 ... (the script prints the full command)

``--size cpu`` (default) shrinks what is too slow to train on a 2-core CPU (24^3 HR
patches; DCSRN growth 12, ResCNN 32 features x 2 blocks x 3 convs); ``--size paper`` keeps
the papers' networks and 32^3 patches. Re-running resumes unfinished runs and skips finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from arssr_jax.data import AugmentConfig
from arssr_jax.errors import ArSSRError
from arssr_jax.training import baseline, train

SIZES = {
    "paper": {"SRCNN3D": {}, "DCSRN": {}, "ResCNN": {}},
    "cpu": {"SRCNN3D": {}, "DCSRN": {"growth": 12},
            "ResCNN": {"num_features": 32, "num_blocks": 2, "convs_per_block": 3}},
}
PATCH = {"paper": 32, "cpu": 24}  # HR patch edge (voxels)
# The shipped default model's augmentations and learning rate (train/configs/default_model.py).
AUGMENT = AugmentConfig(flip=True, permute=True, gamma=0.15, intensity_scale=0.1, bias_field=0.15)
LEARNING_RATE = 5e-4


def run_config(name: str, scale: float, data, size: str, steps: int):
    config = baseline(name, scale, data_paths=tuple(data), val_paths=tuple(data), options=SIZES[size][name],
                      patch=PATCH[size])
    every = max(1, steps // 4)
    return config.replace(
        data=dataclasses.replace(config.data, augment=AUGMENT, samples_per_volume=400),
        # 400 patches / batch 4 = 100 steps per epoch: halve the learning rate halfway through the run
        optim=dataclasses.replace(config.optim, learning_rate=LEARNING_RATE, decay_every_epochs=max(1.0, steps / 200)),
        # validation patches from the training slab at other positions (seed): the
        # held-out slab stays for the final table only, as for the default model
        val=dataclasses.replace(config.val, every_steps=every, seed=7),
        steps=steps,
        log_every=25,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="HR training volumes (folder, list file or NIfTI files)")
    parser.add_argument("--out", required=True, help="folder for one workdir per network and scale")
    parser.add_argument("--names", nargs="+", default=["SRCNN3D", "DCSRN", "ResCNN"],
                        choices=["SRCNN3D", "DCSRN", "ResCNN"])
    parser.add_argument("--scales", nargs="+", type=float, default=[2.0, 2.5, 3.0, 3.5, 4.0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    specs = []
    try:
        for name in args.names:
            for scale in args.scales:
                workdir = out / f"{name}_x{scale:g}"
                started = time.perf_counter()
                result = train(run_config(name, scale, args.data, args.size, args.steps), workdir, quiet=args.quiet)
                print(f"{workdir}: step {result.step}, best {result.best_step}, val PSNR "
                      f"{result.validation.get('val_psnr', float('nan')):.2f} dB vs tricubic "
                      f"{result.interpolation.get('val_psnr', float('nan')):.2f} dB "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                specs.append(f"--baseline {name}:{workdir}")
    except ArSSRError as error:
        print(f"train_baselines.py: error: {error}", file=sys.stderr)
        return 2
    print("evaluate with:\n  python eval/evaluate.py HELD_OUT --out results --arssr ArSSR=default " + " ".join(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
