"""SD2.x and SDXL beside SD1.5: detection, loading and fidelity against STOCK diffusers pipelines.

Tiny random models of each family's architecture (models/tiny_random.py) are saved as diffusers folders and loaded
through the real loader. The engine's no-grad sample (its sampler, its conditioning: for SDXL the packed
conditioner) must equal what `StableDiffusionXLPipeline` / `StableDiffusionPipeline` sample from the same folder,
noise and settings, with a `DDIMScheduler` given the sampler's trailing spacing: bit for bit (float32, CPU). The
encoders' gradients through the engine's checkpointed path must equal a plain float64 computation written from
the pipeline's own `encode_prompt`, `_get_add_time_ids` and `DDIMScheduler.step`.
"""
import copy
import json
import shutil

import pytest
import torch

from textcraftor_fast.config import SamplerConfig
from textcraftor_fast.inference import conditioning
from textcraftor_fast.models import build_tiny_random, load_diffusers_folder, save_components
from textcraftor_fast.models.conditioner import SDXLConditioner
from textcraftor_fast.models.families import folder_family
from textcraftor_fast.models.text import encode, encode_empty, tokenize
from textcraftor_fast.sampler import Embeddings, decode_latents, make_schedule, sample_images, sample_latents

PROMPTS = ["a red cube on a table", "two dogs running on grass"]
SEEDS, STEPS, GUIDANCE, SIDE = [3, 4], 4, 5.0, 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in ("sd15", "sd2", "sdxl"):
        out[family] = save_components(build_tiny_random(0, family), tmp_path_factory.mktemp(family) / "model")
    return out


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_a_saved_folder_says_its_family_and_loads_as_it(folders, family):
    assert folder_family(folders[family]) == family
    comp = load_diffusers_folder(folders[family])
    assert comp.family == family
    assert isinstance(comp.text_encoder, SDXLConditioner) == (family == "sdxl")
    assert comp.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")


def test_a_wrong_family_or_pipeline_is_an_error_naming_the_folder(folders, tmp_path):
    with pytest.raises(ValueError, match=r"model.family is 'sd15' but '.*' holds a sdxl model"):
        load_diffusers_folder(folders["sdxl"], family="sd15")
    odd = tmp_path / "odd"
    shutil.copytree(folders["sd15"], odd)
    index = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match=r"odd.*'KandinskyPipeline'.*StableDiffusionXLPipeline"):
        load_diffusers_folder(odd)
    shutil.rmtree(odd / "text_encoder")
    (odd / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="text_encoder/config.json"):
        load_diffusers_folder(odd)


def test_an_sdxl_folder_without_its_second_encoder_is_refused(folders, tmp_path):
    broken = tmp_path / "sdxl"
    shutil.copytree(folders["sdxl"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="missing text_encoder_2/"):
        load_diffusers_folder(broken)


def _stock(folder, family):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe.set_progress_bar_config(disable=True) or pipe


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_no_grad_sample_equals_the_stock_pipeline_bit_for_bit(folders, family):
    comp = load_diffusers_folder(folders[family])
    frozen, _ = conditioning(comp.text_encoder, [], [], comp.tokenizer, PROMPTS)
    schedule = make_schedule(comp.scheduler.config, STEPS, 0.0, "trailing")
    side = SIDE // comp.vae_scale_factor
    ours = sample_images(comp.unet, comp.vae, schedule, SEEDS, (4, side, side), frozen, None, GUIDANCE, STEPS)
    pipe = _stock(folders[family], family)
    stock = pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt").images
    assert stock.std() > 0.01  # a real image, not a constant
    assert torch.equal(ours, stock), (ours - stock).abs().max()


def test_the_sdxl_unconditional_branch_is_zeros_and_the_time_ids_the_pipelines(folders):
    comp = load_diffusers_folder(folders["sdxl"])
    pipe = _stock(folders["sdxl"], "sdxl")
    frozen, _ = conditioning(comp.text_encoder, [], [], comp.tokenizer, PROMPTS)
    hidden, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((SIDE, SIDE), (0, 0), (SIDE, SIDE), torch.float32,
                                      text_encoder_projection_dim=pooled.shape[-1])
    comp.text_encoder.set_image_size(SIDE)
    frozen, _ = conditioning(comp.text_encoder, [], [], comp.tokenizer, PROMPTS)
    p = pooled.shape[-1]
    assert torch.equal(frozen.cond[:, :-1], hidden) and torch.equal(frozen.cond[:, -1, :p], pooled)
    assert torch.equal(frozen.cond[:, -1, p:p + 6], time_ids.expand(2, -1))
    assert torch.equal(frozen.uncond[:, :-1], neg[:1]) and not frozen.uncond[:, :-1].any()
    assert torch.equal(frozen.uncond[:, -1, :p], neg_pooled[:1]) and torch.equal(frozen.uncond[0, -1, p:p + 6],
                                                                                  time_ids[0])


def _reference_loss_float64(pipe, family, prompts, x_T, k):
    """The loss (mean brightness of the decoded images) in float64 with no checkpointing, no packing and no engine
    code: the pipeline's encode_prompt (and SDXL's time ids), separate cond and uncond UNet calls,
    DDIMScheduler.step (SD2: v-prediction)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    if family == "sdxl":
        hidden, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
        time_ids = pipe._get_add_time_ids((SIDE, SIDE), (0, 0), (SIDE, SIDE), torch.float64,
                                          text_encoder_projection_dim=pooled.shape[-1]).expand(len(prompts), -1)
        cond = dict(encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        uncond = dict(encoder_hidden_states=neg, added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": time_ids})
    else:
        hidden, neg = pipe.encode_prompt(prompts, "cpu", 1, True)
        cond, uncond = dict(encoder_hidden_states=hidden), dict(encoder_hidden_states=neg)
    x = x_T.double()
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i >= STEPS - k):
            u, c = pipe.unet(x, t, **uncond).sample, pipe.unet(x, t, **cond).sample
            x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).mean()


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
@pytest.mark.parametrize("checkpoint,blocks", [("step", True), ("none", False)])
def test_encoder_gradients_equal_a_plain_float64_computation(folders, family, checkpoint, blocks):
    k = 2
    comp = load_diffusers_folder(folders[family])
    if family == "sdxl":
        comp.text_encoder.set_image_size(SIDE)
    reference = _stock(folders[family], family).to(torch.float64)
    encoder = comp.text_encoder.train()  # every encoder trained, as encoder.train = [] (all) does
    original = copy.deepcopy(encoder).eval()
    ids, empty = tokenize(comp.tokenizer, PROMPTS), tokenize(comp.tokenizer, [""])
    # The unconditional embedding trains too (sampler.train_uncond) where the model encodes "" (SD2); SDXL's is zeros.
    frozen = Embeddings(encode(original, ids).detach(), encode_empty(original, empty).detach())
    trained = Embeddings(encode(encoder, ids), encode_empty(encoder, empty))
    x_T = torch.randn(2, 4, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(num_steps=STEPS, grad_steps=k, guidance_scale=GUIDANCE, checkpoint=checkpoint,
                        checkpoint_unet_blocks=blocks)
    latents = sample_latents(comp.unet.requires_grad_(False), make_schedule(comp.scheduler.config, STEPS), x_T,
                             frozen, trained, cfg)
    ours = decode_latents(comp.vae.requires_grad_(False), latents, "blocks" if blocks else False).mean()
    ours.backward()
    reference.unet.requires_grad_(False)
    reference.vae.requires_grad_(False)
    want = _reference_loss_float64(reference, family, PROMPTS, x_T, k)
    want.backward()
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=0)
    sub = {"text_encoder": encoder} if family == "sd2" else encoder.encoders()
    for name, part in sub.items():
        got = dict(part.named_parameters())
        ref = {k: p.grad for k, p in getattr(reference, name).named_parameters()}
        scale = max(float(g.abs().max()) for g in ref.values() if g is not None)
        assert scale > 0, name
        for key, g in ref.items():
            if g is None:  # encoder 1's last layer and final norm: hidden_states[-2] never reads them
                assert got[key].grad is None or not got[key].grad.any(), (name, key)
                continue
            ours_g = got[key].grad.double()
            # k_proj.bias's gradient is zero in exact arithmetic (softmax ignores a shift of every key), so errors
            # are judged against the encoder's largest gradient, and relative to the tensor where it is not tiny.
            assert float((ours_g - g).abs().max()) < 1e-5 * scale, (name, key)
            if g.norm() > 1e-3 * scale:
                assert float((ours_g - g).norm() / g.norm()) < 1e-4, (name, key)


def _tuned(folder):
    """The model's text encoder(s) with every weight moved by fixed noise (a stand-in for a tuned one)."""
    tuned = copy.deepcopy(load_diffusers_folder(folder).text_encoder)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tuned


@pytest.fixture(scope="module")
def tuned_sdxl(folders):
    return _tuned(folders["sdxl"])


def _ours_generate(comp, tuned):
    from textcraftor_fast.inference import GenerateOptions, generate_images

    opts = GenerateOptions(num_steps=STEPS, guidance_scale=GUIDANCE, switch_step=0, weight=1.0, seed=SEEDS[0],
                           batch_size=len(PROMPTS))
    schedule = make_schedule(comp.scheduler.config, STEPS, timestep_spacing=opts.timestep_spacing)
    side = SIDE // comp.vae_scale_factor
    return generate_images(comp.unet, comp.vae, comp.tokenizer, schedule, comp.text_encoder, [tuned], [1.0], PROMPTS,
                           opts, (4, side, side), torch.device("cpu"))


def test_sdxl_exports_load_in_stock_diffusers_and_sample_what_generate_does(folders, tuned_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from textcraftor_fast.models import export_tuned, load_tuned_encoder

    comp = load_diffusers_folder(folders["sdxl"])
    comp.text_encoder.set_image_size(SIDE)
    want = _ours_generate(comp, tuned_sdxl)
    assert not torch.equal(want, _ours_generate(comp, comp.text_encoder))  # the tuned encoders change the images
    gens = lambda: [torch.Generator().manual_seed(SEEDS[0] + i) for i in range(len(PROMPTS))]
    run = lambda pipe: _stock_sample(pipe, gens())
    # A whole pipeline folder.
    export_tuned(comp, tuned_sdxl, tmp_path / "pipeline", layout="pipeline", timestep_spacing="trailing")
    got = run(StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipeline"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The encoders' folders, passed to the base pipeline as a diffusers user passes a tuned component.
    export_tuned(comp, tuned_sdxl, tmp_path / "encoders", layout="diffusers")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folders["sdxl"], text_encoder=CLIPTextModel.from_pretrained(tmp_path / "encoders" / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(tmp_path / "encoders" / "text_encoder_2"))
    torch.testing.assert_close(run(pipe), want, rtol=0, atol=1e-5)
    # And back into the engine (model.text_encoder_path).
    again = load_tuned_encoder(tmp_path / "encoders", comp.text_encoder)
    for a, b in zip(again.state_dict().values(), tuned_sdxl.state_dict().values()):
        assert torch.equal(a, b)


def _stock_sample(pipe, generators):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=generators, output_type="pt").images


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_single_file_round_trips_strictly_and_says_its_family(folders, family, tmp_path):
    from safetensors.torch import load_file, save_file

    from textcraftor_fast.models import load_single_file, save_single_file

    comp = load_diffusers_folder(folders[family])
    path = save_single_file(comp, tmp_path / "model.safetensors")
    again = load_single_file(path, config_dir=folders[family])
    assert again.family == family and again.scheduler.config.prediction_type == comp.scheduler.config.prediction_type
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(comp, part).state_dict(), getattr(again, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    keys = load_file(str(path))
    text_key = next(k for k in keys if k.startswith("conditioner.embedders.1." if family == "sdxl"
                                                   else "cond_stage_model.model."))
    save_file({k: v for k, v in keys.items() if k != text_key}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing\.safetensors': the text encoder.* weights do not match.*missing"):
        load_single_file(tmp_path / "missing.safetensors", config_dir=folders[family])
    with pytest.raises(ValueError, match=rf"model.family is 'sd15' but '.*model.safetensors' holds a {family} model"):
        load_single_file(path, family="sd15")


def test_a_file_of_two_families_is_an_error_naming_the_path_and_what_it_holds(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    from textcraftor_fast.models import load_single_file, save_single_file

    sdxl = load_file(str(save_single_file(load_diffusers_folder(folders["sdxl"]), tmp_path / "xl.safetensors")))
    sd15 = load_file(str(save_single_file(load_diffusers_folder(folders["sd15"]), tmp_path / "v1.safetensors")))
    save_file({**sdxl, **{k: v for k, v in sd15.items() if k.startswith("cond_stage_model.")}},
              str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match=r"mixed\.safetensors': cannot tell the model family.*cond_stage_model"):
        load_single_file(tmp_path / "mixed.safetensors")


def test_the_sd2_single_file_prediction_type_is_said_and_can_be_set(folders, tmp_path, caplog):
    from textcraftor_fast.models import load_single_file, save_single_file

    path = save_single_file(load_diffusers_folder(folders["sd2"]), tmp_path / "sd2.safetensors")
    with caplog.at_level("INFO"):
        assert load_single_file(path, folders["sd2"]).scheduler.config.prediction_type == "v_prediction"
    assert "v_prediction prediction (SD2.1's; SD2.1-base predicts epsilon" in caplog.text
    base = load_single_file(path, folders["sd2"], prediction_type="epsilon")
    assert base.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_the_full_single_file_loads_in_stock_diffusers_and_samples_what_generate_does(folders, family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from textcraftor_fast.models import export_tuned

    comp = load_diffusers_folder(folders[family])
    if family == "sdxl":
        comp.text_encoder.set_image_size(SIDE)
    tuned = _tuned(folders[family])
    want = _ours_generate(comp, tuned)
    path = export_tuned(comp, tuned, tmp_path / "tuned.safetensors", layout="single_file", full=True)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None}
    pipe = cls.from_single_file(path, config=str(folders[family]), local_files_only=True, **extra)
    got = _stock_sample(pipe, [torch.Generator().manual_seed(SEEDS[0] + i) for i in range(len(PROMPTS))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_sd2_pipeline_export_loads_in_stock_diffusers_and_samples_what_generate_does(folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    from textcraftor_fast.models import export_tuned

    comp = load_diffusers_folder(folders["sd2"])
    tuned = _tuned(folders["sd2"])
    want = _ours_generate(comp, tuned)
    export_tuned(comp, tuned, tmp_path / "pipeline", layout="pipeline", timestep_spacing="trailing")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    got = _stock_sample(pipe, [torch.Generator().manual_seed(SEEDS[0] + i) for i in range(len(PROMPTS))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
