"""How the embedded tiny world plugs into the engine, as any plugin does: by name, through the registries of
`textcraftor_fast.registry` (which lists `register` among its plugins). Nothing outside `tiny/` imports this
package; a config or the command line reaches it by these names:

    model.kind = "tiny_world"                   the shipped, pretrained tiny world (world.py)
    rewards "tiny_alignment", "tiny_aesthetic"  the judge's differentiable rewards (rewards.py)
    "builtin:tiny_world[:test|:validation]"     training captions; for evaluation the held-out test (or validation)
                                                captions, scored by the judge too on tiny-world images. These are
                                                the SHIPPED world's (tiny/prompts/, equal to the split in its
                                                build_info.json); the demo writes and uses the loaded world's own
    --config builtin:tiny                       the demo's config
    textcraftor-fast demo                       the demo and its robustness sweep (cli.py)
"""
from __future__ import annotations

from ..registry import COMMANDS, CONFIGS, MODEL_KINDS, PROMPT_SETS, REWARDS, Command, ModelKind, PromptSet

KIND = "tiny_world"
_PROMPTS = "textcraftor_fast.tiny:prompts/{}.txt"
_JUDGE = "textcraftor_fast.tiny.evaluate:judge_scorer"


def register() -> None:
    MODEL_KINDS.register(KIND, ModelKind("textcraftor_fast.tiny.world:load_tiny_world_kind",
                                         eval_prompts="builtin:tiny_world"))
    REWARDS.register("tiny_alignment", "textcraftor_fast.tiny.rewards:AlignmentReward")
    REWARDS.register("tiny_aesthetic", "textcraftor_fast.tiny.rewards:PaletteAestheticReward")
    # For evaluation the bare name means the held-out TEST captions (the demo's reported split), never the
    # training captions it trains on.
    test, validation = _PROMPTS.format("test"), _PROMPTS.format("validation")
    PROMPT_SETS.register("builtin:tiny_world", PromptSet(_PROMPTS.format("train"), test, _JUDGE, KIND))
    PROMPT_SETS.register("builtin:tiny_world:test", PromptSet(None, test, _JUDGE, KIND))
    PROMPT_SETS.register("builtin:tiny_world:validation", PromptSet(None, validation, _JUDGE, KIND))
    CONFIGS.register("builtin:tiny", "textcraftor_fast.tiny:configs/tiny.toml")
    COMMANDS.register("demo", Command(
        "textcraftor_fast.tiny.cli:add_arguments", "textcraftor_fast.tiny.cli:run", default_config="builtin:tiny",
        help="the embedded tiny world: fine-tune, evaluate before/after, write images; with --seeds/--threads, the "
             "robustness sweep (exit status 1 unless every run PASSes)"))
