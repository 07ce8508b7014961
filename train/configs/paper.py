"""The paper's training setup (docs/REFERENCE.md section 3); see arssr_jax.training.config.paper.

    python train/train.py --config train/configs/paper.py --workdir runs/paper \
        --data hcp/train.txt --val-data hcp/val.txt
"""

from arssr_jax.training.config import paper


def get_config():
    return paper()
