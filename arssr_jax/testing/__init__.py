"""Support for the tests and the benchmarks (eval/), never imported by the library itself.

- :mod:`arssr_jax.testing.torch_reference`: a PyTorch mirror of the reference ArSSR
  (imports torch: install the ``test`` extra);
- :mod:`arssr_jax.testing.benchmarking`: timers, a process-tree memory sampler, synthetic
  volumes, the chips' peak FLOP rates.

Importing this package imports neither torch nor JAX.
"""
