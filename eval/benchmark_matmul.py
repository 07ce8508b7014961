"""The machine's float32 matrix-multiply rate: the roofline the other benchmarks compare against.

    python eval/benchmark_matmul.py                 # 262144 x 256 @ 256 x 256, jax and torch
    python eval/benchmark_matmul.py --m 65536 --json out.json

Prints GFLOP/s (2 m k n / best time of --repeats runs) for jnp.dot and, when torch is
installed, torch.matmul on all CPU threads. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os

from arssr_jax.testing.benchmarking import jax_matmul_gflops, torch_matmul_gflops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=262144)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    import jax

    shape = (args.m, args.k, args.n)
    result = {"m": args.m, "k": args.k, "n": args.n, "backend": jax.default_backend(), "cpus": os.cpu_count(),
              "jax_gflops": jax_matmul_gflops(*shape, repeats=args.repeats),
              "torch_gflops": None if args.no_torch else torch_matmul_gflops(*shape, repeats=args.repeats)}
    print(f"float32 matmul {args.m}x{args.k} @ {args.k}x{args.n} on {result['backend']} ({os.cpu_count()} CPUs)")
    print(f"  jnp.dot      {result['jax_gflops']:8.1f} GFLOP/s")
    if result["torch_gflops"] is not None:
        print(f"  torch.matmul {result['torch_gflops']:8.1f} GFLOP/s")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
