"""Rewards: the protocol, the registry of built-in rewards (imported lazily), and `build_rewards`."""
from __future__ import annotations

import importlib
import inspect
from typing import Sequence

import torch

from ..config import ConfigError, RewardConfig
from .base import Reward, WeightedRewards, freeze, preprocess

# name -> "module:attribute"; imported only when a config names it, so unused towers cost nothing.
REWARDS: dict[str, str] = {
    "brightness": "textcraftor_fast.rewards.simple:BrightnessReward",
    "colorfulness": "textcraftor_fast.rewards.simple:ColorfulnessReward",
}


def _import(target: str):
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward '{target}': cannot import module '{module_name}': {e}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"reward '{target}': module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def build_reward(spec: RewardConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Reward:
    """Instantiate one reward from its config entry, frozen, on `device`."""
    if spec.name in REWARDS:
        target = _import(REWARDS[spec.name])
    elif ":" in spec.name:
        target = _import(spec.name)
    else:
        import difflib
        close = difflib.get_close_matches(spec.name, list(REWARDS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown reward name '{spec.name}'.{hint} Valid names: {', '.join(sorted(REWARDS))}, "
                          "or 'module:callable' for a custom reward.")
    common = dict(resize=spec.resize, clamp_min=spec.clamp_min, clamp_max=spec.clamp_max)
    if inspect.isclass(target) and issubclass(target, Reward):
        if hasattr(target, "from_config"):
            reward = target.from_config(spec, device=device, dtype=dtype)
        else:
            reward = target(**common, **dict(spec.options))
    else:
        reward = target(spec, **dict(spec.options)) if callable(target) else None
        if not isinstance(reward, Reward):
            raise ConfigError(f"reward '{spec.name}' must be a Reward subclass or a callable returning a Reward, "
                              f"got {type(reward).__name__}")
    return freeze(reward.to(device))


def build_rewards(specs: Sequence[RewardConfig], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> WeightedRewards:
    rewards = [build_reward(s, device, dtype) for s in specs]
    return WeightedRewards(rewards, [s.weight for s in specs])


__all__ = ["Reward", "WeightedRewards", "REWARDS", "build_reward", "build_rewards", "freeze", "preprocess"]
