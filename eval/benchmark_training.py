"""Training-step speed: JAX (this project) vs the PyTorch reference, same batch, same machine.

Defaults are the paper's batch: N=15 samples of an LR 10^3 patch with K=8000 HR
coordinates each, Adam, L1 loss, full-size models (RDN and ResCNN). For each encoder it
reports the JAX compile time, then seconds per step, steps/s and samples/s over a few
warm steps; and, when torch is installed, the same for the PyTorch mirror of the
reference (arssr_jax/testing/torch_reference.py) with the ratio.

    python eval/benchmark_training.py                       # the paper's batch (minutes on 2 cores)
    python eval/benchmark_training.py --batch 2 --samples 500 --steps 2   # a quick try
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

def make_batch(batch: int, samples: int, lr_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"lr": rng.random((batch, lr_size, lr_size, lr_size, 1), np.float32),
            "coords": rng.uniform(-1, 1, (batch, samples, 3)).astype(np.float32),
            "values": rng.random((batch, samples, 1), np.float32)}


def bench_jax(encoder: str, batch: dict, steps: int, warmup: int) -> dict:
    import jax

    from arssr_jax.models import ModelConfig, build_model, count_params
    from arssr_jax.training import ArSSRTask, OptimConfig, create_train_state, make_optimizer, make_train_step

    config = ModelConfig(encoder=encoder)
    model = build_model(config)
    task = ArSSRTask(model, tuple(batch["lr"].shape[1:4]), init_output=0.5)
    tx, schedule = make_optimizer(OptimConfig(), steps_per_epoch=312)
    state = create_train_state(task.init_params, tx, 0)
    device_batch = jax.device_put(batch)
    t0 = time.perf_counter()
    step = jax.jit(make_train_step(task.loss, tx, schedule), donate_argnums=(0,)).lower(state, device_batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = step(state, device_batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device_batch)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0) / steps
    return {"framework": "jax", "encoder": encoder, "parameters": count_params(state.params),
            "compile_s": compile_s, "step_s": seconds, "loss": float(metrics["loss"])}


def bench_torch(encoder: str, batch: dict, steps: int, warmup: int) -> dict:
    import torch

    from arssr_jax.testing.torch_reference import make_reference

    model = make_reference(encoder).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    lr = torch.from_numpy(np.ascontiguousarray(np.moveaxis(batch["lr"], -1, 1)))  # (N, 1, D, H, W)
    coords, values = torch.from_numpy(batch["coords"]), torch.from_numpy(batch["values"])

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(model(lr, coords), values)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - t0) / steps
    return {"framework": "torch", "encoder": encoder, "parameters": sum(p.numel() for p in model.parameters()),
            "compile_s": None, "step_s": seconds, "loss": loss, "threads": torch.get_num_threads()}


def training_flops(encoder: str, args) -> float:
    """Useful FLOPs of one step: forward (encoder per LR voxel + decoder per HR sample) x 3 for the backward."""
    from arssr_jax.flops import decoder_flops_per_voxel, encoder_flops_per_voxel
    from arssr_jax.models import ModelConfig

    config = ModelConfig(encoder=encoder)
    forward = args.batch * (encoder_flops_per_voxel(config) * args.lr_size**3
                            + decoder_flops_per_voxel(config) * args.samples)
    return 3.0 * forward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["RDN", "ResCNN"], choices=["RDN", "ResCNN", "SRResNet"])
    parser.add_argument("--batch", type=int, default=15, help="samples per step (N)")
    parser.add_argument("--samples", type=int, default=8000, help="HR coordinates per sample (K)")
    parser.add_argument("--lr-size", type=int, default=10, help="LR patch edge")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import jax

    try:
        import torch  # noqa: F401
        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
    batch = make_batch(args.batch, args.samples, args.lr_size)
    print(f"batch N={args.batch}, K={args.samples}, LR {args.lr_size}^3; {args.warmup} warm-up + {args.steps} timed "
          f"steps; jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs)", flush=True)
    matmul = None
    try:
        from arssr_jax.testing.benchmarking import jax_matmul_gflops, torch_matmul_gflops

        matmul = f"jnp.dot {jax_matmul_gflops():.1f} GFLOP/s" + (
            f", torch {torch_matmul_gflops():.1f}" if have_torch else "")
    except Exception as error:  # the roofline line is informative only
        matmul = f"not measured ({error})"
    results = []
    header = f"{'encoder':8} {'framework':9} {'params':>10} {'compile s':>9} {'s/step':>8} {'steps/s':>8} {'samples/s':>9}"
    print(header)
    for encoder in args.encoders:
        runs = [bench_jax(encoder, batch, args.steps, args.warmup)]
        if have_torch:
            runs.append(bench_torch(encoder, batch, args.steps, args.warmup))
        for r in runs:
            r.update(steps_per_s=1.0 / r["step_s"], samples_per_s=args.batch / r["step_s"], batch=args.batch,
                     samples=args.samples, lr_size=args.lr_size)
            compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
            print(f"{encoder:8} {r['framework']:9} {r['parameters']:>10,} {compile_s:>9} {r['step_s']:>8.3f} "
                  f"{r['steps_per_s']:>8.3f} {r['samples_per_s']:>9.2f}", flush=True)
        step_flops = training_flops(encoder, args)
        for r in runs:
            r["gflops_per_s"] = step_flops / r["step_s"] / 1e9
            print(f"{encoder:8} {r['framework']:9} achieved {r['gflops_per_s']:.1f} GFLOP/s "
                  f"(3 x forward FLOPs per step: {step_flops / 1e9:.0f} G; matmul rate: {matmul})", flush=True)
        if have_torch:
            ratio = runs[1]["step_s"] / runs[0]["step_s"]
            print(f"{encoder:8} torch s/step / jax s/step = {ratio:.2f} ({'JAX' if ratio > 1 else 'PyTorch'} faster)",
                  flush=True)
            runs[0]["torch_over_jax"] = ratio
        results.extend(runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
