"""The batch element of each task, made from one patch draw of the input pipeline.

grain's worker processes unpickle the example maker, so this module stays light (numpy,
scipy and the data layer; nothing here needs JAX).

* ArSSR: :data:`arssr_jax.data.make_sample`, the LR patch and K points of its HR patch.
* A fixed-scale baseline CNN: :data:`make_tricubic_pair`, the LR patch tricubic-upsampled
  onto its HR patch's grid (the CNN's input) and the HR patch (its target).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from arssr_jax.data import DataConfig
from arssr_jax.data.samples import Example, make_patch
from arssr_jax.errors import ArSSRError
from arssr_jax.interpolation import tricubic


@dataclasses.dataclass(frozen=True)
class TricubicPair:
    """``input (m, m, m, 1)``: the LR patch upsampled onto its HR patch's voxel centres by
    :func:`arssr_jax.interpolation.tricubic`; ``target (m, m, m, 1)``: that HR patch; both
    float32. Only the draws of :func:`~arssr_jax.data.samples.make_patch`.

    The examples of a batch must have one shape, so the config must fix one isotropic scale.
    """

    def __call__(self, volume: np.ndarray, config: DataConfig, rng: np.random.Generator) -> Example:
        hr, lr, _ = make_patch(volume, config, rng)
        return {"input": tricubic(lr, shape=hr.shape)[..., None], "target": hr[..., None]}

    def validate(self, config: DataConfig) -> DataConfig:
        if config.scale_min != config.scale_max or config.anisotropic or config.rounding != "none":
            raise ArSSRError(
                f"DataConfig.scale_min={config.scale_min!r}, scale_max={config.scale_max!r}, "
                f"anisotropic={config.anisotropic!r}, rounding={config.rounding!r}: a fixed-scale baseline "
                "needs one isotropic scale: set scale_min == scale_max, anisotropic=False and rounding='none'")
        return config.validate(points=False)


make_tricubic_pair = TricubicPair()
