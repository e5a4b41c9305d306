"""The open_clip -> transformers conversion against open_clip's OWN model code, not a re-implementation.

`import open_clip` needs torchvision, which does not import beside the CPU torch wheel. Its model code does
not need it: open_clip/utils.py imports one name (`FrozenBatchNorm2d`, used only to freeze ResNet towers)
from torchvision. So the test loads `open_clip.model` from the open_clip_torch wheel that `make test`
downloads (the same file the tokenizer test reads), with that one name stubbed while the modules import and
the HF-text-tower module left out; then builds open_clip's `CLIP`, converts ITS state dict with our key map
and compares embeddings. A wrong rename, split, transpose, head count, activation or pooling shows here.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from textcraftor_fast.rewards.clip_tower import openclip_model_from_state_dict

WHEEL = Path(__file__).resolve().parents[2] / ".cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl"


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    if not WHEEL.is_file():
        msg = f"{WHEEL} is missing: `make test` downloads it (pip download --no-deps open_clip_torch==3.3.0)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("open_clip")
    with zipfile.ZipFile(WHEEL) as z:
        z.extractall(root)
    saved = {k: v for k, v in sys.modules.items() if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))}
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    stubs = {"torchvision": types.ModuleType("torchvision"), "torchvision.ops": types.ModuleType("torchvision.ops"),
             "torchvision.ops.misc": misc}
    hf = types.ModuleType("open_clip.hf_model")
    hf.HFTextEncoder = None  # the HF-text-tower variant; none of the published towers we load uses it
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = [str(root / "open_clip")]  # a bare package: open_clip/__init__.py (and its imports) never runs
    try:
        sys.modules.update({**stubs, "open_clip": pkg, "open_clip.hf_model": hf})
        module = importlib.import_module("open_clip.model")
    finally:
        for name in list(sys.modules):
            if name == "open_clip" or name.startswith(("open_clip.", "torchvision")):
                del sys.modules[name]
        sys.modules.update(saved)
    return module


def _tiny_clip(oc, quick_gelu: bool):
    torch.manual_seed(0)
    vision = oc.CLIPVisionCfg(layers=2, width=16, head_width=8, mlp_ratio=2.0, patch_size=7, image_size=14)
    text = oc.CLIPTextCfg(context_length=12, vocab_size=64, width=16, heads=2, layers=2, mlp_ratio=2.0)
    model = oc.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # open_clip zero-inits nothing we need, but push norms and biases off their defaults
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ours(model, pixels, ids):
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


@pytest.mark.parametrize("openai_file", [False, True], ids=["laion-gelu", "openai-quickgelu"])
def test_converted_model_matches_open_clip_forward(open_clip_model, openai_file):
    """'auto' must pick the activation from the file: LAION files GELU, OpenAI files (marker) QuickGELU."""
    ref = _tiny_clip(open_clip_model, quick_gelu=openai_file)
    sd = dict(ref.state_dict())
    if openai_file:
        sd.update(input_resolution=torch.tensor(14), context_length=torch.tensor(12), vocab_size=torch.tensor(64))
    ours = openclip_model_from_state_dict(sd, "auto", True, "open_clip (memory)", vision_heads=2, text_heads=2)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 14, 14, generator=g)
    ids = torch.randint(1, 60, (3, 12), generator=g)
    ids[:, 0], ids[0, 5], ids[1, 11], ids[2, 3] = 62, 63, 63, 63  # EOT (the largest id) at different positions
    with torch.no_grad():
        want_img = ref.encode_image(pixels, normalize=True)
        want_txt = ref.encode_text(ids, normalize=True)
    got_img, got_txt = _ours(ours, pixels, ids)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=1e-5)
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item())
