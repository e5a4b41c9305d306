"""The Trainer frees the VAE encoder half (training only decodes): decode must be what diffusers computes."""
import copy

import pytest
import torch
from diffusers import AutoencoderKL

from textcraftor_fast.models.components import drop_vae_encoder
from textcraftor_fast.models.tiny_random import TINY_VAE


def test_decode_is_unchanged_and_the_encoder_half_is_gone():
    torch.manual_seed(0)
    intact = AutoencoderKL(**TINY_VAE).eval()
    vae = copy.deepcopy(intact)
    # By hand: what drop_vae_encoder must free is exactly the encoder's and quant_conv's parameters.
    expected = 4 * (sum(p.numel() for p in intact.encoder.parameters())
                    + sum(p.numel() for p in intact.quant_conv.parameters()))
    assert drop_vae_encoder(vae) == expected > 0
    z = torch.randn(2, TINY_VAE["latent_channels"], 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, intact.decode(z).sample)
    assert sum(p.numel() for p in vae.parameters()) * 4 == sum(p.numel() for p in intact.parameters()) * 4 - expected
    with pytest.raises(TypeError):  # encoder is None: calling it fails loudly rather than encoding garbage
        vae.encode(torch.randn(1, 3, 32, 32))
