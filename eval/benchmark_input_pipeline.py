"""Input-pipeline memory and speed: the volume cache vs volumes read into memory, and the
rate the pipeline feeds against the rate one GPU consumes.

Writes ``--count`` synthetic HR volumes of ``--shape`` voxels as uncompressed float32
NIfTI files (default: the paper's dataset size, 200 HCP-like 260 x 311 x 260 volumes,
about 17 GB; another 17 GB for their cache) into ``--dir`` (default: a new temporary
folder, removed at the end unless ``--keep``), then runs each case in a fresh process
and samples, every 20 ms, the anonymous resident memory (``RssAnon`` in
``/proc/PID/status``: not file-backed pages) summed over that process and all its
descendants (grain's worker processes):

1. the volume cache (``DataConfig.cache_dir``): the one-time conversion, then training
   batches of the paper's sample (40^3 patch, scale round(U(2, 4.04), 1), corner-aligned
   cubic degradation to 10^3, K = 8000, batch 15) with 0, 1 and 2 worker processes:
   peak memory, samples/s (wall) and CPU seconds per sample (all processes);
2. the path without the cache (``cache_dir=None``: every volume read into memory, and
   pickled into every worker): the same measured at ``--memory-counts`` volumes, which fit in memory, and
   extrapolated linearly to ``--count``;
3. one sample's CPU cost, split into its parts;
4. the rate one GPU step needs: the paper model's FLOPs per sample (``arssr_jax.flops``;
   a training step taken as 3x the forward pass), a stated GPU rate and utilisation,
   and so the CPU cores per GPU the pipeline needs.

    python eval/benchmark_input_pipeline.py                     # the full figures (~35 GB of disk)
    python eval/benchmark_input_pipeline.py --count 6 --shape 96 96 96 --memory-counts 2 4 --batches 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from arssr_jax.memory import host_available_bytes
from arssr_jax.testing.benchmarking import CHIP_PEAKS, MemorySampler, tree_cpu_seconds, write_volumes

GPU = "H100 SXM"
GPU_RATES = {  # dense peak FLOP/s of the chip a GPU estimate is for (arssr_jax.testing.benchmarking)
    f"{GPU} BF16 tensor cores": CHIP_PEAKS[GPU]["bfloat16"],
    f"{GPU} TF32 tensor cores (float32 at JAX's default GPU matmul precision)": CHIP_PEAKS[GPU]["float32"],
    f"{GPU} FP32 (no tensor cores)": CHIP_PEAKS[GPU]["fp32"],
}


# -- the child process: one measured case ------------------------------------------------

def paper_data_config(cache_dir, workers: int):
    from arssr_jax.training.config import paper

    return dataclasses.replace(paper().data, cache_dir=cache_dir, worker_count=workers)


def child(spec: dict) -> None:
    """Run one case, printing JSON lines: phases (with wall times) and the result."""

    def say(**values):
        print(json.dumps(values), flush=True)

    from arssr_jax.data import load_volumes, make_train_iterator

    paths = spec["paths"]
    say(event="phase", name="load", t=time.time())
    t0 = time.perf_counter()
    volumes = load_volumes(paths, cache_dir=spec["cache_dir"], progress=not spec["quiet"])
    load_s = time.perf_counter() - t0
    say(event="phase", name="loaded", t=time.time())
    result = {"load_s": load_s, "volumes": len(volumes)}
    if spec["workers"] is not None:
        config = paper_data_config(spec["cache_dir"], spec["workers"])
        it = make_train_iterator(config, volumes, process_index=0, process_count=1)
        try:
            t0 = time.perf_counter()
            next(it)  # worker start-up
            result["first_batch_s"] = time.perf_counter() - t0
            say(event="phase", name="iterate", t=time.time())
            # Timed over the second half only: the batches the workers buffered ahead during
            # start-up are consumed in the first half, so the second half runs at the rate
            # the pipeline produces.
            half = spec["batches"] // 2
            for _ in range(spec["batches"] - half):
                next(it)
            cpu0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
            for _ in range(half):
                next(it)
            wall = time.perf_counter() - t0
            cpu = tree_cpu_seconds(os.getpid()) - cpu0
        finally:
            say(event="phase", name="done", t=time.time())
            it.close()
        samples = half * config.batch_size
        result.update(samples_per_s=samples / wall, cpu_s_per_sample=float(cpu.sum()) / samples,
                      user_s_per_sample=float(cpu[0]) / samples, system_s_per_sample=float(cpu[1]) / samples,
                      samples=samples)
    say(event="result", **result)


def run_case(paths, cache_dir, workers, batches, quiet=True) -> dict:
    """A case in a fresh process: its result, and peak memory over the loading and iterating phases."""
    spec = {"paths": paths, "cache_dir": cache_dir, "workers": workers, "batches": batches, "quiet": quiet}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    phases, result = {}, None
    try:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "phase":
                phases[message["name"]] = message["t"]
            elif message.get("event") == "result":
                result = message
        proc.wait()
    finally:
        sampler.stop()
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"case {spec['cache_dir']!r}, {workers} workers failed (status {proc.returncode})")
    result["peak_load"] = sampler.peak(phases.get("load", -np.inf), phases.get("loaded", np.inf))
    if "iterate" in phases:
        result["peak_iterate"] = sampler.peak(phases["loaded"], phases.get("done", np.inf))
        result["steady_iterate"] = sampler.steady(phases["iterate"], phases.get("done", np.inf))
    result["peak"] = sampler.peak()
    return result


NO_CACHE_WORST_COPIES = 20  # the most copies of each volume the path without the cache was seen to hold at once (pickling)


# -- one sample's CPU cost ----------------------------------------------------------------

def sample_profile(volume: np.ndarray, count: int = 300) -> dict:
    """CPU milliseconds per sample of the paper's sample and of its parts (one process)."""
    from scipy import ndimage

    from arssr_jax.data.degrade import degrade
    from arssr_jax.data.samples import make_patch, make_sample, sample_coords

    config = paper_data_config(None, 0)
    rngs = [np.random.default_rng([0, 0, i]) for i in range(count)]

    def timed(fn, items):
        t0 = time.process_time()
        out = [fn(x) for x in items]
        return (time.process_time() - t0) / len(items) * 1e3, out

    make_sample(volume, config, np.random.default_rng(0))  # warm
    total, _ = timed(lambda r: make_sample(volume, config, r), rngs)
    rngs = [np.random.default_rng([0, 0, i]) for i in range(count)]
    patch, patches = timed(lambda r: make_patch(volume, config, r), rngs)
    hrs = [hr for hr, _, _ in patches]
    degrade_ms, _ = timed(lambda hr: degrade(hr, config.lr_size, config.degrade, config.antialias), hrs)
    prefilter, _ = timed(lambda hr: ndimage.spline_filter(hr, order=3, output=np.float64, mode="constant"), hrs)
    coords, _ = timed(lambda hr: sample_coords(hr, config.samples_per_step, np.random.default_rng(1)), hrs)
    sizes = [hr.shape[0] for hr in hrs]
    return {"sample_ms": total, "patch_and_degrade_ms": patch, "degrade_ms": degrade_ms,
            "prefilter_ms": prefilter, "cut_patch_ms": patch - degrade_ms, "coords_ms": coords,
            "hr_edge_mean": float(np.mean(sizes))}


def gpu_need(utilisation: float) -> dict:
    from arssr_jax.flops import decoder_flops_per_voxel, encoder_flops_per_voxel
    from arssr_jax.training.config import paper

    config = paper()
    lr_voxels = config.data.lr_size ** 3
    forward = (encoder_flops_per_voxel(config.model) * lr_voxels
               + decoder_flops_per_voxel(config.model) * config.data.samples_per_step)
    step = 3 * forward  # forward + backward (about twice the forward)
    return {"forward_flops_per_sample": forward, "train_flops_per_sample": step,
            "utilisation": utilisation,
            "rates": {name: rate * utilisation / step for name, rate in GPU_RATES.items()}}


# -- the benchmark ------------------------------------------------------------------------------

def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="synthetic volumes (default 200)")
    parser.add_argument("--shape", type=int, nargs=3, default=[260, 311, 260], help="volume shape (default HCP's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to time")
    parser.add_argument("--memory-workers", type=int, default=2, help="workers of the memory comparison")
    parser.add_argument("--memory-counts", type=int, nargs="+", default=[2, 8],
                        help="volume counts of the in-memory path (no cache) (default 2 8; counts whose worst case "
                        "would not fit in the available memory are skipped)")
    parser.add_argument("--batches", type=int, default=60,
                        help="batches per case after the first (15 samples each); the second half is timed")
    parser.add_argument("--utilisation", type=float, default=0.4,
                        help="fraction of the GPU's peak a training step reaches (default 0.4)")
    parser.add_argument("--dir", default=None, help="folder for the volumes and their cache, in its subfolders "
                        "volumes/ and cache/ (removed at the end unless --keep; default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic volumes and the cache")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    made = args.dir is None
    root = tempfile.mkdtemp(prefix="arssr-pipeline-bench-") if made else args.dir
    volume_bytes = 4 * int(np.prod(args.shape))
    needed = 2 * args.count * volume_bytes
    free = shutil.disk_usage(root).free
    if needed > free:
        raise SystemExit(f"{root}: {gb(needed)} needed (volumes and cache), {gb(free)} free; lower --count "
                         "or give --dir on a larger disk")
    print(f"{args.count} volumes of {tuple(args.shape)} float32 ({volume_bytes / 1e6:.1f} MB each, "
          f"{gb(args.count * volume_bytes)} in all) in {root}; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.2f} before starting", flush=True)
    results = {"count": args.count, "shape": args.shape, "volume_bytes": volume_bytes}
    try:
        t0 = time.perf_counter()
        paths = write_volumes(os.path.join(root, "volumes"), args.count, args.shape, args.quiet)
        print(f"wrote the volumes in {time.perf_counter() - t0:.0f} s", flush=True)
        cache = os.path.join(root, "cache")

        convert = run_case(paths, cache, None, 0, quiet=args.quiet)
        results["convert"] = convert
        print(f"\nvolume cache: converted {args.count} volumes in {convert['load_s']:.0f} s "
              f"({convert['load_s'] / args.count:.2f} s each), peak RssAnon {gb(convert['peak_load']['RssAnon'])}",
              flush=True)

        print(f"\nthe paper's sample (40^3 patch, scale round(U(2, 4.04), 1), cubic zoom to 10^3, K = 8000), "
              f"batch 15, the last {args.batches // 2} of {args.batches} batches timed, {args.count} cached volumes:")
        print("  workers  samples/s  CPU ms/sample (user + system)  peak RssAnon (all processes)  RssShmem  processes",
              flush=True)
        speed = {}
        for workers in args.workers:
            r = run_case(paths, cache, workers, args.batches)
            speed[workers] = r
            peak = r["peak"]
            cpu = (f"{1e3 * r['cpu_s_per_sample']:.2f} ({1e3 * r['user_s_per_sample']:.2f} + "
                   f"{1e3 * r['system_s_per_sample']:.2f})")
            print(f"  {workers:7d}  {r['samples_per_s']:9.0f}  {cpu:>29}  "
                  f"{gb(peak['RssAnon']):>28}  {gb(peak['RssShmem']):>8}  {peak['processes']:9d}", flush=True)
        results["cached"] = speed
        if args.memory_workers not in speed:
            speed[args.memory_workers] = run_case(paths, cache, args.memory_workers, args.batches)
        cached_peak = speed[args.memory_workers]["peak"]["RssAnon"]

        print(f"\nwithout the cache (volumes read into memory, pickled into each of "
              f"{args.memory_workers} workers):", flush=True)
        no_cache = {}
        for n in sorted(set(min(n, args.count) for n in args.memory_counts)):
            worst = NO_CACHE_WORST_COPIES * n * volume_bytes + 2e9
            if worst > 0.8 * host_available_bytes():
                print(f"  {n:4d} volumes: skipped (up to {gb(worst)} at worst, {gb(host_available_bytes())} available)")
                continue
            r = run_case(paths[:n], None, args.memory_workers, max(10, args.batches // 4))
            no_cache[n] = r
            print(f"  {n:4d} volumes: RssAnon {gb(r['steady_iterate'])} while iterating, peak "
                  f"{gb(r['peak']['RssAnon'])} (while starting the workers)", flush=True)
        results["no_cache"] = no_cache
        counts = sorted(no_cache)
        if len(counts) >= 2:
            a, b = counts[0], counts[-1]
            fits = {}
            for key, value in (("steady", lambda r: r["steady_iterate"]), ("peak", lambda r: r["peak"]["RssAnon"])):
                slope = (value(no_cache[b]) - value(no_cache[a])) / (b - a)
                base = value(no_cache[a]) - slope * a
                fits[key] = {"per_volume": slope, "base": base, "at_count": base + slope * args.count}
                print(f"  -> {key}: {slope / 1e6:.0f} MB per volume = {slope / volume_bytes:.1f} copies of each "
                      f"volume; extrapolated to {args.count} volumes: {gb(base + slope * args.count)}")
            results["no_cache_extrapolated"] = fits
        print(f"\npeak anonymous memory, {args.count} volumes, {args.memory_workers} workers: volume cache "
              f"{gb(cached_peak)}" + (f"; without it {gb(results['no_cache_extrapolated']['steady']['at_count'])} "
                                      f"while iterating, {gb(results['no_cache_extrapolated']['peak']['at_count'])} "
                                      "at its peak (extrapolated)" if "no_cache_extrapolated" in results else ""),
              flush=True)

        from arssr_jax.data.cache import open_cached

        entry = sorted(os.listdir(cache))
        volume = open_cached(os.path.join(cache, next(n for n in entry if n.endswith(".npy"))))
        profile = sample_profile(volume)
        results["profile"] = profile
        print(f"\none sample, CPU (this process): {profile['sample_ms']:.2f} ms = cut the patch "
              f"{profile['cut_patch_ms']:.2f} + cubic zoom {profile['degrade_ms']:.2f} (of which the spline "
              f"prefilter over the whole HR patch, mean edge {profile['hr_edge_mean']:.0f}: "
              f"{profile['prefilter_ms']:.2f}) + K coordinates {profile['coords_ms']:.2f} ms", flush=True)

        need = gpu_need(args.utilisation)
        results["gpu"] = need
        with_workers = [w for w in speed if w > 0] or list(speed)
        pipeline = speed[min(with_workers)]["cpu_s_per_sample"]
        warm = profile["sample_ms"] / 1e3
        print(f"\nthe GPU's need: the paper's model (RDN, 10^3 LR, K = 8000) costs "
              f"{need['forward_flops_per_sample'] / 1e9:.1f} GFLOP forward per sample, "
              f"{need['train_flops_per_sample'] / 1e9:.1f} GFLOP per training sample (a step = 3x the forward "
              f"pass); a GPU at {100 * args.utilisation:.0f}% of its peak needs, and the CPU cores that "
              f"feed it at {1e3 * pipeline:.2f} CPU ms per sample (the pipeline above, {min(with_workers)} "
              f"worker(s), all processes, volumes read from disk) / {1e3 * warm:.2f} ms (one sample, "
              "volume in memory):")
        cores = {}
        for name, rate in need["rates"].items():
            cores[name] = (rate * pipeline, rate * warm)
            print(f"  {name}, {GPU_RATES[name] / 1e12:.0f} TFLOP/s: {rate:,.0f} samples/s = {rate / 15:,.0f} "
                  f"steps/s -> {rate * pipeline:.1f} / {rate * warm:.1f} CPU cores per GPU")
        results["cores_per_gpu"] = cores
    finally:
        if not args.keep:
            target = root if made else None
            if target:
                shutil.rmtree(target, ignore_errors=True)
            else:
                for sub in ("volumes", "cache"):
                    shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
