"""Text-encoder LoRA as a model transform (models/encoder_lora.py): no second copy for the original encoder, the
adapters on again for a checkpointed recompute, merging against peft's own forward, exact round trips, stacking.

References are independent of the code under test: peft's LoRA forward (W x + s B A x computed by peft's layers),
the plain base encoder, and a float64 hand computation of a merged weight."""
import copy

import pytest
import torch

from textcraftor_fast.memory.layers import checkpoint_each_layer
from textcraftor_fast.models import build_tiny_random
from textcraftor_fast.models.adapters import AdaptersDisabled
from textcraftor_fast.models.encoder_lora import (add_encoder_lora, encoder_lora_state, load_encoder_lora_state,
                                                  merged_encoder, parse_lora_stack, read_encoder_lora,
                                                  resolved_spec, save_encoder_lora, stack_loras)

IDS = torch.tensor([[49406, 5, 17, 3, 49407] + [49407] * 72, [49406, 9, 49407] + [49407] * 74])


@pytest.fixture(scope="module")
def base():
    return build_tiny_random(seed=0).text_encoder.eval().requires_grad_(False)


ATTENTION_AND_FC1 = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


@pytest.fixture(scope="module")
def adapted(make_encoder_lora):
    """adapted(base, seed, rank=4, alpha=8, targets): adapters whose up matrices moved (a scale alpha / r = 2)."""
    def make(base, seed: int, rank: int = 4, alpha: float = 8.0, targets=ATTENTION_AND_FC1):
        return make_encoder_lora(base, seed, rank, alpha, targets, std=0.2)

    return make


def out(encoder, ids=IDS):
    with torch.no_grad():
        return encoder(ids)[0]


def test_fresh_adapters_compute_the_base_and_only_they_train(base):
    enc = copy.deepcopy(base)
    n = add_encoder_lora(enc, 16, 16.0, ("q_proj", "k_proj", "v_proj", "out_proj"))
    layers, width = base.config.num_hidden_layers, base.config.hidden_size
    assert n == layers * 4 * 2 * 16 * width  # A (r x D) and B (D x r) on four D x D projections per layer
    assert torch.equal(out(enc), out(base))
    assert all(p.requires_grad == (".lora_" in name) for name, p in enc.named_parameters())


def test_unknown_target_names_the_clip_layers(base):
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj, out_proj, fc1, fc2"):
        add_encoder_lora(copy.deepcopy(base), 4, 4.0, ("to_q",))


def test_the_original_encoder_is_the_base_without_a_copy(base, adapted):
    enc = adapted(base, 1)
    original = AdaptersDisabled(enc)
    tuned = out(enc)
    assert not torch.allclose(tuned, out(base), atol=1e-3)  # the adapters change the embedding
    torch.testing.assert_close(out(original), out(base), atol=0, rtol=0)
    # The adapters are on again, and trainable again, after the original's call.
    torch.testing.assert_close(out(enc), tuned, atol=0, rtol=0)
    assert all(p.requires_grad for name, p in enc.named_parameters() if ".lora_" in name)
    # No second copy: every weight the original reads is a tensor of the trained module.
    trained = {p.data_ptr() for p in enc.parameters()}
    assert {p.data_ptr() for p in original.parameters()} <= trained


def _grads(enc, checkpointed: bool):
    enc = copy.deepcopy(enc)
    if checkpointed:
        assert checkpoint_each_layer(enc) == enc.config.num_hidden_layers
    original = AdaptersDisabled(enc)
    with torch.no_grad():
        original(IDS)  # the frozen embedding first, as the trainer does
    emb = enc(IDS)[0]
    with torch.no_grad():
        original(IDS)  # and again between forward and backward: a recompute must not see its state
    emb.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def test_a_checkpointed_recompute_runs_with_the_adapters_on(base, adapted):
    enc = adapted(base, 2)
    plain, ckpt = _grads(enc, False), _grads(enc, True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0 and all(".lora_" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_merged_encoder_equals_the_adapters_applied(base, adapted):
    enc = adapted(base, 3)
    merged = merged_encoder(enc)
    assert not any(".lora_" in name or "base_layer" in name for name, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(out(merged), out(enc), atol=2e-5, rtol=1e-5)
    # One merged weight by hand, in float64: W + (alpha / r) B A.
    layer = enc.encoder.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    want = base.encoder.layers[0].self_attn.q_proj.weight.double() + 2.0 * b @ a
    torch.testing.assert_close(merged.encoder.layers[0].self_attn.q_proj.weight.double(), want, atol=1e-6, rtol=0)


def test_saved_lora_loads_back_bit_for_bit_and_reads_as_diffusers_keys(base, tmp_path, adapted):
    enc = adapted(base, 4)
    save_encoder_lora(enc, tmp_path)
    lora = read_encoder_lora(tmp_path)
    assert all(k.startswith("text_model.encoder.layers.") and ".lora_linear_layer." in k for k in lora.state)
    assert lora.metadata["r"] == 4 and lora.metadata["lora_alpha"] == 8.0
    other = adapted(base, 99)
    load_encoder_lora_state(other, tmp_path)
    for (name, p), q in zip(enc.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="does not match the encoder's LoRA adapters"):
        load_encoder_lora_state(adapted(base, 5, rank=2), tmp_path)


def test_stacks_and_scales_add_the_updates_in_weight_space(base, tmp_path, adapted, monkeypatch):
    a, b = adapted(base, 6), adapted(base, 7, rank=2, alpha=2.0, targets=("q_proj", "v_proj"))
    save_encoder_lora(a, tmp_path / "a")
    save_encoder_lora(b, tmp_path / "b")
    stacked = stack_loras(base, [(tmp_path / "a", 0.7), (tmp_path / "b", -0.5)])
    da, db = encoder_lora_state(a), encoder_lora_state(b)
    key = "text_model.encoder.layers.1.self_attn.v_proj.lora_linear_layer."
    want = (base.encoder.layers[1].self_attn.v_proj.weight.double()
            + 0.7 * 2.0 * da[key + "up.weight"].double() @ da[key + "down.weight"].double()
            - 0.5 * 1.0 * db[key + "up.weight"].double() @ db[key + "down.weight"].double())
    torch.testing.assert_close(stacked.encoder.layers[1].self_attn.v_proj.weight.double(), want, atol=1e-6, rtol=0)
    assert torch.equal(stack_loras(base, [(tmp_path / "a", 0.0)]).encoder.layers[1].self_attn.v_proj.weight,
                       base.encoder.layers[1].self_attn.v_proj.weight)
    assert parse_lora_stack(f"{tmp_path / 'a'}:0.7+{tmp_path / 'b'}:-0.5") == [(str(tmp_path / "a"), 0.7),
                                                                            (str(tmp_path / "b"), -0.5)]
    assert parse_lora_stack(str(tmp_path / "a")) == [(str(tmp_path / "a"), 1.0)]
    # What a generated image records: every path absolute, every scale kept (run from tmp_path: relative paths).
    monkeypatch.chdir(tmp_path)
    assert resolved_spec("a:0.7+b") == f"{tmp_path / 'a'}:0.7+{tmp_path / 'b'}:1"
    with pytest.raises(FileNotFoundError, match="'c' does not exist"):
        parse_lora_stack("a+c:0.5")


def test_a_full_encoder_is_not_a_lora_and_cannot_be_scaled(base, tmp_path):
    base.save_pretrained(tmp_path / "full")
    assert parse_lora_stack(str(tmp_path / "full")) is None
    with pytest.raises(ValueError, match="scales and '\\+' stacking apply to LoRA folders"):
        parse_lora_stack(f"{tmp_path / 'full'}:0.5")


def test_a_lora_for_another_encoder_is_refused(base, tmp_path, adapted):
    save_encoder_lora(adapted(base, 8), tmp_path / "small")
    wider = build_tiny_random(seed=0).text_encoder
    wider = type(wider)(type(wider.config)(**{**wider.config.to_dict(), "hidden_size": 64,
                                              "intermediate_size": 128}))
    with pytest.raises(ValueError, match="trained for another model"):
        stack_loras(wider, [(tmp_path / "small", 1.0)])
