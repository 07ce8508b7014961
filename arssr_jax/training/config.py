"""Training configuration: plain, typed, printable dataclasses, saved as JSON in the workdir.

A run is described by one :class:`TrainConfig` holding the model
(:class:`~arssr_jax.models.ModelConfig`), the input pipeline
(:class:`~arssr_jax.data.DataConfig`), the optimiser (:class:`OptimConfig`) and the
validation (:class:`ValidationConfig`). Two presets: :func:`paper` (the paper's setup)
and :func:`cpu_small` (a small model that learns something real on 2 CPU cores in a
few minutes). :func:`load_config` takes a preset name, a ``.json`` file (as saved in
a workdir) or a ``.py`` file defining ``get_config()``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Optional, Tuple

from arssr_jax.data import AugmentConfig, DataConfig, make_sample
from arssr_jax.errors import ArSSRError
from arssr_jax.models import ModelConfig
from arssr_jax.models.baselines import build_baseline
from arssr_jax.training.examples import make_tricubic_pair
from arssr_jax.weights.workdir import TRAIN_CONFIG_FILE

CONFIG_FILE = TRAIN_CONFIG_FILE  # not config.json: that name marks a model directory
FORMAT = "arssr-jax-train/1"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with a step-wise decaying learning rate (the reference: x0.5 every 200 epochs).

    The learning rate is ``learning_rate * decay_factor ** floor(step / (decay_every_epochs
    * steps_per_epoch))``; ``steps_per_epoch`` comes from the data (see ``TrainConfig``).
    ``clip_grad_norm``: clip the global gradient norm to this value (None: off, as the
    reference).
    """

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    decay_every_epochs: float = 200.0
    decay_factor: float = 0.5
    clip_grad_norm: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Validation patches: every HR voxel is predicted (chunked decode).

    paths:              validation volumes (as ``DataConfig.paths``); empty: the training
                        volumes (patch positions then come from ``seed``, not the training
                        stream; fine for smoke runs, not for model selection).
    scales:             isotropic scales; each patch is cut once and degraded at each.
    patches_per_volume: patches per volume.
    max_volumes:        use only the first this many volumes (None: all).
    seed:               patch positions.
    chunk:              HR coordinates decoded per call (one compilation).
    every_epochs:       validate and checkpoint every this many epochs (and at the end).
    every_steps:        the same in steps; overrides ``every_epochs`` when set.
    """

    paths: Tuple[str, ...] = ()
    scales: Tuple[float, ...] = (2.0, 2.5, 3.0, 3.5, 4.0)
    patches_per_volume: int = 1
    max_volumes: Optional[int] = None
    seed: int = 1
    chunk: int = 32768
    every_epochs: float = 1.0
    every_steps: Optional[int] = None

    def __post_init__(self):
        paths = self.paths
        if isinstance(paths, (str, os.PathLike)):
            paths = (paths,)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """A fixed-scale baseline CNN to train instead of ArSSR (``arssr_jax.models.baselines``).

    name:    ``SRCNN3D``, ``DCSRN`` or ``ResCNN``.
    options: keyword arguments of its module (e.g. ``{"filters": [32, 16]}``); {} = defaults.

    Its one scale is the data's (``data.scale_min == data.scale_max``, isotropic); the
    validation scales must be just that scale.
    """

    name: str = "SRCNN3D"
    options: dict = dataclasses.field(default_factory=dict)


LOSSES = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; ``train_config.json`` in the workdir is this, as JSON.

    epochs:         length of the run; an epoch is ``data.steps_per_epoch(n_volumes)``
                    steps (``samples_per_volume`` patches of every volume).
    steps:          total steps; overrides ``epochs`` when set.
    seed:           parameter initialisation and the state's PRNG key (the data stream
                    has its own ``data.seed``).
    log_every:      steps between JSONL log records (losses are averaged over them).
    keep_last:      recent checkpoints kept, besides the best by validation L1.
    baseline:       None trains ArSSR (``model``); a :class:`BaselineConfig` trains that
                    fixed-scale CNN instead (``model`` is then unused).
    loss:           ArSSR's training loss over the K predictions: "l1" (mean absolute
                    error, the reference) or "l2" (mean squared error: the conditional mean,
                    more cautious where the input is ambiguous).
    loss_balance:   0 (the plain mean) or an exponent a > 0: each patch's K targets are binned
                    into tenths of the patch's intensity range and weighted by (bin count)^-a,
                    mean 1 per patch, so rare intensities (bright vessels, dark CSF pockets,
                    partial-volume rims) are not traded for the common ones (ArSSR only).
    ssim_weight:    0 (off) or w > 0: the loss adds w x the mean (1 - SSIM) over cubes of
                    ``data.sample_cube``^3 neighbouring targets (ArSSR only; needs sample_cube
                    >= 2). The mean squared error alone predicts the expected value, smoother
                    than any one truth where the LR cannot tell the texture; SSIM's contrast
                    factor charges for that smoothness.
    init_output:    None keeps the model's initialisation; a value v zeroes the decoder's
                    last layer's weights and sets its bias to v, so training starts from
                    the prediction v everywhere with the final ReLU active. (With random
                    last-layer weights, the final ReLU is closed for every input about half
                    the time: the non-negative hidden activations make the output's sign
                    nearly constant, and such a model never trains.)
    init_from:      None starts from ``seed``'s random initialisation; a model directory,
                    training workdir or shipped name starts from that model's parameters,
                    with fresh Adam moments at step 0 (fine-tuning: a released model on your
                    own scans, or a second stage under another recipe). Its parameters must
                    fit ``model`` and its ``residual`` must match (ArSSR only).
    """

    name: str = "custom"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    val: ValidationConfig = ValidationConfig()
    epochs: float = 2500.0
    steps: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    keep_last: int = 3
    init_output: Optional[float] = None
    baseline: Optional[BaselineConfig] = None
    loss: str = "l1"
    loss_balance: float = 0.0
    ssim_weight: float = 0.0
    init_from: Optional[str] = None

    # -- derived quantities ----------------------------------------------------
    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, int(math.ceil(self.epochs * steps_per_epoch)))

    def eval_every_steps(self, steps_per_epoch: int) -> int:
        if self.val.every_steps is not None:
            return max(1, int(self.val.every_steps))
        return max(1, int(round(self.val.every_epochs * steps_per_epoch)))

    def decay_every_steps(self, steps_per_epoch: int) -> int:
        return max(1, int(round(self.optim.decay_every_epochs * steps_per_epoch)))

    # -- edits, checks, (de)serialisation --------------------------------------
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def with_data_paths(self, paths) -> "TrainConfig":
        return self.replace(data=dataclasses.replace(self.data, paths=paths))

    def with_val_paths(self, paths) -> "TrainConfig":
        return self.replace(val=dataclasses.replace(self.val, paths=paths))

    def validate(self) -> "TrainConfig":
        """Raise ArSSRError naming the first bad field; return self."""
        if self.baseline is not None:
            self._validate_baseline()
        if self.loss not in LOSSES:
            raise ArSSRError(f"loss={self.loss!r}: use one of {LOSSES}")
        if not (isinstance(self.loss_balance, (int, float)) and 0.0 <= self.loss_balance <= 4.0):
            raise ArSSRError(f"loss_balance={self.loss_balance!r}: use an exponent from 0 (off) to 4, e.g. 0.5")
        if not (isinstance(self.ssim_weight, (int, float)) and 0.0 <= self.ssim_weight <= 10.0):
            raise ArSSRError(f"ssim_weight={self.ssim_weight!r}: use a weight from 0 (off) to 10, e.g. 0.02")
        if self.ssim_weight and (self.baseline is not None or self.data.sample_cube < 2):
            raise ArSSRError(f"ssim_weight={self.ssim_weight!r} needs ArSSR targets drawn in cubes: set "
                             "data.sample_cube >= 2 (e.g. 5 with samples_per_step 4000), or ssim_weight=0")
        if self.init_from is not None:
            if self.baseline is not None:
                raise ArSSRError(f"init_from={self.init_from!r} starts an ArSSR model; a baseline run cannot use it")
            if self.init_output is not None:
                raise ArSSRError(f"init_from={self.init_from!r} with init_output={self.init_output!r}: the "
                                 "latter would overwrite the loaded last layer; set init_output=None")
        # the data as the task's examples need it (ArSSR: K points per patch; a baseline: one scale)
        (make_sample if self.baseline is None else make_tricubic_pair).validate(self.data)
        o = self.optim
        if not (o.learning_rate > 0):
            raise ArSSRError(f"optim.learning_rate={o.learning_rate!r}: must be > 0")
        if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
            raise ArSSRError(f"optim.b1/b2=({o.b1}, {o.b2}): must lie in [0, 1)")
        if not (o.decay_every_epochs > 0 and 0 < o.decay_factor <= 1):
            raise ArSSRError("optim.decay_every_epochs must be > 0 and optim.decay_factor in (0, 1]")
        if o.clip_grad_norm is not None and not o.clip_grad_norm > 0:
            raise ArSSRError(f"optim.clip_grad_norm={o.clip_grad_norm!r}: must be > 0 or null")
        if self.steps is not None and self.steps < 1:
            raise ArSSRError(f"steps={self.steps}: must be >= 1 (or null to use epochs)")
        if self.steps is None and not self.epochs > 0:
            raise ArSSRError(f"epochs={self.epochs}: must be > 0")
        if self.log_every < 1 or self.keep_last < 1:
            raise ArSSRError("log_every and keep_last must be >= 1")
        v = self.val
        if not v.scales or v.patches_per_volume < 1 or v.chunk < 1:
            raise ArSSRError("val.scales must be non-empty, val.patches_per_volume and val.chunk >= 1")
        biggest = max(int(self.data.lr_size * s) for s in v.scales)
        if biggest > self.data.patch_size:
            raise ArSSRError(f"val.scales={v.scales}: int(lr_size * s) = {biggest} exceeds "
                             f"data.patch_size={self.data.patch_size}; lower the scales")
        return self

    def _validate_baseline(self) -> None:
        build_baseline(self.baseline.name, self.baseline.options)  # names and options checked
        scale = self.data.scale_min
        if tuple(self.val.scales) != (scale,):
            raise ArSSRError(f"baseline {self.baseline.name} serves scale {scale:g} only; set val.scales=({scale:g},)")

    @property
    def baseline_scale(self) -> Optional[float]:
        """The one scale a baseline run trains for (None for ArSSR)."""
        return None if self.baseline is None else float(self.data.scale_min)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of ``to_dict()`` (or a saved ``train_config.json``). Configs written before
        the task was the config's ``baseline`` alone hold ``data.task`` ("arssr" or "baseline",
        always agreeing with ``baseline``): it is dropped."""
        values = {k: v for k, v in values.items() if k != "format"}
        try:
            nested = {
                "model": lambda d: ModelConfig.from_dict(dict(d)),
                "data": lambda d: _build(DataConfig, _without(d, LEGACY_DATA_KEYS),
                                         augment=lambda a: _build(AugmentConfig, a)),
                "optim": lambda d: _build(OptimConfig, d),
                "val": lambda d: _build(ValidationConfig, d),
                "baseline": lambda d: None if d is None else _build(BaselineConfig, d),
            }
            return _build(cls, values, **nested)
        except (TypeError, ValueError) as error:
            raise ArSSRError(f"invalid training config: {error}") from None

    def __str__(self) -> str:
        return self.to_json()


LEGACY_DATA_KEYS = ("task",)  # read from old train_config.json files and ignored


def _without(values, keys):
    return {k: v for k, v in values.items() if k not in keys} if isinstance(values, dict) else values


def _build(cls, values, **converters):
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}")
    kwargs = {}
    for key, value in values.items():
        if key in converters:
            value = converters[key](value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# -- presets ---------------------------------------------------------------------


def sample_volume_path() -> str:
    """A T1w volume available offline: nilearn's MNI152 2009a template (1 mm, 197x233x189)
    when nilearn is installed, else nibabel's small test volume ``anatomical.nii``
    (33x41x25 at 2 mm)."""
    try:
        import nilearn

        path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    import nibabel

    return os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")


def paper(data_paths=(), val_paths=()) -> TrainConfig:
    """The paper's setup (docs/REFERENCE.md section 3): RDN, N=15, K=8000, LR 10^3, scales
    round(U(2, 4.04), 1), reference (corner-aligned) degradation, 6 patches per subject
    per epoch, Adam 1e-4 halved every 200 epochs, 2500 epochs, validation every epoch
    on 40^3 patches at scales 2..4, best checkpoint kept."""
    return TrainConfig(
        name="paper",
        model=ModelConfig(encoder="RDN"),
        data=DataConfig.reference(paths=data_paths, worker_count=8, read_threads=4, prefetch=4),
        optim=OptimConfig(learning_rate=1e-4, decay_every_epochs=200, decay_factor=0.5),
        val=ValidationConfig(paths=val_paths, scales=(2.0, 2.5, 3.0, 3.5, 4.0), every_epochs=1.0),
        epochs=2500,
        log_every=50,
        keep_last=3,
        init_output=0.5,
    )


def cpu_small(data_paths=None, val_paths=()) -> TrainConfig:
    """A ~3-minute run on 2 CPU cores that learns something real (see .notes/training.md):
    it ends above trilinear interpolation on its validation patches.

    A small ResCNN (2 blocks of 2 convs, 16 features; its input skip gives the decoder
    the LR intensity from the start), feature_dim 32, decoder depth 8 / width 64; LR 8^3
    patches, scales U(2, 3) (HR patches up to 24^3, so nibabel's small anatomical.nii also
    fits), N=4, K=1024, voxel-centred degradation; Adam 1e-3 halved every 10 epochs, 30
    epochs of 50 steps (1500 steps). Data default: :func:`sample_volume_path` (one
    volume; validation patches come from it too, at other positions).
    """
    if data_paths is None:
        data_paths = (sample_volume_path(),)
    return TrainConfig(
        name="cpu_small",
        model=ModelConfig(encoder="ResCNN", feature_dim=32, decoder_width=64,
                          encoder_options={"num_features": 16, "num_blocks": 2, "convs_per_block": 2}),
        data=DataConfig(paths=data_paths, patch_size=24, margin=0, lr_size=8, scale_min=2.0, scale_max=3.0,
                        degrade="centred", samples_per_step=1024, batch_size=4, samples_per_volume=200,
                        seed=0, worker_count=0, read_threads=1, prefetch=2),
        optim=OptimConfig(learning_rate=1e-3, decay_every_epochs=10, decay_factor=0.5),
        val=ValidationConfig(paths=val_paths, scales=(2.0, 3.0), patches_per_volume=4, every_epochs=1.0,
                             chunk=8192),
        epochs=30,
        log_every=10,
        keep_last=2,
        init_output=0.5,
    )


def tiny(data_paths=None, val_paths=()) -> TrainConfig:
    """A seconds-long smoke test (and the tests' model): a minimal RDN, LR 6^3, K=64, N=4."""
    if data_paths is None:
        data_paths = (sample_volume_path(),)
    return TrainConfig(
        name="tiny",
        model=ModelConfig(encoder="RDN", feature_dim=8, decoder_depth=4, decoder_width=16,
                          encoder_options={"num_blocks": 1, "num_layers": 1, "num_features": 8, "growth": 8}),
        data=DataConfig(paths=data_paths, patch_size=18, margin=0, lr_size=6, scale_min=2.0, scale_max=3.0,
                        samples_per_step=64, batch_size=4, samples_per_volume=8, seed=0, prefetch=1),
        optim=OptimConfig(learning_rate=1e-3, decay_every_epochs=10),
        val=ValidationConfig(paths=val_paths, scales=(2.0, 3.0), patches_per_volume=1, every_steps=3, chunk=1024),
        epochs=1,
        log_every=1,
        keep_last=2,
        init_output=0.5,
    )


def baseline(name: str, scale: float, data_paths=None, val_paths=(), options=None, patch: int = 32) -> TrainConfig:
    """A fixed-scale baseline CNN (SRCNN3D, DCSRN, ResCNN) trained for one ``scale``.

    The paper trains each baseline with the same recipe as ArSSR: L1 loss, Adam 1e-4;
    the input is the LR patch upsampled back to the HR grid by tricubic interpolation.
    HR patches of about ``patch``^3 voxels (LR round(patch / scale)^3), batch 4, voxel-centred
    degradation; 100 steps per epoch, validation every 2 epochs on 4 patches per volume.
    ``options``: the module's keyword arguments (default: the paper-sized network).
    Data default: :func:`sample_volume_path`.
    """
    if data_paths is None:
        data_paths = (sample_volume_path(),)
    scale = float(scale)
    lr_size = max(2, int(round(patch / scale)))
    patch = int(lr_size * scale)
    return TrainConfig(
        name=f"baseline_{name}_x{scale:g}",
        data=DataConfig(paths=data_paths, patch_size=patch, margin=0, lr_size=lr_size, scale_min=scale,
                        scale_max=scale, degrade="centred", batch_size=4, samples_per_volume=400,
                        seed=0, worker_count=0, read_threads=1, prefetch=2),
        optim=OptimConfig(learning_rate=1e-4, decay_every_epochs=200, decay_factor=0.5),
        val=ValidationConfig(paths=val_paths, scales=(scale,), patches_per_volume=4, every_epochs=2.0),
        epochs=20,
        log_every=10,
        keep_last=2,
        baseline=BaselineConfig(name=name, options=dict(options or {})),
    )


PRESETS = {"paper": paper, "cpu_small": cpu_small, "tiny": tiny}


def load_config(spec) -> TrainConfig:
    """A preset name, a JSON file (a workdir's train_config.json) or a Python file with get_config()."""
    if isinstance(spec, TrainConfig):
        return spec
    name = str(spec)
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ArSSRError(f"config {name!r}: not a preset ({', '.join(PRESETS)}), a .json file or a .py file")
    if path.suffix == ".py":
        module_spec = importlib.util.spec_from_file_location(f"_arssr_train_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise ArSSRError(f"config {path}: failed to run ({type(error).__name__}: {error})") from None
        if not hasattr(module, "get_config"):
            raise ArSSRError(f"config {path}: defines no get_config(); add one returning a TrainConfig")
        config = module.get_config()
        if not isinstance(config, TrainConfig):
            raise ArSSRError(f"config {path}: get_config() returned {type(config).__name__}, not a TrainConfig")
        return config
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArSSRError(f"config {path}: not readable JSON ({error})") from None
    return TrainConfig.from_dict(values)


def save_config(config: TrainConfig, workdir) -> Path:
    """Write ``workdir/train_config.json`` atomically."""
    path = Path(workdir) / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(config.to_json() + "\n")
    os.replace(tmp, path)
    return path


def config_differences(a: TrainConfig, b: TrainConfig,
                       ignore=("steps", "epochs", "log_every", "data.cache_dir", "data.worker_count",
                               "data.read_threads", "data.prefetch", "model.conv_impl")) -> list:
    """Dotted names of the fields where two configs differ (ignored: run-length fields; how the
    input pipeline runs (the cache's folder, workers, threads, prefetch), which changes no batch;
    and the convolution's formulation, which changes no parameter: a run started on one machine
    resumes on another)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "encoder_options":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))
