"""Training: configs, the train state, pure steps, data parallelism, checkpoints, the loop.

```python
from arssr_jax.training import cpu_small, train
result = train(cpu_small(), "runs/small", steps=200)
result = train(baseline("SRCNN3D", 2.0), "runs/srcnn3d_x2", steps=200)  # a fixed-scale baseline CNN
```
"""

from arssr_jax.training.checkpoints import CheckpointStore, load_trained
from arssr_jax.training.config import (
    BaselineConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
    baseline,
    cpu_small,
    load_config,
    paper,
    sample_volume_path,
    tiny,
    save_config,
)
from arssr_jax.training.loop import TrainResult, train
from arssr_jax.training.parallel import DistributedConfig, initialize, replicate, shard, unreplicate
from arssr_jax.training.state import TrainState, create_train_state, make_optimizer
from arssr_jax.training.step import BaselineValidator, Validator, arssr_loss, l1_loss, make_train_step
from arssr_jax.training.examples import TricubicPair, make_tricubic_pair
from arssr_jax.training.tasks import ArSSRTask, BaselineTask, Task, make_task

__all__ = [
    "CheckpointStore", "load_trained", "BaselineConfig", "baseline", "OptimConfig", "TrainConfig", "ValidationConfig", "cpu_small",
    "load_config", "paper", "sample_volume_path", "save_config", "tiny", "TrainResult", "train", "DistributedConfig",
    "initialize", "replicate", "shard", "unreplicate", "TrainState", "create_train_state", "make_optimizer",
    "BaselineValidator", "Validator", "arssr_loss", "l1_loss", "make_train_step", "ArSSRTask", "BaselineTask",
    "Task", "make_task", "TricubicPair", "make_tricubic_pair",
]
