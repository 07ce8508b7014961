"""The recipe of the shipped default model (README "Model card"): a compact RDN trained on
2 CPU cores on the inferior part of the MNI152 2009 T1 template (real MR data shipped
with nilearn), with augmentation, evaluated on the held-out superior part.

    python train/prepare_mni.py data/mni
    arssr-jax train --config train/configs/default_model.py --workdir runs/default
"""

from arssr_jax.data import AugmentConfig, DataConfig
from arssr_jax.models import ModelConfig
from arssr_jax.training.config import OptimConfig, TrainConfig, ValidationConfig

STEPS_PER_EPOCH = 100  # 1 training volume x 800 patches / batch 8


def get_config():
    return TrainConfig(
        name="default_model",
        model=ModelConfig(
            encoder="RDN", feature_dim=64, decoder_depth=8, decoder_width=128,
            encoder_options={"num_blocks": 3, "num_layers": 3, "num_features": 32, "growth": 32},
            # Beyond the outer LR voxel centres, repeat the edge features rather than fade
            # them to zero: the reference's zero padding darkens the output's outer half voxel.
            padding="border",
        ),
        data=DataConfig(
            paths=("data/mni/train",), patch_size=40, lr_size=10, scale_min=2.0, scale_max=4.0,
            degrade="centred", samples_per_step=3000, batch_size=8, samples_per_volume=800,
            seed=0, worker_count=0, read_threads=1, prefetch=2,
            augment=AugmentConfig(flip=True, permute=True, gamma=0.15, intensity_scale=0.1, bias_field=0.15),
        ),
        optim=OptimConfig(learning_rate=5e-4, decay_every_epochs=8, decay_factor=0.5),
        # Validation patches come from the training volume at other positions: the held-out
        # slab is kept for the final evaluation only, never for choosing checkpoints.
        val=ValidationConfig(paths=("data/mni/train",), scales=(2.0, 3.0, 4.0), patches_per_volume=4,
                             every_epochs=2.0, chunk=16384, seed=7),
        steps=3000,
        log_every=25,
        keep_last=2,
        init_output=0.5,
    )
