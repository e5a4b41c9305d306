import pytest

from textcraftor_fast.config import ConfigError, TrainConfig, load_config, to_toml, config_from_dict
import tomllib

TINY = ["model.kind=tiny_random"]  # the default kind (pretrained) needs a model.path


def test_defaults_are_the_papers():
    cfg = TrainConfig()
    assert cfg.sampler.num_steps == 25 and cfg.sampler.eta == 0.0 and cfg.sampler.guidance_scale == 7.5
    assert cfg.sampler.grad_steps == 5 and cfg.sampler.effective_switch_step == 20
    assert cfg.sampler.timestep_spacing == "trailing"
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.name == "adamw"
    assert cfg.train.batch_size == 4


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nsteps = 7\n[[rewards]]\nname = "brightness"\nweight = 2.0\n')
    cfg = load_config(f, TINY + ["train.batch_size=3", "rewards.0.weight=0.5", 'output.dir="x/y"', "sampler.eta=0"])
    assert cfg.train.steps == 7 and cfg.train.batch_size == 3
    assert cfg.rewards[0].weight == 0.5 and cfg.output.dir == "x/y"
    assert isinstance(cfg.sampler.eta, float)


def test_bare_word_override_is_a_string():
    assert load_config(None, TINY + ["sampler.checkpoint=none"]).sampler.checkpoint == "none"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stepz'.*'train\.steps'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'samplr'"):
        config_from_dict({"samplr": {}})


def test_wrong_type_and_range_name_key_expected_got():
    with pytest.raises(ConfigError, match=r"'train\.steps': expected int, got 'abc'"):
        load_config(None, ['train.steps="abc"'])
    with pytest.raises(ConfigError, match=r"'sampler\.grad_steps': expected an integer in \[1, num_steps=25\], got 30"):
        load_config(None, TINY + ["sampler.grad_steps=30"])
    with pytest.raises(ConfigError, match=r"'train\.mixed_precision': expected one of 'no', 'bf16', 'fp16', got 'fp8'"):
        load_config(None, TINY + ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="a.b=c"):
        load_config(None, ["train.steps"])


def test_diffusers_spellings_are_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlearning_rate = 1e-5\nuse_8bit_adam = true\ngradient_checkpointing = false\n")
    cfg = load_config(f, TINY + ["train.max_train_steps=9"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.name == "adamw8bit"
    assert cfg.sampler.checkpoint == "none" and cfg.train.steps == 9


def test_round_trip_through_toml():
    cfg = load_config("configs/tiny_random.toml")
    again = config_from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_missing_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.toml")


def test_pretrained_needs_a_path():
    with pytest.raises(ConfigError, match=r"'model\.path'"):
        load_config(None)


def test_builtin_tiny_config_is_shipped_and_matches_the_readable_copy():
    from pathlib import Path

    from textcraftor_fast.config import resolve_config_path

    shipped = resolve_config_path("builtin:tiny")
    assert shipped.is_file() and "textcraftor_fast" in shipped.parts
    assert shipped.read_bytes() == Path("configs/tiny.toml").read_bytes(), "edit both copies together"
    assert load_config("builtin:tiny") == load_config("configs/tiny.toml")
    with pytest.raises(ConfigError, match="built-in configs: builtin:tiny"):
        load_config("builtin:nope")


def test_unet_stage_settings_default_to_diffusers_lora_and_name_bad_values():
    cfg = load_config(None, TINY + ["train.stage=unet"])
    assert cfg.train.stage == "unet" and TrainConfig().train.stage == "text_encoder"
    u = cfg.unet
    assert (u.method, u.rank, u.lora_alpha, u.target_modules) == ("lora", 4, 4.0, ("to_k", "to_q", "to_v", "to_out.0"))
    assert load_config(None, TINY + ["unet.rank=8", "unet.alpha=4"]).unet.lora_alpha == 4.0
    for override, pattern in [
        ("train.stage=vae", r"'train\.stage': expected one of 'text_encoder', 'unet', got 'vae'"),
        ("unet.method=dora", r"'unet\.method': expected one of 'lora', 'full', got 'dora'"),
        ("unet.rank=0", r"'unet\.rank': expected an integer >= 1, got 0"),
        ("unet.alpha=-1", r"'unet\.alpha': expected a float > 0 or unset"),
        ("unet.target_modules=[]", r"'unet\.target_modules': expected a non-empty list of module names"),
        ("unet.rnak=4", r"unknown config key 'unet\.rnak'; did you mean 'unet\.rank'"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, TINY + [override])
    assert load_config(None, TINY + ["train.stage=unet"]) == config_from_dict(tomllib.loads(to_toml(cfg)))
    with pytest.raises(ConfigError, match=r"'train\.stage': expected 'text_encoder' with distributed\.backend='deepspeed'"):
        load_config(None, TINY + ["train.stage=unet", "distributed.backend=deepspeed"])


def test_checkpoint_choices_name_the_key_and_the_valid_ones():
    cfg = load_config(None, TINY + ["sampler.checkpoint=auto", "sampler.checkpoint_vae=auto",
                                    "train.memory_budget_gb=6"])
    assert (cfg.sampler.checkpoint, cfg.sampler.checkpoint_vae, cfg.train.memory_budget_gb) == ("auto", "auto", 6.0)
    assert load_config(None, TINY + ["sampler.checkpoint_vae=blocks"]).sampler.checkpoint_vae == "blocks"
    assert load_config(None, TINY + ["sampler.checkpoint_vae=false"]).sampler.checkpoint_vae is False
    with pytest.raises(ConfigError, match=r"'sampler\.checkpoint_vae': expected bool or one of 'blocks', 'auto'"):
        load_config(None, TINY + ["sampler.checkpoint_vae=sometimes"])
    with pytest.raises(ConfigError, match=r"'sampler\.checkpoint_vae'.*'auto' needs sampler\.checkpoint='auto'"):
        load_config(None, TINY + ["sampler.checkpoint_vae=auto"])
    with pytest.raises(ConfigError, match=r"'train\.memory_budget_gb': expected a float > 0"):
        load_config(None, TINY + ["train.memory_budget_gb=0"])
    assert load_config(None, TINY + ["sampler.checkpoint_unet_blocks=true"]).sampler.checkpoint_unet_blocks is True
    with pytest.raises(ConfigError, match=r"'sampler\.checkpoint_unet_blocks': expected false when "
                                          r"sampler\.checkpoint='none'"):
        load_config(None, TINY + ["sampler.checkpoint=none", "sampler.checkpoint_unet_blocks=true"])


def _float_keys(cls=TrainConfig, prefix=""):
    """Every config key whose type admits a float, found by walking the dataclass tree (list sections: item 0)."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        args = typing.get_args(tp)
        inner = args[0] if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]) else tp
        if dataclasses.is_dataclass(inner):
            yield from _float_keys(inner, f"{key}.0." if inner is not tp else f"{key}.")
        elif tp is float or float in args:
            yield key, (typing.get_origin(tp) is tuple and args.count(float) == len(args))


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_every_float_key_refuses_a_non_finite_value(bad):
    keys = list(_float_keys())
    assert len(keys) >= 12 and ("sampler.guidance_scale", False) in keys and ("optim.betas", True) in keys
    for key, is_pair in keys:
        value = f"[0.9, {bad}]" if is_pair else bad
        with pytest.raises(ConfigError, match=f"config key '{key}(.1)?': expected a finite number, got {bad}"):
            load_config("configs/tiny_random.toml", [f"{key}={value}"])
