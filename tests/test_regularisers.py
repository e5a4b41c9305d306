"""The lr schedule and the embedding anchor: values by hand, and the engine logging what it applied."""
import math

import pytest
import torch

from textcraftor_fast import load_config
from textcraftor_fast.config import ConfigError
from textcraftor_fast.training.trainer import Trainer, train
from textcraftor_fast.training.optim import lr_factor

FAST = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.batch_size=2", "train.progress_bar=false",
        "data.max_prompts=8"]


def _cfg(tmp_path, *extra):
    return load_config("configs/tiny_random.toml", FAST + [f'output.dir="{tmp_path}"', *extra])


def test_lr_factor_by_hand():
    # Warm-up 10 of 110 steps: steps 0..9 ramp 0.1..1.0; the cosine starts at step 10 (1.0), is 0.5 halfway
    # (step 60) and 0 at the end (step 110).
    assert [lr_factor(s, 10, 110, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_factor(35, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, 0, 100, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'constant', 'cosine'"):
        lr_factor(0, 0, 10, "linear")


def test_config_rejects_unknown_schedule_and_negative_anchor():
    with pytest.raises(ConfigError, match="optim.lr_schedule.*'constant', 'cosine'"):
        load_config(None, ["optim.lr_schedule=linear"])
    with pytest.raises(ConfigError, match="train.embedding_anchor"):
        load_config("configs/tiny_random.toml", ["train.embedding_anchor=-1.0"])


def test_engine_applies_the_cosine_schedule(tmp_path):
    # 3 steps, no warm-up: factors cos-half at progress 0, 1/3, 2/3 = 1, 0.75, 0.25.
    result = train(_cfg(tmp_path, "train.steps=3", "optim.lr=0.001", "optim.lr_schedule=cosine"))
    assert [m["lr"] for m in result.history] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])


def test_anchor_term_is_the_mean_squared_embedding_distance(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "train.embedding_anchor=2.5"))
    with torch.no_grad():  # move the trainable encoder off the original, so the anchor is not 0
        for p in trainer.text_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    prompts = trainer.stream.next_batch()
    loss, metrics = trainer.forward(prompts, k=2)
    # Expected value straight from the two transformers CLIPTextModels, outside the engine's code path.
    ids = trainer.tokenizer(prompts, padding="max_length", max_length=trainer.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = (trainer.text_encoder(ids).last_hidden_state
                    - trainer.original_encoder(ids).last_hidden_state).pow(2).mean().item()
    assert expected > 0
    assert metrics["anchor"] == pytest.approx(expected, rel=1e-5)
    assert metrics["loss"] == pytest.approx(-metrics["reward"] + 2.5 * expected, rel=1e-5)
    trainer.close()


def test_anchor_alone_pulls_the_encoder_back(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "train.embedding_anchor=1.0", "rewards.0.weight=0.0", "rewards.1.weight=0.0",
                           "optim.lr=0.001",
                           "optim.weight_decay=0.0"))
    with torch.no_grad():
        for p in trainer.text_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = trainer.train_step()["anchor"]
    after = [trainer.train_step()["anchor"] for _ in range(3)][-1]
    assert 0 < after < before
    trainer.close()
