"""`evaluate` scores the pictures `generate` draws by default: both use the tuned encoder at every step (switch
step 0), whatever the config's sampler.switch_step, which places the training chain's switch (here 10 - K = 7)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from textcraftor_fast.config import load_config
from textcraftor_fast.evaluation import EvalOptions, evaluate
from textcraftor_fast.evaluation.core import EVAL_SEED0
from textcraftor_fast.inference import GenerateOptions, generate
from textcraftor_fast.models import export_text_encoder, load_components

PROMPTS = ["a red apple on a table", "a blue car in the rain", "a green tree at night"]


def test_evaluate_and_generate_defaults_draw_the_same_pictures(tmp_path):
    # tiny_random: 10 steps, K = 3 (training's switch step 7) and sampler.train_uncond true, so evaluate mixes
    # the unconditional embedding as generate does.
    cfg = load_config("configs/tiny_random.toml")
    assert cfg.sampler.effective_switch_step == 7 and cfg.sampler.train_uncond
    te = load_components(cfg.model, seed=cfg.seed).text_encoder
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    encoder = str(export_text_encoder(te, tmp_path / "tuned" / "text_encoder"))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")

    res = evaluate(cfg, [encoder], tmp_path / "eval",
                   EvalOptions(prompts=str(prompt_file), batch_size=3, grid_prompts=3, weights=(), switch_steps=(),
                               device="cpu", progress=False), names=["tuned"])
    # Sample k of the evaluation is prompt k with seed EVAL_SEED0 + k; generate's image i has seed seed + i.
    paths = generate(cfg.model, PROMPTS, tmp_path / "gen", [encoder], None,
                     GenerateOptions(num_steps=cfg.sampler.num_steps, guidance_scale=cfg.sampler.guidance_scale,
                                     seed=EVAL_SEED0, batch_size=3, timestep_spacing=cfg.sampler.timestep_spacing),
                     "cpu")
    generated = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths])  # (N, H, W, 3)
    evaluated = res.scores["tuned"]["images"].permute(0, 2, 3, 1)  # uint8, (N, 3, H, W) -> (N, H, W, 3)
    assert torch.equal(evaluated, generated)
    original = res.scores["original"]["images"].permute(0, 2, 3, 1)
    assert (original.int() - generated.int()).abs().max() > 0  # the perturbation shows: the check can fail
