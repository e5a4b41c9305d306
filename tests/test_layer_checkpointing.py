"""memory/layers.py on real transformers CLIP modules: which layers it wraps, that a wrapped model computes
what the plain one does (values and input gradients, bit for bit) and keeps less for backward. The engine-level
check (encoder gradients unchanged, towers' activations dropped) is in tests/test_baseline_official.py."""
import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from textcraftor_fast.memory.layers import checkpoint_each_layer, transformer_layers
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes
from textcraftor_fast.models import build_tiny_random

VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=16)


@pytest.fixture
def vision() -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval().requires_grad_(False)


def _image_grad(model, pixels):
    x = pixels.clone().requires_grad_(True)
    out = model(pixel_values=x).image_embeds
    out.pow(2).sum().backward()
    return out.detach(), x.grad


def test_the_layers_found_are_the_encoder_layers(vision):
    assert transformer_layers(vision) == list(vision.vision_model.encoder.layers)
    text = build_tiny_random(0).text_encoder
    assert len(transformer_layers(text)) == text.config.num_hidden_layers == 2
    assert checkpoint_each_layer(vision) == checkpoint_each_layer(vision) == 3  # wrapping twice wraps once


def test_a_checkpointed_tower_gives_the_same_values_and_gradients_and_keeps_less(vision):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, ckpt = vision, copy.deepcopy(vision)
    checkpoint_each_layer(ckpt)
    for a, b in zip(_image_grad(plain, pixels), _image_grad(ckpt, pixels)):
        assert torch.equal(a, b)
    with torch.no_grad():  # no graph: the wrapper runs the layer as it is
        assert torch.equal(plain(pixel_values=pixels).image_embeds, ckpt(pixel_values=pixels).image_embeds)

    def kept(model):
        x = pixels.clone().requires_grad_(True)
        return saved_tensor_bytes(lambda: model(pixel_values=x).image_embeds, ignore=list(model.parameters()))[0]

    # Hand count: 32 px in 8 px patches + CLS = 17 tokens, 2 images, fp32. Plain keeps each layer's MLP hidden
    # activation (2 x 17 x 128 floats) among others; checkpointed keeps each layer's input (2 x 17 x 32) instead.
    layers, mlp_hidden, layer_input = 3, 2 * 17 * 128 * 4, 2 * 17 * 32 * 4
    plain_bytes, ckpt_bytes = kept(plain), kept(ckpt)
    assert ckpt_bytes <= plain_bytes - layers * (mlp_hidden - layer_input), (plain_bytes, ckpt_bytes)
