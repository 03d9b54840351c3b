"""Reinforcement learning for reasoning (DeepSeekMath's GRPO, DeepSeek-R1's recipe)."""

from deepseek_jax.rl import evaluation, rewards, verifiers
from deepseek_jax.rl.grpo import (KL_ESTIMATORS, LOSS_TYPES, SCALES, group_advantages,
                                  grpo_loss, kl_per_token)

__all__ = ["rewards", "verifiers", "evaluation", "group_advantages", "grpo_loss", "kl_per_token", "LOSS_TYPES", "SCALES",
           "KL_ESTIMATORS"]
