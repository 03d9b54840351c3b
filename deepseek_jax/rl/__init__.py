"""Reinforcement learning for reasoning (DeepSeekMath's GRPO, DeepSeek-R1's recipe)."""

from deepseek_jax.rl import dpo, evaluation, reward_model, rewards, verifiers
from deepseek_jax.rl.dpo import dpo_loss
from deepseek_jax.rl.grpo import (KL_ESTIMATORS, LOSS_TYPES, SCALES, group_advantages,
                                  grpo_loss, kl_per_token)
from deepseek_jax.rl.reward_model import bradley_terry_loss, reward_scores

__all__ = ["rewards", "verifiers", "evaluation", "dpo", "reward_model", "group_advantages",
           "grpo_loss", "kl_per_token", "dpo_loss", "bradley_terry_loss", "reward_scores",
           "LOSS_TYPES", "SCALES", "KL_ESTIMATORS"]
