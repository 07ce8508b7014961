"""``arssr-jax train``: register with ``add_subcommand(subparsers)``."""

from __future__ import annotations

import argparse

from arssr_jax.errors import ArSSRError


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train an ArSSR model or a fixed-scale baseline CNN (or resume a run)",
        description="Train ArSSR on HR NIfTI volumes. Re-running with the same --workdir resumes from its "
        "latest checkpoint. The workdir then serves as a model: arssr-jax upsample --model WORKDIR. "
        "With --baseline NAME --scale S, train that fixed-scale CNN of the paper's comparison instead "
        "(same loop, checkpoints and logs; evaluate it with eval/evaluate.py --baseline NAME:WORKDIR).",
    )
    parser.add_argument("--config", default=None,
                        help="paper, cpu_small, tiny, a .json config (e.g. a workdir's train_config.json) or a .py file with "
                        "get_config(); default: the workdir's saved config, else cpu_small")
    parser.add_argument("--workdir", required=True, help="folder for train_config.json, log.jsonl and checkpoints/")
    parser.add_argument("--data", nargs="+", default=None,
                        help="training volumes: a folder of *.nii[.gz], a text file listing one path per line, or "
                        "NIfTI files (default: the config's; cpu_small uses nilearn's MNI152 template, else "
                        "nibabel's anatomical.nii)")
    parser.add_argument("--val-data", nargs="+", default=None,
                        help="validation volumes (default: the config's; if none, patches of the training volumes)")
    parser.add_argument("--baseline", choices=["SRCNN3D", "DCSRN", "ResCNN"], default=None,
                        help="train this fixed-scale baseline CNN (the 'baseline' preset) instead of ArSSR")
    parser.add_argument("--scale", type=float, default=None, help="the baseline's scale (with --baseline)")
    parser.add_argument("--baseline-options", default=None, metavar="JSON",
                        help='the baseline module\'s options, e.g. \'{"filters": [32, 16]}\' (with --baseline)')
    parser.add_argument("--steps", type=int, default=None, help="total steps (overrides the config's epochs)")
    parser.add_argument("--init-from", default=None, metavar="MODEL",
                        help="fine-tune: start from this model's parameters (a model directory, training workdir or "
                        "shipped name, e.g. default) instead of a random initialisation; the config's model must be "
                        "its architecture (for the shipped default: --config train/configs/default_model.py)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or console lines")
    group = parser.add_argument_group(
        "multi-process (one command per process)",
        "Under SLURM (srun), Open MPI (mpirun) and on Cloud TPU pods these are detected; elsewhere give all "
        "three (or ARSSR_COORDINATOR_ADDRESS, ARSSR_NUM_PROCESSES, ARSSR_PROCESS_ID). Given values win "
        "over detected ones. JAX_COORDINATOR_PORT picks the coordinator's port in a detected cluster.")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
    parser.set_defaults(run=run)
    return parser


def run(args) -> None:
    """Run ``arssr-jax train``; user errors raise ArSSRError."""
    from pathlib import Path

    from arssr_jax.training.parallel import DistributedConfig, initialize

    distributed = DistributedConfig.from_env(coordinator_address=args.coordinator,
                                             num_processes=args.num_processes, process_id=args.process_id)
    # before anything touches a JAX backend; every process says how it was launched (its own stdout)
    initialize(distributed, log=None if args.quiet else (lambda line: print(f"arssr-jax train: {line}", flush=True)))

    from arssr_jax.training.config import CONFIG_FILE, load_config
    from arssr_jax.training.loop import train

    if args.steps is not None and args.steps < 1:
        raise ArSSRError(f"--steps {args.steps}: give a positive number of steps")
    if not args.baseline and (args.scale is not None or args.baseline_options):
        raise ArSSRError("--scale and --baseline-options belong to --baseline NAME; add it or drop them")
    config = _baseline_config(args) if args.baseline else None
    if config is None:
        spec = args.config
        if spec is None:
            saved = Path(args.workdir) / CONFIG_FILE
            spec = saved if saved.is_file() else "cpu_small"
        config = load_config(spec)
    if args.data:
        config = config.with_data_paths(tuple(args.data))
    if args.val_data:
        config = config.with_val_paths(tuple(args.val_data))
    if args.init_from:  # the loaded last layer is kept, not reset to init_output
        config = config.replace(init_from=args.init_from, init_output=None)
    train(config, args.workdir, steps=args.steps, quiet=args.quiet)


def _baseline_config(args):
    """The ``baseline`` preset for --baseline/--scale/--baseline-options."""
    import json

    from arssr_jax.training.config import baseline

    if args.config is not None:
        raise ArSSRError("give either --config or --baseline (put a baseline into a config file with "
                         "TrainConfig(baseline=BaselineConfig(...)))")
    if args.scale is None or not args.scale >= 1:
        raise ArSSRError(f"--baseline {args.baseline} needs --scale S with S >= 1 (got {args.scale})")
    options = {}
    if args.baseline_options:
        try:
            options = json.loads(args.baseline_options)
            if not isinstance(options, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            raise ArSSRError(f"--baseline-options {args.baseline_options!r} is not a JSON object ({error})") from None
    return baseline(args.baseline, args.scale, options=options)
