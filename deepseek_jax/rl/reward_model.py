"""Reward models: a scalar value head on the Transformer, and the Bradley-Terry loss.

A reward model scores a (prompt, response) row with one number: the
Transformer's normalised final hidden state at the row's last response token
(the input position whose target is <eos>; data/preferences.py's
response_mask marks it as the mask's last 1) times a learned vector, plus a
scalar bias:

  r(row) = h[row, last] . value_head["kernel"] + value_head["bias"]

It is trained on preference pairs (DeepSeek-V3 sec. 5.2's reward model,
InstructGPT's, Llama 2's) with the Bradley-Terry loss per pair

  loss = -log sigmoid(r_chosen - r_rejected - margin)

(margin: Llama 2's optional per-pair margin by preference strength; 0 is
plain Bradley-Terry). The value head is a separate pytree
{"kernel": [dim], "bias": []} beside the model's variables, so a published
checkpoint or an SFT run loads unchanged and the head is initialised fresh.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.data.preferences import split_pairs
from deepseek_jax.model import Transformer


def bradley_terry_loss(r_chosen, r_rejected, *, margin=0.0) -> jax.Array:
  """Per-pair losses [n] = -log sigmoid(r_chosen - r_rejected - margin),
  computed as softplus(-(.)) so large reward gaps neither overflow nor lose
  the gradient. r_chosen, r_rejected: [n]; margin a scalar or [n]."""
  r_chosen, r_rejected = jnp.asarray(r_chosen), jnp.asarray(r_rejected)
  if r_chosen.ndim != 1:
    raise ValueError(f"r_chosen has shape {r_chosen.shape}; expected per-pair rewards [n]")
  if r_rejected.shape != r_chosen.shape:
    raise ValueError(f"r_rejected has shape {r_rejected.shape}; expected r_chosen's "
                     f"{r_chosen.shape}")
  if jnp.ndim(margin) not in (0, 1) or (jnp.ndim(margin) == 1
                                        and jnp.shape(margin) != r_chosen.shape):
    raise ValueError(f"margin has shape {jnp.shape(margin)}; expected a scalar or "
                     f"{r_chosen.shape} (one per pair)")
  return jax.nn.softplus(-(r_chosen - r_rejected - margin))


def reward_metrics(r_chosen, r_rejected, pair_mask=None) -> dict[str, jax.Array]:
  """Held-out metrics of per-pair rewards [n]: "accuracy" (the fraction of
  pairs with r_chosen > r_rejected; ties count as wrong), "margin" (mean
  r_chosen - r_rejected), "chosen_reward" and "rejected_reward" (means).
  pair_mask [n] (optional, 1 = a real pair): padding pairs do not count."""
  diff = r_chosen - r_rejected
  w = jnp.ones_like(diff) if pair_mask is None else jnp.asarray(pair_mask, diff.dtype)
  count = jnp.maximum(w.sum(), 1.0)
  mean = lambda x: jnp.sum(jnp.where(w > 0, x, 0) * w) / count  # noqa: E731
  return {"accuracy": mean((diff > 0).astype(diff.dtype)), "margin": mean(diff),
          "chosen_reward": mean(r_chosen), "rejected_reward": mean(r_rejected)}


def init_value_head(cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
  """{"kernel": [dim] float32 ~ N(0, 1 / (dim + 1)), "bias": 0.0}: the scale of
  OpenAI's lm-human-preferences reward head, so initial rewards of the
  unit-RMS final hidden state are O(1)."""
  kernel = jax.random.normal(key, (cfg.dim,), jnp.float32) / math.sqrt(cfg.dim + 1)
  return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def last_response_index(response_mask) -> jax.Array:
  """Per row [b] the position of response_mask's last 1 (the last response
  token, whose target is <eos>); 0 for a row without one."""
  s = response_mask.shape[1]
  idx = jnp.where(response_mask > 0, jnp.arange(s, dtype=jnp.int32), -1)
  return jnp.maximum(idx.max(axis=1), 0)


def reward_scores(cfg: ModelConfig, variables: Any, value_head: dict[str, jax.Array],
                  batch: dict[str, jax.Array]) -> jax.Array:
  """float32 [rows]: each row's reward (module docstring) for a batch of
  data/preferences.py's layout (tokens, segment_ids, positions,
  response_mask). Differentiable in variables and value_head. A row without
  response tokens (an all-padding filler row) scores at position 0: mask
  such rows out of any loss or metric."""
  h = Transformer(cfg).apply(variables, batch["tokens"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"], return_hidden=True)
  last = last_response_index(batch["response_mask"])
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return h_last @ value_head["kernel"].astype(jnp.float32) + value_head["bias"]


def reward_model_loss_fn(cfg: ModelConfig, *, margin: float = 0.0) -> Callable:
  """The Bradley-Terry loss for train.step.make_update_step: (params,
  router_bias, batch) -> (mean per-pair loss, {"metrics": reward_metrics +
  loss}), on a data/preferences.py pair batch. params is the model's
  parameters plus "value_head" ({"kernel", "bias"}, `init_value_head`), so one
  optimizer trains both."""

  def loss_fn(params, router_bias, batch):
    model = {k: v for k, v in params.items() if k != "value_head"}
    scores = reward_scores(cfg, {"params": model, "router_bias": router_bias},
                           params["value_head"], batch)
    r_chosen, r_rejected = split_pairs(scores)
    loss = bradley_terry_loss(r_chosen, r_rejected, margin=margin).mean()
    return loss, {"metrics": dict(reward_metrics(r_chosen, r_rejected), loss=loss)}

  return loss_fn
