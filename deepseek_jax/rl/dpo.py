"""Direct preference optimisation: DPO (and IPO) on response log-probabilities.

DPO (Rafailov et al. 2023; DeepSeek LLM's chat model, sec. 5) trains the
policy pi on preference pairs against a frozen reference pi_ref (the SFT
start), with no reward model. With the summed log-probs of each pair's
response tokens (c, r under pi; rc, rr under pi_ref) and

  h = (c - rc) - (r - rr)          (the difference of the implicit rewards / beta)

the per-pair losses are
  "sigmoid"  DPO:  -log sigmoid(beta * h)      (softplus(-beta h): stable)
  "ipo"      IPO (Azar et al. 2023):  (h - 1 / (2 beta))^2
IPO regresses h onto a finite target instead of pushing it to infinity, so
it does not overfit deterministic preferences. (TRL feeds IPO per-token
mean log-probs; `response_logprobs(..., average=True)` gives those.)

Log-probs come from `response_logprobs`: infer.token_logprobs over a batch
of data/preferences.py's layout, summed over response_mask, so the prompt
and the padding never count. The implicit reward of a response is
beta * (logp - ref_logp); `dpo_metrics` reports the fraction of pairs the
policy ranks right by it, its mean margin, and the mean log-probs.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.data.preferences import split_pairs
from deepseek_jax.infer import token_logprobs

LOSS_TYPES = ("sigmoid", "ipo")
_LOGP_NAMES = ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")


def _check_beta(beta) -> None:
  """beta must be a finite number > 0 (checked when it is a Python number; a
  traced beta is the caller's responsibility)."""
  if isinstance(beta, (int, float)) and not (math.isfinite(beta) and beta > 0):
    raise ValueError(f"beta={beta} must be a finite number > 0 (DPO's usual 0.1)")


def _logps(values) -> list[jax.Array]:
  out = [jnp.asarray(v) for v in values]
  if out[0].ndim != 1:
    raise ValueError(f"chosen_logp has shape {out[0].shape}; expected summed response "
                     "log-probs per pair [n]")
  for name, v in zip(_LOGP_NAMES[1:], out[1:]):
    if v.shape != out[0].shape:
      raise ValueError(f"{name} has shape {v.shape}; expected chosen_logp's "
                       f"{out[0].shape}")
  return out


def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta,
             loss_type: str = "sigmoid") -> jax.Array:
  """Per-pair losses [n] (module docstring) from summed response log-probs
  [n] of the policy and the reference. ValueError naming the argument for a
  bad beta, loss_type or shape."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_TYPES}")
  _check_beta(beta)
  c, r, rc, rr = _logps((chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp))
  h = (c - rc) - (r - rr)
  if loss_type == "sigmoid":
    return jax.nn.softplus(-beta * h)
  return jnp.square(h - 1.0 / (2.0 * beta))


def dpo_metrics(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta,
                pair_mask=None) -> dict[str, jax.Array]:
  """Means over pairs [n] (pair_mask [n], optional: 1 = a real pair, padding
  pairs do not count):
    reward_accuracy  fraction of pairs with beta * h > 0 (ties count as wrong)
    margin           beta * h, the implicit reward margin (TRL's rewards/margins)
    chosen_reward, rejected_reward   beta * (c - rc), beta * (r - rr)
    chosen_logp, rejected_logp       the policy's summed log-probs
    logp_margin      c - r, the policy's chosen-minus-rejected log-prob margin."""
  _check_beta(beta)
  c, r, rc, rr = _logps((chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp))
  chosen_reward, rejected_reward = beta * (c - rc), beta * (r - rr)
  margin = chosen_reward - rejected_reward
  w = jnp.ones_like(c) if pair_mask is None else jnp.asarray(pair_mask, c.dtype)
  if w.shape != c.shape:
    raise ValueError(f"pair_mask has shape {w.shape}; expected chosen_logp's {c.shape}")
  count = jnp.maximum(w.sum(), 1.0)
  mean = lambda x: jnp.sum(jnp.where(w > 0, x, 0) * w) / count  # noqa: E731
  return {"reward_accuracy": mean((margin > 0).astype(c.dtype)), "margin": mean(margin),
          "chosen_reward": mean(chosen_reward), "rejected_reward": mean(rejected_reward),
          "chosen_logp": mean(c), "rejected_logp": mean(r), "logp_margin": mean(c - r)}


def response_token_logprobs(cfg: ModelConfig, variables: Any, batch: dict[str, jax.Array], *,
                            chunk: int = 128) -> jax.Array:
  """float32 [rows, seq]: log p(targets[j]) where response_mask[j] is 1 (the
  response tokens and <eos>), 0 elsewhere (prompt and padding), for a batch
  of data/preferences.py's layout. The full-sequence form of
  infer.token_logprobs (no gather). Differentiable in variables."""
  logp = token_logprobs(cfg, variables, batch["tokens"], batch["targets"],
                        segment_ids=batch["segment_ids"], positions=batch["positions"],
                        chunk=chunk)
  mask = jnp.asarray(batch["response_mask"], jnp.float32)
  return jnp.where(mask > 0, logp, 0.0) * mask


def _reduce(token_logp, response_mask, average: bool) -> jax.Array:
  total = token_logp.sum(axis=1)
  if not average:
    return total
  return total / jnp.maximum(jnp.asarray(response_mask, jnp.float32).sum(axis=1), 1.0)


def response_logprobs(cfg: ModelConfig, variables: Any, batch: dict[str, jax.Array], *,
                      chunk: int = 128, average: bool = False) -> jax.Array:
  """float32 [rows]: the sum (average=True: the mean) of log p(target) over
  each row's response tokens (`response_token_logprobs`); prompt and padding
  positions are excluded, so padding never changes a row's value."""
  return _reduce(response_token_logprobs(cfg, variables, batch, chunk=chunk),
                 batch["response_mask"], average)


def dpo_loss_fn(cfg: ModelConfig, *, beta: float, loss_type: str = "sigmoid",
                average: bool = False, chunk: int = 128) -> Callable:
  """The DPO / IPO loss for train.step.make_update_step: (params, router_bias,
  batch) -> (mean per-pair loss, {"metrics": dpo_metrics + loss}).

  batch: a data/preferences.py pair batch plus "ref_logp" [rows, seq], the
  frozen reference's `response_token_logprobs` of the same rows (computed
  once per batch, or cached; [rows, seq] like every batch array, so it is
  split over the data axes with them). average=True compares per-token mean
  log-probs (TRL's IPO) instead of sums. Metrics are on the values compared."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_TYPES}")
  _check_beta(beta)

  def loss_fn(params, router_bias, batch):
    variables = {"params": params, "router_bias": router_bias}
    logp = _reduce(response_token_logprobs(cfg, variables, batch, chunk=chunk),
                   batch["response_mask"], average)
    ref = _reduce(batch["ref_logp"], batch["response_mask"], average)
    (c, r), (rc, rr) = split_pairs(logp), split_pairs(ref)
    loss = dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type).mean()
    return loss, {"metrics": dict(dpo_metrics(c, r, rc, rr, beta=beta), loss=loss)}

  return loss_fn
