"""3x3x3 convolution speed on the CPU: each formulation in arssr_jax/models/conv.py vs PyTorch.

    python eval/benchmark_conv.py                      # both suites (about 2 minutes on 2 cores)
    python eval/benchmark_conv.py --suite forward --impls winograd,fold2d --repeats 9
    python eval/benchmark_conv.py --json conv.json

Suites: "forward" (RDN-sized inference convolutions, batch 1) and "train" (a training
batch of 15 LR patches, 13^3 voxels: value and gradients of sum(conv(x, k) * g) with
respect to x and k). Implementations: the ``impl`` choices of ``conv3d_same`` (lax,
fold2d, winograd) and, when installed, torch.nn.functional.conv3d (NCDHW float32, all
CPU threads). Each shape runs the implementations in interleaved rounds after a warm-up
call and reports the median time; GFLOP/s counts the direct convolution's 2*27*Cin*Cout
flops per output voxel (x3 for a training step), so Winograd's saved multiplications
show up as a higher rate. A cell stops after --max-seconds of timed runs; cells with
fewer than --repeats runs are marked with their count; a warm-up call that alone takes
longer is the cell's one timing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

FORWARD = [((1, 48, 48, 48), 64, 32), ((1, 48, 48, 48), 64, 64), ((1, 32, 32, 32), 64, 32),
           ((1, 32, 32, 32), 160, 32), ((1, 32, 32, 32), 320, 32)]
TRAIN = [((15, 13, 13, 13), 64, 32), ((15, 13, 13, 13), 64, 64), ((15, 13, 13, 13), 320, 32)]
JAX_IMPLS = ("lax", "fold2d", "winograd")


def _inputs(shape, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*shape, cin), np.float32)
    kernel = (rng.standard_normal((3, 3, 3, cin, cout)) / np.sqrt(27 * cin)).astype(np.float32)
    g = rng.standard_normal((*shape, cout), np.float32)
    return x, kernel, g


def _jax_runner(impl, x, kernel, g, train):
    import jax
    import jax.numpy as jnp

    from arssr_jax.models.conv import conv3d_same

    bias = jnp.zeros(kernel.shape[-1], jnp.float32)
    x, kernel, g = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)
    conv = lambda x, k: conv3d_same(x, k, bias, impl=impl)
    if train:
        fn = jax.jit(jax.value_and_grad(lambda x, k, g: jnp.sum(conv(x, k) * g), argnums=(0, 1)))
    else:
        fn = jax.jit(lambda x, k, g: conv(x, k))
    fn = fn.lower(x, kernel, g).compile()  # compile now, outside the timings
    return lambda: jax.block_until_ready(fn(x, kernel, g))


def _torch_runner(x, kernel, g, train):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
    gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 4, 1, 2, 3)))
    if not train:
        def run():
            with torch.no_grad():
                torch.nn.functional.conv3d(xt, kt, padding=1)
        return run
    xt.requires_grad_(True)
    kt.requires_grad_(True)

    def step():
        xt.grad = kt.grad = None
        (torch.nn.functional.conv3d(xt, kt, padding=1) * gt).sum().backward()
    return step


def time_cells(runners: dict, repeats: int, max_seconds: float) -> dict:
    """Median seconds per runner over interleaved rounds, after one warm-up call each.

    A runner whose warm-up call alone exceeds max_seconds keeps that one time.
    """
    times = {name: [] for name in runners}
    spent = dict.fromkeys(runners, 0.0)
    for name, run in runners.items():
        t0 = time.perf_counter()
        run()
        if time.perf_counter() - t0 > max_seconds:
            times[name].append(time.perf_counter() - t0)
            spent[name] = times[name][-1]
    for _ in range(repeats):
        for name, run in runners.items():
            if times[name] and spent[name] > max_seconds:
                continue
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
            spent[name] += times[name][-1]
    return {name: (float(np.median(t)), len(t)) for name, t in times.items()}


def bench(suite: str, impls, repeats: int, max_seconds: float) -> list[dict]:
    rows = []
    train = suite == "train"
    for shape, cin, cout in TRAIN if train else FORWARD:
        x, kernel, g = _inputs(shape, cin, cout)
        runners = {}
        for impl in impls:
            if impl == "torch":
                runners[impl] = _torch_runner(x, kernel, g, train)
            else:
                runners[impl] = _jax_runner(impl, x, kernel, g, train)
        flops = 2 * 27 * cin * cout * int(np.prod(shape)) * (3 if train else 1)
        for impl, (seconds, runs) in time_cells(runners, repeats, max_seconds).items():
            rows.append({"suite": suite, "shape": list(shape), "cin": cin, "cout": cout, "impl": impl,
                         "ms": seconds * 1e3, "gflops": flops / seconds / 1e9, "runs": runs})
        _print_shape(rows[-len(runners):], repeats)
    return rows


def _print_shape(rows, repeats):
    r0 = rows[0]
    label = f"{r0['suite']:7s} {'x'.join(map(str, r0['shape'])):>12s} {r0['cin']:3d}->{r0['cout']:<3d}"
    cells = []
    for r in rows:
        mark = "" if r["runs"] >= repeats else f"({r['runs']})"
        cells.append(f"{r['impl']:>8s} {r['ms']:8.1f} ms {r['gflops']:6.1f}{mark:4s}")
    print(label + " | " + " | ".join(cells), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["forward", "train", "all"], default="all")
    parser.add_argument("--impls", default="winograd,fold2d,lax,torch",
                        help="comma-separated: lax, fold2d, winograd, torch")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--max-seconds", type=float, default=2.0, help="stop a cell after this much timed running")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(JAX_IMPLS) - {"torch"}
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}")
    if "torch" in impls:
        try:
            import torch
            torch.set_num_threads(os.cpu_count())
        except ImportError:
            impls.remove("torch")
    import jax

    print(f"3x3x3 conv, float32, {jax.default_backend()} backend, {os.cpu_count()} CPUs; "
          f"median ms and direct-equivalent GFLOP/s (2*27*Cin*Cout per voxel, x3 for training)")
    rows = []
    for suite in (["forward", "train"] if args.suite == "all" else [args.suite]):
        rows += bench(suite, impls, args.repeats, args.max_seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
