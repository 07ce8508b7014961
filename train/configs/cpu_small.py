"""A few-minute CPU run that visibly learns; see arssr_jax.training.config.cpu_small.

    python train/train.py --config train/configs/cpu_small.py --workdir runs/small
"""

from arssr_jax.training.config import cpu_small


def get_config():
    return cpu_small()
