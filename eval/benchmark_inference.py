"""Whole-volume inference speed and peak memory, side by side with the PyTorch reference.

For each scale: arssr-jax's `upsample` (encode once in tiles, chunked decode through one
compiled function) with random weights, compile time reported separately; then, when
torch is installed, the reference pipeline (the mirror in arssr_jax/testing/torch_reference.py)
both as shipped (the whole encoder re-run for every HR slab: timed on a few slabs and
extrapolated to all of them, as said in the output) and encode-once.

    python eval/benchmark_inference.py                       # RDN, 48^3 LR, scales 2 and 3.2
    python eval/benchmark_inference.py --shape 182 218 182 --scales 2 --no-torch   # whole brain

Each case runs in a fresh subprocess so its peak memory (ru_maxrss, or the device's
peak bytes on a GPU) is its own. Numbers are printed as a table and one JSON line each.

Whole-process mode times what a user waits for: the ``arssr-jax upsample`` command from
start to exit (interpreter, imports, model loading, tracing, reading and writing NIfTI),
with the compiled-program cache warm (one untimed run first), beside the reference as a
whole process (torch import, loading a saved state_dict, one encoder pass, the slab-by-slab
decode, writing the NIfTI), for one scan and for N scans (ours: one command over all of
them with --out-dir; the reference: one process per scan, as its CLI takes one scan):

    python eval/benchmark_inference.py --whole-process                 # 1 and 20 scans of 48^3, x2
    python eval/benchmark_inference.py --whole-process --scans 1 --shape 8 8 8 --shipped --repeats 3
        # the fixed cost: the shipped model on 8^3 (no reference run: it cannot load that model)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from arssr_jax.testing.benchmarking import realistic_volume


def peak_memory_bytes():
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        return int((device.memory_stats() or {}).get("peak_bytes_in_use", 0))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jax(args):
    import jax

    from arssr_jax.consistency import back_project
    from arssr_jax.coords import grid_for_scale
    from arssr_jax.inference import decode_grid, encode_volume
    from arssr_jax.models import ModelConfig, build_model, init_params

    volume = realistic_volume(tuple(args.shape))
    model = build_model(ModelConfig(encoder=args.encoder, compute_dtype=args.dtype))
    params = init_params(model, jax.random.key(0))
    grid = grid_for_scale(volume.shape, args.scale)

    def once():
        t0 = time.perf_counter()
        features = encode_volume(model, params, volume, tile=args.tile)
        t1 = time.perf_counter()
        hr = decode_grid(model, params, features, grid, chunk=args.chunk)
        t2 = time.perf_counter()
        back_project(hr, volume, grid, 0.5)  # the shipped model's data-consistency step
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    first = once()
    steady = min((once() for _ in range(args.repeats)), key=sum)
    network = steady[0] + steady[1]  # the reference has no consistency step: compared without it
    return {
        "impl": f"arssr-jax ({jax.default_backend()}, {args.dtype})",
        "hr_voxels": grid.num_voxels,
        "encode_s": steady[0],
        "decode_s": steady[1],
        "consistency_s": steady[2],
        "total_s": network,
        "compile_s": max(0.0, first[0] + first[1] - network),
        "voxels_per_s": grid.num_voxels / network,
        "peak_memory_bytes": peak_memory_bytes(),
        **achieved_gflops(args, grid.num_voxels, *steady[:2]),
    }


def achieved_gflops(args, hr_voxels, encode_s, decode_s):
    """Useful encoder FLOPs (per LR voxel, tile halos not counted) / encode time; decoder likewise."""
    from arssr_jax.flops import decoder_flops_per_voxel, encoder_flops_per_voxel
    from arssr_jax.models import ModelConfig

    config = ModelConfig(encoder=args.encoder)
    lr_voxels = int(np.prod(args.shape))
    return {"encoder_gflops_per_s": encoder_flops_per_voxel(config) * lr_voxels / encode_s / 1e9,
            "decoder_gflops_per_s": decoder_flops_per_voxel(config) * hr_voxels / decode_s / 1e9}


def run_torch(args, shipped):
    import torch

    from arssr_jax.coords import make_grid
    from arssr_jax.testing.torch_reference import ArSSR

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = ArSSR(args.encoder).eval()
    volume = torch.from_numpy(realistic_volume(tuple(args.shape)))[None, None]
    hr = tuple(int(n * args.scale) for n in args.shape)
    coords = torch.from_numpy(make_grid(hr)).view(hr[0], -1, 3)  # one HR slab per row
    with torch.no_grad():
        if shipped:  # the reference CLI: the whole encoder again for every slab
            slabs = min(args.shipped_slabs, hr[0])
            t0 = time.perf_counter()
            for i in range(slabs):
                model(volume, coords[i][None])
            per_slab = (time.perf_counter() - t0) / slabs
            total = per_slab * hr[0]
            return {"impl": f"reference as shipped ({slabs} of {hr[0]} slabs timed, extrapolated)",
                    "hr_voxels": int(np.prod(hr)), "total_s": total, "voxels_per_s": np.prod(hr) / total,
                    "peak_memory_bytes": peak_memory_bytes_torch()}
        t0 = time.perf_counter()
        features = model.encoder(volume)
        t1 = time.perf_counter()
        for i in range(hr[0]):
            model.decode(features, coords[i][None])
        t2 = time.perf_counter()
    return {"impl": "reference, encode once", "hr_voxels": int(np.prod(hr)), "encode_s": t1 - t0,
            "decode_s": t2 - t1, "total_s": t2 - t0, "voxels_per_s": np.prod(hr) / (t2 - t0),
            "peak_memory_bytes": peak_memory_bytes_torch(),
            **achieved_gflops(args, int(np.prod(hr)), t1 - t0, t2 - t1)}


def peak_memory_bytes_torch():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def case(args):
    if args.case == "jax":
        return run_jax(args)
    return run_torch(args, shipped=args.case == "torch-shipped")


def spawn(args, name, scale):
    command = [sys.executable, __file__, "--case", name, "--scale", str(scale), "--encoder", args.encoder,
               "--shape", *map(str, args.shape), "--repeats", str(args.repeats), "--dtype", args.dtype,
               "--shipped-slabs", str(args.shipped_slabs)]
    if args.chunk:
        command += ["--chunk", str(args.chunk)]
    if args.tile:
        command += ["--tile", str(args.tile)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} at scale {scale} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


REFERENCE_PROCESS = """
import os, sys, time
import numpy as np, nibabel as nib, torch
from arssr_jax.testing.torch_reference import ArSSR
from arssr_jax.coords import make_grid

encoder, weights, scale, in_path, out_path = sys.argv[1:6]
torch.set_num_threads(os.cpu_count())
model = ArSSR(encoder).eval()
model.load_state_dict(torch.load(weights))
image = nib.load(in_path)
volume = torch.from_numpy(np.asarray(image.get_fdata(), np.float32))[None, None]
hr = tuple(int(n * float(scale)) for n in volume.shape[2:])
coords = torch.from_numpy(make_grid(hr)).view(hr[0], -1, 3)
with torch.no_grad():
    features = model.encoder(volume)
    out = torch.cat([model.decode(features, coords[i][None]).view(-1) for i in range(hr[0])])
affine = image.affine.copy()
affine[:3, :3] /= float(scale)
nib.save(nib.Nifti1Image(out.view(hr).numpy(), affine), out_path)
"""


def whole_process(args):
    """Wall time of whole processes: arssr-jax upsample against the reference, 1 and N scans."""
    import tempfile

    import jax
    import nibabel as nib

    from arssr_jax.models import ModelConfig, build_model, init_params
    from arssr_jax.weights import save_model

    scale = args.scales[0]
    work = tempfile.mkdtemp(prefix="arssr-bench-")
    if args.shipped:
        model_args, described = [], "the shipped default model"
    else:
        config = ModelConfig(encoder=args.encoder)
        model_dir = save_model(os.path.join(work, "model"), config, init_params(build_model(config), jax.random.key(0)))
        model_args, described = ["--model", str(model_dir)], f"{args.encoder}, random weights"
    base = realistic_volume(tuple(args.shape))
    most = max(args.scans)
    scans = []
    for i in range(most):  # the same anatomy, a little noise each: same shape, different data
        data = base + 0.01 * np.random.default_rng(i).standard_normal(base.shape).astype(np.float32)
        scans.append(os.path.join(work, f"scan{i:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), scans[-1])
    ours = [sys.executable, "-m", "arssr_jax.cli", "upsample"]
    options = ["--scale", f"{scale:g}", *model_args, "--quiet"]

    def timed(command):
        t0 = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{out.stderr[-3000:]}")
        return time.perf_counter() - t0

    warm = timed(ours + [scans[0], os.path.join(work, "warm.nii.gz")] + options)  # fills the compile cache
    print(f"LR {'x'.join(map(str, args.shape))} -> x{scale:g}, {described}, "
          f"{os.cpu_count()} CPU cores; whole processes, wall time")
    print(f"arssr-jax first run (compile cache filled if it was empty): {warm:.2f} s")
    with_torch = False
    if not (args.no_torch or args.shipped):
        try:
            import torch

            from arssr_jax.testing.torch_reference import ArSSR

            torch.manual_seed(0)
            weights = os.path.join(work, "reference.pkl")
            torch.save(ArSSR(args.encoder).state_dict(), weights)
            script = os.path.join(work, "reference_process.py")
            with open(script, "w") as f:
                f.write(REFERENCE_PROCESS)
            with_torch = True
        except ImportError:
            pass
    results = []
    for n in args.scans:
        out_dir = os.path.join(work, f"out{n}")
        command = (ours + [scans[0], os.path.join(work, "one.nii.gz")] + options if n == 1
                   else ours + scans[:n] + ["--out-dir", out_dir] + options)
        times = [timed(command) for _ in range(max(1, args.repeats))]
        ours_s = float(np.median(times))
        row = {"mode": "whole-process", "scans": n, "shape": list(args.shape), "scale": scale,
               "model": "shipped" if args.shipped else f"{args.encoder} random", "arssr_jax_s": ours_s,
               "arssr_jax_runs_s": times}
        if with_torch:
            reference = [sum(timed([sys.executable, script, args.encoder, weights, str(scale), path,
                                    os.path.join(work, f"ref{i:02d}.nii.gz")])
                             for i, path in enumerate(scans[:n]))
                         for _ in range(max(1, args.repeats))]
            row["reference_s"], row["reference_runs_s"] = float(np.median(reference)), reference
            row["ratio"] = row["reference_s"] / ours_s
        runs = f" (median of {', '.join(f'{t:.2f}' for t in times)})" if len(times) > 1 else ""
        ours_text = f"arssr-jax upsample {'IN OUT' if n == 1 else f'{n} inputs --out-dir'}: {ours_s:7.2f} s{runs}"
        ref_text = (f"; reference, {n} process{'es' if n > 1 else ''}: {row['reference_s']:7.2f} s; "
                    f"speed-up {row['ratio']:.2f}x" if with_torch else "")
        print(f"{n:3d} scan{'s' if n > 1 else ' '}  {ours_text}{ref_text}")
        results.append(row)
    for row in results:
        print(json.dumps(row))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="RDN", choices=["RDN", "ResCNN", "SRResNet"])
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48], help="LR volume shape")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.2])
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--tile", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the first (compiling) one; "
                        "with --whole-process: timed runs of our command (the median is reported)")
    parser.add_argument("--shipped", action="store_true",
                        help="with --whole-process: time the shipped default model (no reference run)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--shipped-slabs", type=int, default=2, help="slabs timed for the as-shipped reference")
    parser.add_argument("--whole-process", action="store_true",
                        help="time whole processes (the CLI as a user runs it) against the reference's; "
                        "the first of --scales (default here: 2)")
    parser.add_argument("--scans", type=int, nargs="+", default=[1, 20],
                        help="with --whole-process: numbers of scans timed (default 1 and 20)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args)))
        return
    if args.whole_process:
        if min(args.scans) < 1:
            raise SystemExit("--scans: give positive numbers of scans")
        whole_process(args)
        return

    try:
        import torch  # noqa: F401

        with_torch = not args.no_torch
    except ImportError:
        with_torch = False
    print(f"LR {'x'.join(map(str, args.shape))}, {args.encoder}, random weights, {os.cpu_count()} CPU cores")
    header = f"{'scale':>5}  {'implementation':<58} {'HR vox/s':>11} {'total s':>9} {'compile s':>9} {'peak GiB':>8}"
    print(header)
    matmul = measure_matmul(with_torch)
    for scale in args.scales:
        results = [spawn(args, "jax", scale)]
        if with_torch:
            results += [spawn(args, "torch-once", scale), spawn(args, "torch-shipped", scale)]
        for r in results:
            compile_s = f"{r['compile_s']:9.1f}" if "compile_s" in r else f"{'':>9}"
            print(f"{scale:5.2g}  {r['impl']:<58} {r['voxels_per_s']:11,.0f} {r['total_s']:9.1f} {compile_s} "
                  f"{r['peak_memory_bytes'] / 2**30:8.2f}")
        if with_torch:
            ours = results[0]["voxels_per_s"]
            print(f"       speed-up vs reference encode-once: {ours / results[1]['voxels_per_s']:.2f}x; "
                  f"vs reference as shipped: {ours / results[2]['voxels_per_s']:.1f}x")
        for r in results:
            if "encoder_gflops_per_s" in r:
                print(f"       {r['impl']}: encoder {r['encoder_gflops_per_s']:.1f} GFLOP/s, decoder "
                      f"{r['decoder_gflops_per_s']:.1f} GFLOP/s (matmul rate: {matmul}); data-consistency step "
                      f"{r['consistency_s']:.2f} s")
        for r in results:
            print(json.dumps({"scale": scale, **r}))


def measure_matmul(with_torch):
    """The machine's float32 matmul rate (eval/benchmark_matmul.py, in a subprocess), as text."""
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_matmul.py")] + ([] if with_torch else ["--no-torch"])
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return "not measured"
    r = json.loads(out.stdout.strip().splitlines()[-1])
    text = f"jnp.dot {r['jax_gflops']:.1f} GFLOP/s"
    return text + (f", torch {r['torch_gflops']:.1f}" if r.get("torch_gflops") else "")


if __name__ == "__main__":
    main()
