"""Model runners: one callable per table row, ``runner(lr, hr_shape) -> SR volume``.

Every runner decodes onto the voxel-centre HR grid of ``hr_shape`` over the LR field
of view (HR voxel i at LR index (i + 0.5) * n / m - 0.5), so all rows are compared on
the same voxels:

* interpolation (``tricubic`` always, ``nearest`` on request): any scale;
* fixed-scale baseline CNNs (``--baseline NAME:DIR``): tricubic onto the HR grid, then
  the network; a baseline runs only at the scale it was trained for;
* ArSSR models (``--arssr [LABEL=]DIR_OR_NAME``): ``arssr_jax.inference.upsample``
  with ``shape=hr_shape``, any scale, normalising the input exactly as
  ``arssr-jax upsample`` does (``normalize=False``: fed as it is, for the reference's
  released weights, which expect [0, 1]).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.interpolation import INTERPOLATORS
from arssr_jax.models import baselines
from arssr_jax.weights.baseline_dir import load_baseline

SCALE_TOLERANCE = 1e-6


@dataclass(eq=False)
class Runner:
    label: str  # the row name in the tables and figures
    kind: str  # "interpolation", "baseline" or "arssr"
    fn: Callable[[np.ndarray, tuple], np.ndarray]
    scale: Optional[float] = None  # fixed-scale models: the one scale they serve
    info: dict = field(default_factory=dict)

    def serves(self, scale: float) -> bool:
        return self.scale is None or math.isclose(self.scale, scale, rel_tol=0, abs_tol=SCALE_TOLERANCE)

    def __call__(self, lr, shape) -> np.ndarray:
        out = np.asarray(self.fn(np.asarray(lr, np.float32), tuple(int(m) for m in shape)), np.float32)
        if out.shape != tuple(shape):
            raise AssertionError(f"{self.label} returned shape {out.shape}, expected {tuple(shape)}")
        return out


def interpolation_runner(name: str = "tricubic") -> Runner:
    if name not in INTERPOLATORS:
        raise ArSSRError(f"unknown interpolation {name!r}; choose one of {sorted(INTERPOLATORS)}")
    function = INTERPOLATORS[name]
    return Runner(name, "interpolation", lambda lr, shape: function(lr, shape=shape))


def baseline_runner(spec: str, tile: int = 64) -> Runner:
    """``NAME:DIR`` (NAME = the row label) or a bare DIR (label: the architecture's name)."""
    label, directory = _split(spec, ":")
    if not Path(directory).is_dir():
        raise ArSSRError(f"--baseline {spec}: {directory} is not a directory; give NAME:DIR of a trained baseline")
    module, params, document = load_baseline(directory)
    label = label or document["baseline"]
    fn = lambda lr, shape: baselines.run_baseline(module, params, lr, shape, tile=tile)
    info = {"architecture": document["baseline"], "directory": str(directory)}
    return Runner(label, "baseline", fn, scale=float(document["scale"]), info=info)


def arssr_runner(spec, tile=None, chunk=None, normalize=True, consistency=None, adapt=None) -> Runner:
    """``[LABEL=]DIR_OR_NAME`` or a (module, params) pair; the label defaults to ArSSR-<encoder>.
    ``consistency``: override the model's own (None: keep it). ``adapt``: an
    :class:`~arssr_jax.adapt.AdaptConfig`: each LR is adapted to before it is decoded (label
    suffix " adapted")."""
    from arssr_jax.inference import Upsampler

    label, model = (None, spec) if isinstance(spec, tuple) else _split(str(spec), "=")
    upsampler = Upsampler(model, consistency=consistency, normalize=normalize, tile=tile, chunk=chunk)
    label = label or f"ArSSR-{upsampler.config.encoder}"
    info = {"source": "in memory" if isinstance(spec, tuple) else str(model), "encoder": upsampler.config.encoder}
    if adapt is None:
        return Runner(label, "arssr", lambda lr, shape: upsampler(lr, shape=shape), info=info)
    from arssr_jax.adapt import Adaptation

    adaptation = Adaptation(adapt)
    skipped = []  # (LR shape, why) of the inputs decoded with the start model

    def fn(lr, shape):
        try:
            return upsampler(lr, shape=shape, adapt=adaptation)
        except ArSSRError as error:  # e.g. too small to cut pairs from: the row shows the start model there
            skipped.append((tuple(lr.shape), str(error)))
            print(f"{label} adapted: {error}; this case is decoded with the start model", file=sys.stderr)
            return upsampler(lr, shape=shape)

    return Runner(f"{label} adapted", "arssr", fn, info=dict(info, adapt=asdict(adapt), skipped=skipped))


def _split(spec: str, separator: str) -> tuple[Optional[str], str]:
    """'LABEL<sep>PATH' -> (LABEL, PATH); a bare PATH (or one that exists as given) -> (None, PATH)."""
    if separator in spec and not Path(spec).exists():
        label, rest = spec.split(separator, 1)
        if label and rest:
            return label, rest
    return None, spec


def unique_labels(runners: list[Runner]) -> None:
    """Refuse two rows with the same label at one scale (their results would be merged)."""
    seen = {}
    for r in runners:
        key = (r.label, r.scale)
        if key in seen or (r.scale is None and any(k[0] == r.label for k in seen)) or (
                r.scale is not None and (r.label, None) in seen):
            raise ArSSRError(f"two models are labelled {r.label!r}; give distinct labels (LABEL=DIR for --arssr, "
                             "NAME:DIR for --baseline)")
        seen[key] = r
