"""Rewards: the protocol, `build_rewards`, and the names a config can give (registry.REWARDS: the built-in
rewards and a plugin's, imported only when a config names them, so unused towers cost nothing).

A config entry names a registered reward or a custom one as 'module:callable', where the callable is a
`Reward` subclass (built with `from_config(spec, device, dtype)` when it has one, else with the entry's
resize/clamp and `options`) or a factory `f(spec, **options)` returning a Reward, or any module/callable
`g(pixels, prompts) -> (B,)` (wrapped in `CallableReward`: it sees the [0, 1] images unless it carries
`input_size` / `mean` / `std` attributes, which then choose the resize and normalisation).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ..config import ConfigError, RewardConfig
from ..registry import REWARDS, import_target
from .base import CallableReward, Reward, WeightedRewards, freeze, preprocess

def _import(target: str):
    try:
        return import_target(target, "reward")
    except ImportError as e:
        raise ConfigError(str(e)) from None


def build_reward(spec: RewardConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Reward:
    """Instantiate one reward from its config entry, frozen, on `device`."""
    if spec.name in REWARDS:
        target = _import(REWARDS.get(spec.name))
    elif ":" in spec.name:
        target = _import(spec.name)
    else:
        import difflib
        close = difflib.get_close_matches(spec.name, REWARDS.names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown reward name '{spec.name}'.{hint} Valid names: {', '.join(REWARDS.names())}, "
                          "or 'module:callable' for a custom reward.")
    common = dict(resize=spec.resize, clamp_min=spec.clamp_min, clamp_max=spec.clamp_max)
    if inspect.isclass(target) and issubclass(target, Reward):
        if hasattr(target, "from_config"):
            reward = target.from_config(spec, device=device, dtype=dtype)
        else:
            reward = target(**common, **dict(spec.options))
    elif callable(target):
        reward = target(spec, **dict(spec.options))
        if not isinstance(reward, Reward):
            if not callable(reward):
                raise ConfigError(f"reward '{spec.name}': the factory returned {type(reward).__name__}; expected a "
                                  "Reward, or a module/callable scoring (pixels, prompts) -> (B,)")
            reward = CallableReward(reward, name=spec.name.rpartition(":")[2], **common)
    else:
        raise ConfigError(f"reward '{spec.name}' is a {type(target).__name__}, not a Reward subclass or a callable")
    return freeze(reward.to(device))


def build_rewards(specs: Sequence[RewardConfig], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> WeightedRewards:
    rewards = [build_reward(s, device, dtype) for s in specs]
    return WeightedRewards(rewards, [s.weight for s in specs])


__all__ = ["CallableReward", "Reward", "WeightedRewards", "REWARDS", "build_reward", "build_rewards", "freeze",
           "preprocess"]
