"""The paper's training setup with a global batch of 16 instead of 15, so that it divides over
2, 4, 8 or 16 devices (the README's cluster examples); everything else as ``paper``.

    srun arssr-jax train --config train/configs/paper_b16.py --workdir runs/paper \
        --data hcp/train.txt --val-data hcp/val.txt
"""

import dataclasses

from arssr_jax.training.config import paper


def get_config():
    config = paper()
    return config.replace(name="paper_b16", data=dataclasses.replace(config.data, batch_size=16))
