"""The registries (textcraftor_fast.registry): names a config can give, the demo world plugged in by name only, and a
user's own entries, registered or named as 'module:function'."""
import subprocess
import sys

import pytest

from textcraftor_fast import load_config
from textcraftor_fast.config import ConfigError, ModelConfig
from textcraftor_fast.data import load_prompts
from textcraftor_fast.models import build_tiny_random, load_components
from textcraftor_fast.registry import (COMMANDS, CONFIGS, MODEL_KINDS, PROMPT_SETS, REWARDS, PromptSet, Registry,
                                       import_target)


def test_the_demo_world_is_registered_by_its_plugin():
    assert {"pretrained", "tiny_random", "tiny_world"} <= set(MODEL_KINDS.names())
    assert {"tiny_alignment", "tiny_aesthetic"} <= set(REWARDS.names())
    assert {"builtin:parti", "builtin:tiny_world", "builtin:tiny_world:validation"} <= set(PROMPT_SETS.names())
    assert "builtin:tiny" in CONFIGS and "demo" in COMMANDS


def test_looking_up_names_imports_no_model_code():
    """Entries are import strings: listing them (which runs the plugins' registration) loads no world or tower."""
    code = ("import sys; from textcraftor_fast.registry import MODEL_KINDS, REWARDS; MODEL_KINDS.names(); "
            "REWARDS.names(); print(sorted(m for m in sys.modules if m.startswith('textcraftor_fast.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = set(eval(run.stdout))
    assert {"textcraftor_fast.registry", "textcraftor_fast.tiny.plugin"} <= loaded
    # the package's config (imported by textcraftor_fast/__init__) and the plugin's registration: nothing else
    assert all(m.startswith("textcraftor_fast.config") for m in loaded - {
        "textcraftor_fast._version", "textcraftor_fast.registry", "textcraftor_fast.tiny", "textcraftor_fast.tiny.plugin"}), loaded


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"unknown model kind 'tiny_wrld'; did you mean 'tiny_world'.*registered: 'pretrained'"):
        MODEL_KINDS.get("tiny_wrld")
    with pytest.raises(ConfigError, match="model.kind.*one of 'pretrained', 'tiny_random', 'tiny_world'"):
        load_config(None, ["model.kind=nope"])


def test_a_name_is_registered_once_unless_replaced():
    registry = Registry("thing", {"a": "m:x"})
    registry.register("a", "m:x")  # the same entry again: nothing changes
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a", "m:y")
    registry.register("a", "m:y", replace=True)
    assert registry.get("a") == "m:y"


def my_loader(cfg, seed):
    """A user's model kind, named in a config as 'tests.test_registry:my_loader'."""
    return build_tiny_random(seed + 5)


def test_a_model_kind_named_as_module_function_loads():
    comp = load_components(load_config(None, ["model.kind=tests.test_registry:my_loader"]).model, seed=1)
    expected = build_tiny_random(6)
    assert all(a.equal(b) for a, b in zip(comp.unet.parameters(), expected.unet.parameters()))
    with pytest.raises(ImportError, match="has no attribute 'nope'"):
        load_components(ModelConfig(kind="tests.test_registry:nope"))


def test_a_registered_prompt_set_is_read_for_training_and_for_evaluation(tmp_path, monkeypatch):
    monkeypatch.setitem(PROMPT_SETS._entries, "builtin:mine", PromptSet(
        "textcraftor_fast:prompt_sets/PartiPrompts.tsv", None))
    assert len(load_prompts("builtin:mine", max_prompts=5)) == 5
    with pytest.raises(ValueError, match="holds no evaluation prompts"):
        load_prompts("builtin:mine", purpose="evaluation")
    train = load_prompts("builtin:tiny_world")
    held_out = load_prompts("builtin:tiny_world", purpose="evaluation")
    assert not set(train) & set(held_out)  # the world's evaluation captions are held out from its training ones


def test_import_target_names_what_is_wrong():
    assert import_target("textcraftor_fast.registry:Registry") is Registry
    with pytest.raises(ImportError, match="is not of the form 'module:attribute'"):
        import_target("textcraftor_fast.registry")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module'"):
        import_target("no_such_module:x")
