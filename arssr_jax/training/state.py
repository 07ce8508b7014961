"""The train state (parameters, optimiser state, step, PRNG key) and the optimiser."""

from __future__ import annotations

from typing import Any, Callable, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from arssr_jax.training.config import OptimConfig


@flax.struct.dataclass
class TrainState:
    """Arrays only, so it maps, replicates and checkpoints as a plain pytree.

    step:      int32 scalar, number of updates applied.
    params:    the model's parameters.
    opt_state: optax state.
    rng:       a raw uint32[2] PRNG key, split once per step (reserved for stochastic
               layers; the step itself is deterministic).
    """

    step: Any
    params: Any
    opt_state: Any
    rng: Any

    def to_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        return cls(step=values["step"], params=values["params"], opt_state=values["opt_state"], rng=values["rng"])


def learning_rate_schedule(optim: OptimConfig, steps_per_epoch: int) -> Callable:
    """lr * decay_factor ** floor(step / (decay_every_epochs * steps_per_epoch))."""
    every = max(1, int(round(optim.decay_every_epochs * steps_per_epoch)))
    return optax.exponential_decay(optim.learning_rate, transition_steps=every,
                                   decay_rate=optim.decay_factor, staircase=True)


def make_optimizer(optim: OptimConfig, steps_per_epoch: int) -> Tuple[optax.GradientTransformation, Callable]:
    """(Adam with the step schedule [after optional global-norm clipping], the schedule)."""
    schedule = learning_rate_schedule(optim, steps_per_epoch)
    adam = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    if optim.clip_grad_norm is not None:
        adam = optax.chain(optax.clip_by_global_norm(optim.clip_grad_norm), adam)
    return adam, schedule


def create_train_state(init_params: Callable, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state: parameters ``init_params(key)`` from ``seed``, Adam moments at zero, step 0.

    Built in one jitted call. Eager initialisation compiles every op separately, and on
    CPU, XLA's optimising compile of the threefry random-bit generators takes tens of
    seconds even for a tiny model; initialisation runs once, so it is compiled without
    backend optimisation there (same random streams, seconds instead of a minute).
    """

    def build(key):
        init_key, state_key = jax.random.split(key)
        params = init_params(init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=state_key)

    key = jax.random.PRNGKey(int(seed))
    options = FAST_COMPILE if jax.default_backend() == "cpu" else None
    return jax.jit(build).lower(key).compile(options)(key)


def start_from(state: TrainState, params, tx: optax.GradientTransformation) -> TrainState:
    """``state`` with ``params`` (a trained model's, of the same tree and shapes) in place of
    its initialisation, and Adam moments at zero for them: a fine-tuning run's step 0."""
    params = jax.tree_util.tree_map(lambda fresh, loaded: jnp.asarray(loaded, fresh.dtype), state.params, params)
    return state.replace(params=params, opt_state=tx.init(params))


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def set_output_layer(params, bias: float):
    """The decoder's last layer set to weights 0 and bias ``bias`` (see TrainConfig.init_output)."""
    decoder = dict(params["decoder"])
    last = max((k for k in decoder if k.startswith("stage_two_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    layer = dict(decoder[last])
    layer["kernel"] = jnp.zeros_like(layer["kernel"])
    layer["bias"] = jnp.full_like(layer["bias"], bias)
    decoder[last] = layer
    return {**params, "decoder": decoder}


def to_host(tree):
    """A pytree of numpy arrays (device arrays fetched)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
