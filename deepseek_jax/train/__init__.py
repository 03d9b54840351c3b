"""Training: optimizer, losses, the train step, checkpoints, the run harness
(runner.py: one loop for every trainer; start.py: mesh, resume, init) and
pretraining / SFT (loop.train).

    from deepseek_jax.train import TrainConfig, train
    summary = train(get_preset("small"), TrainConfig(steps=600), "/tmp/run")
"""

from deepseek_jax.train.checkpoint import Checkpoints, open_checkpoints
from deepseek_jax.train.evaluate import exact_match, greedy_completions
from deepseek_jax.train.losses import cross_entropy, mtp_targets, total_loss
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.loop import build_data, train
from deepseek_jax.train.optimizer import (AdamW, apply_update, lr_schedule, make_optimizer,
                                          weight_decay_mask)
from deepseek_jax.train.step import (TrainState, abstract_train_state, init_train_state,
                                     make_train_step, make_update_step,
                                     pretraining_loss, update_router_bias)

__all__ = [
    "TrainConfig", "train", "build_data",
    "TrainState", "init_train_state", "abstract_train_state", "make_train_step",
    "make_update_step", "pretraining_loss", "update_router_bias",
    "AdamW", "apply_update", "lr_schedule", "make_optimizer", "weight_decay_mask",
    "cross_entropy", "mtp_targets", "total_loss",
    "Checkpoints", "open_checkpoints",
    "exact_match", "greedy_completions",
]
