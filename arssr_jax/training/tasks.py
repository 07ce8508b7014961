"""What a run trains: ArSSR, or a fixed-scale baseline CNN, behind one interface (:class:`Task`).

The data pipeline, the loop, the pmapped step, checkpoints and logs are the same for
both; a task says what its batches hold (the example it makes from each patch draw),
how to initialise the parameters, the loss of a batch and how to validate:

* :class:`ArSSRTask`: examples are the LR patch and K points of the HR patch
  (``arssr_jax.data.make_sample``); the LR patch is encoded, the K coordinates decoded;
  L1 (or L2, optionally weighted towards rare intensities, optionally plus an SSIM term on
  cubes of neighbouring points) on them.
* :class:`BaselineTask`: examples are the tricubic-upsampled LR patch and the HR patch
  (``examples.make_tricubic_pair``); the CNN maps one to the other; L1 on every HR voxel
  (the paper trains its baselines this way, one model per scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Protocol

from arssr_jax.data import ExampleMaker, make_sample
from arssr_jax.models import build_model, init_params
from arssr_jax.training.config import TrainConfig
from arssr_jax.training.examples import make_tricubic_pair
from arssr_jax.training.state import set_output_layer
from arssr_jax.training.step import BaselineValidator, Validator, arssr_loss, l1_loss


class Task(Protocol):
    """What the training system needs of a task.

    make_example:       the :class:`~arssr_jax.data.ExampleMaker` the input pipeline runs per
                        sample (picklable and light: grain's workers import it); a batch is
                        these examples stacked.
    init_params(key):   the initial parameters.
    loss:               ``loss(params, batch) -> scalar``, pure (it runs under jit and pmap).
    validator(samples, chunk): scores parameters on validation patches (``__call__(params)``,
                        ``interpolation()``, ``interpolation_name``, ``samples``).
    description:        one line for the log.
    checks_dead_output: a zero gradient at the first step means the model cannot learn.
    """

    make_example: ExampleMaker
    description: str
    checks_dead_output: bool

    def init_params(self, key) -> Any: ...

    @property
    def loss(self) -> Callable: ...

    def validator(self, samples, chunk: int) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ArSSRTask:
    model: Any
    lr_shape: tuple
    init_output: Optional[float] = None
    description: str = ""
    loss_name: str = "l1"
    loss_balance: float = 0.0
    ssim_weight: float = 0.0
    cube: int = 1
    cube_targets: Optional[int] = None
    make_example: ClassVar[ExampleMaker] = make_sample
    checks_dead_output: ClassVar[bool] = True  # a closed final ReLU gives a zero first gradient

    def init_params(self, key):
        params = init_params(self.model, key, self.lr_shape)
        return params if self.init_output is None else set_output_layer(params, self.init_output)

    @property
    def loss(self) -> Callable:
        return arssr_loss(self.model, self.loss_name, self.loss_balance, self.ssim_weight, self.cube,
                          self.cube_targets)

    def validator(self, samples, chunk: int) -> Validator:
        return Validator(self.model, samples, chunk=chunk)


@dataclasses.dataclass(frozen=True)
class BaselineTask:
    module: Any
    description: str = ""
    make_example: ClassVar[ExampleMaker] = make_tricubic_pair
    checks_dead_output: ClassVar[bool] = False

    def init_params(self, key):
        from arssr_jax.models.baselines import init_baseline

        return init_baseline(self.module, key)

    @property
    def loss(self) -> Callable:
        module = self.module

        def loss_fn(params, batch):
            return l1_loss(module.apply({"params": params}, batch["input"]), batch["target"])

        return loss_fn

    def validator(self, samples, chunk: int) -> BaselineValidator:
        return BaselineValidator(self.module, samples)


def make_task(config: TrainConfig) -> Task:
    """The task of a (validated) config."""
    if config.baseline is None:
        return ArSSRTask(build_model(config.model), (config.data.lr_size,) * 3,
                         config.init_output,
                         description=config.model.encoder, loss_name=config.loss,
                         loss_balance=config.loss_balance, ssim_weight=config.ssim_weight,
                         cube=config.data.sample_cube, cube_targets=config.data.cube_targets)
    from arssr_jax.models.baselines import build_baseline

    module = build_baseline(config.baseline.name, config.baseline.options)
    return BaselineTask(module, description=f"{config.baseline.name} baseline x{config.baseline_scale:g}")
