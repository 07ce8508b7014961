"""Intensity normalisation: the one rule training volumes and inference inputs share.

A volume is mapped affinely so that its 0.5th percentile goes to 0 and its 99.5th to 1
(values outside stay outside: nothing is clipped), and the output is mapped back with
the same two numbers. Percentiles, not the minimum and maximum, so that a few outlier
voxels (a hot spike, a negative spline undershoot) cannot compress or shift the rest.
Volumes whose percentiles coincide (almost all one value) fall back to the min and max.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arssr_jax.errors import ArSSRError

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
MAX_SAMPLE = 2_000_000  # voxels used to estimate the percentiles of a large volume


@dataclass(frozen=True)
class Normalisation:
    """``apply`` maps [low, high] to [0, 1]; ``undo`` maps back."""

    low: float
    high: float

    @classmethod
    def of(cls, volume, name: str = "the input volume") -> "Normalisation":
        values = np.asarray(volume).reshape(-1)
        if values.size > MAX_SAMPLE:  # a fixed, evenly spaced subset: deterministic and fast
            values = values[:: -(-values.size // MAX_SAMPLE)]
        values = values.astype(np.float64)
        low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
        if not high > low:
            low, high = float(np.min(volume)), float(np.max(volume))
        if not high > low:
            raise ArSSRError(f"{name} is constant ({low}); there is nothing to super-resolve")
        return cls(float(low), float(high))

    def apply(self, volume) -> np.ndarray:
        return ((np.asarray(volume, np.float64) - self.low) / (self.high - self.low)).astype(np.float32)

    def undo(self, volume) -> np.ndarray:
        return (np.asarray(volume, np.float64) * (self.high - self.low) + self.low).astype(np.float32)
