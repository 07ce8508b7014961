"""arssr-jax: arbitrary-scale super-resolution of 3D MR images (ArSSR) in JAX/Flax.

Main entry points: :func:`upsample` (arrays), :func:`upsample_nifti` (files) and
:class:`Upsampler` (a model loaded once for many volumes); models
in :mod:`arssr_jax.models`; weights in :mod:`arssr_jax.weights`.
"""

from arssr_jax.errors import ArSSRError

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing the package (e.g. for its error type) must not pull in JAX.
    if name in ("upsample", "upsample_nifti", "Upsampler"):
        from arssr_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'arssr_jax' has no attribute {name!r}")


__all__ = ["ArSSRError", "Upsampler", "upsample", "upsample_nifti", "__version__"]
