"""The roofline FLOP counts, checked against a hand count of the default RDN and decoder."""

from arssr_jax.flops import decoder_flops_per_voxel, encoder_flops_per_voxel, flops_summary, gflops
from arssr_jax.models import ModelConfig


def conv(k, cin, cout):
    return 2 * k**3 * cin * cout


def test_default_rdn_encoder_by_hand():
    g0 = g = 64
    block = sum(conv(3, g0 + i * g, g) for i in range(3)) + conv(1, g0 + 3 * g, g0)
    expected = conv(3, 1, g0) + conv(3, g0, g0) + 8 * block + conv(1, 8 * g0, g0) + conv(3, g0, g0) + conv(3, g0, 128)
    assert encoder_flops_per_voxel(ModelConfig()) == expected == 11_832_704


def test_default_decoder_by_hand():
    f = 128 + 3
    stage_one = 2 * (f * 256 + 256 * 256 * 2 + 256 * f)
    stage_two = 2 * (f * 256 + 256 * 256 * 2 + 256 * 1)
    sampling = 8 * 2 * 128 + 8 * 3
    assert decoder_flops_per_voxel(ModelConfig()) == stage_one + stage_two + sampling + f


def test_counts_follow_the_config():
    small = ModelConfig(encoder="RDN", encoder_options={"num_blocks": 4}, decoder_width=128)
    assert encoder_flops_per_voxel(small) < encoder_flops_per_voxel(ModelConfig())
    assert decoder_flops_per_voxel(small) < decoder_flops_per_voxel(ModelConfig())
    rescnn = 2 * (27 * 64 + 18 * 27 * 64 * 64 + 27 * 64 * 128)
    assert flops_summary(ModelConfig(encoder="ResCNN"))["encoder_flops_per_lr_voxel"] == rescnn
    assert gflops(2e9, 2.0) == 1.0
