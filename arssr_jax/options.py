"""Inference options: how whole-volume inference runs and what it does after decoding.

The network is described by :class:`arssr_jax.models.ModelConfig`; everything here is
about running it on a volume and is not part of it: the intensity normalisation, the
data-consistency step (:mod:`arssr_jax.consistency`) and how the work is cut (decoder
chunk, encoder tile). A model directory saves the options a model is meant to run with
(``SAVED``) in its own ``"inference"`` block of ``config.json``; a run overrides any of
them. Every value is checked once, here, when the options are built: a bad one is an
:class:`~arssr_jax.errors.ArSSRError` naming the option and what it takes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys

import numpy as np

from arssr_jax.errors import ArSSRError

# Keys older model configs carried in their "model" block: the consistency step moved into
# the inference block; the dim damping was removed (its fields are ignored with a note).
MOVED_MODEL_KEYS = ("consistency",)
REMOVED_MODEL_KEYS = ("dim_damping", "dim_band")
SLICE_PROFILES = ("box", "gaussian")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """``consistency``: after decoding, the fraction (0 to 1) of the output's disagreement with
    its input removed, at every scale, or (scale, step) pairs, linear in between and held beyond
    the ends (0: the network's output as it is, as the reference). ``normalize``: map the
    input's 0.5th / 99.5th percentiles to 0 / 1 and back on output. ``chunk``: at most this many
    HR voxels per decoder call (None: by backend). ``tile``: the encoder's tile core in LR
    voxels, one or three (None: from free memory). ``slice_profile``: the input is a thick-slice
    acquisition whose slices measure the tissue with this profile ("box" or "gaussian") along its
    thick axis: the consistency step then makes the output's slices, measured so, agree with the
    input's (in place of ``consistency``'s point step); ``slice_thickness``: the box's thickness
    or the Gaussian's FWHM in mm (None: the slice spacing)."""

    consistency: float | tuple = 0.0
    normalize: bool = True
    chunk: int | None = None
    tile: int | tuple | None = None
    slice_profile: str | None = None
    slice_thickness: float | None = None

    SAVED = ("consistency",)  # what a model directory keeps; the rest is a run's business

    def __post_init__(self):
        object.__setattr__(self, "consistency", checked_schedule(self.consistency))
        if not isinstance(self.normalize, bool):
            raise ArSSRError(f"normalize must be True or False, got {self.normalize!r:.40}")
        if self.chunk is not None:
            object.__setattr__(self, "chunk", _positive_int(self.chunk, "--chunk", "HR voxels"))
        if self.tile is not None:
            tile = (self.tile,) * 3 if _is_number(self.tile) else tuple(_sequence(self.tile, "--tile"))
            if len(tile) != 3:
                raise ArSSRError(f"--tile takes one number of LR voxels or three, got {self.tile!r:.40}")
            object.__setattr__(self, "tile", tuple(_positive_int(t, "--tile", "LR voxels") for t in tile))
        if self.slice_profile not in (None,) + SLICE_PROFILES:
            raise ArSSRError(f"--slice-profile must be one of {', '.join(SLICE_PROFILES)}, got {self.slice_profile!r:.40}")
        if self.slice_thickness is not None:
            if not (_is_number(self.slice_thickness) and 0 < self.slice_thickness < math.inf):
                raise ArSSRError(f"--slice-thickness must be a positive number of mm, got {self.slice_thickness!r:.40}")
            object.__setattr__(self, "slice_thickness", float(self.slice_thickness))

    def replace(self, **overrides) -> "InferenceOptions":
        """These options with every override that is not None applied (checked)."""
        changes = {name: value for name, value in overrides.items() if value is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown inference options {sorted(unknown)}")
        return dataclasses.replace(self, **changes) if changes else self

    def saved(self) -> dict:
        """The block a model directory keeps (JSON-ready)."""
        return {"consistency": self.consistency if _is_number(self.consistency) else [list(p) for p in self.consistency]}

    @classmethod
    def from_saved(cls, block, source: str = "the model's config") -> "InferenceOptions":
        """Options from a model directory's ``"inference"`` block (missing: the defaults)."""
        block = {} if block is None else block
        if not isinstance(block, dict) or set(block) - set(cls.SAVED):
            extra = sorted(set(block) - set(cls.SAVED)) if isinstance(block, dict) else block
            raise ArSSRError(f"{source}: its inference block has unknown entries {extra!r:.60}; re-create the "
                             f"model directory (arssr-jax export)")
        try:
            return cls(**block)
        except ArSSRError as error:
            raise ArSSRError(f"{source}: {error}") from None

    def step_for(self, scale: float) -> float:
        """The consistency step at ``scale`` (HR voxels per LR voxel)."""
        if _is_number(self.consistency):
            return float(self.consistency)
        scales, steps = zip(*self.consistency)
        return float(np.interp(scale, scales, steps))  # held beyond the ends


def checked_schedule(schedule):
    """A consistency step (a number from 0 to 1) as a float, or (scale, step) pairs (a sequence,
    a {scale: step} mapping, or 'SCALE:STEP' strings as the command line gives them) as a tuple
    of float pairs sorted by scale."""
    if _is_step(schedule):
        return float(schedule)
    pairs = schedule.items() if isinstance(schedule, dict) else schedule
    try:
        pairs = [_pair(item) for item in pairs]
    except (TypeError, ValueError):
        pairs = []
    if not (pairs and all(_is_scale(s) and _is_step(step) for s, step in pairs)
            and len({s for s, _ in pairs}) == len(pairs)):
        raise ArSSRError(f"--consistency takes a step from 0 to 1, or SCALE:STEP pairs with distinct scales of at "
                         f"least 1 and steps from 0 to 1 (e.g. 2:0.75 3:0.25); got {schedule!r:.60}")
    return tuple(sorted(pairs))


def schedule_from_words(words):
    """``--consistency`` as the command line gives it: one step ('0.5') or SCALE:STEP words
    ('2:0.75', '3:0.25'); None stays None. Checked as :func:`checked_schedule` checks."""
    if words is None:
        return None
    if len(words) == 1 and ":" not in words[0]:
        try:
            return checked_schedule(float(words[0]))
        except ValueError:
            pass  # not a number: named by checked_schedule below
    return checked_schedule(list(words))


def split_model_block(model: dict, source: str) -> tuple[dict, dict]:
    """(the network's config, inference options it carried) from a ``"model"`` block written
    before the options had their own; removed fields are dropped with a one-line note."""
    model = dict(model)
    removed = [key for key in REMOVED_MODEL_KEYS if model.pop(key, None) is not None]
    if removed:
        print(f"{source}: note: ignoring {', '.join(removed)} (no longer supported)", file=sys.stderr)
    moved = {key: model.pop(key) for key in MOVED_MODEL_KEYS if key in model}
    return model, moved


def _pair(item) -> tuple[float, float]:
    if isinstance(item, str):
        item = item.split(":")
    scale, step = item
    scale, step = (float(v) if isinstance(v, str) else v for v in (scale, step))
    if not (_is_number(scale) and _is_number(step)):
        raise ValueError("not numbers")
    return float(scale), float(step)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _is_step(value) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


def _is_scale(value) -> bool:
    return _is_number(value) and 1.0 <= value < math.inf


def _sequence(value, flag):
    try:
        return list(value)
    except TypeError:
        raise ArSSRError(f"{flag} takes one number of LR voxels or three, got {value!r:.40}") from None


def _positive_int(value, flag, unit) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArSSRError(f"{flag} must be a positive number of {unit}, got {value!r:.40}; omit it for the default")
    return int(value)
