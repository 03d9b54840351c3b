"""GRPO's objective: group advantages and the clipped, KL-regularised token loss.

DeepSeekMath (sec. 4.1) samples a group of G completions o_1..o_G per prompt
from the old policy, scores them, and maximises

  J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
                                - beta * KL_it ]
  rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
  A_i    = (r_i - mean(r_1..r_G)) / std(r_1..r_G)            (outcome supervision)
  KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1        (the "k3" estimator)

with every sum over completion tokens only. Later work changed two of its
normalisations, selectable here:
  loss_type "grpo"     the mean over each completion's tokens, then over
                       completions (above)
            "dapo"     the mean over all completion tokens of the batch (DAPO:
                       long completions are not down-weighted per token)
            "dr_grpo"  the sum over tokens / (N x L), L the generation limit
                       (Dr. GRPO: no length normalisation at all)
            "gspo"     GSPO (Qwen, Zheng et al. 2025): one importance ratio per
                       sequence, the geometric mean of its token ratios,
                       s_i = exp(mean_t(logp - old_logp)) over the counted
                       tokens, clipped per sequence (the paper's ranges are
                       small: eps_low 3e-4, eps_high 4e-4); the KL term and the
                       aggregation as "grpo" (per-sequence token mean, then
                       the mean over sequences). Gradients reach every token
                       of a sequence through s_i (the paper's GSPO objective;
                       GSPO-token has the same value and gradient when all
                       tokens of a sequence share the advantage, as here).
  scale     "group"    A divided by the group's std (+1e-4), ddof 0
            "batch"    divided by the std of the whole batch
            "none"     not divided (Dr. GRPO)
and DAPO's "clip-higher": eps_high > eps_low lets unlikely tokens with a
positive advantage grow further.

On the first optimisation pass over fresh rollouts pi_theta = pi_old, so
rho = 1, nothing is clipped, and the loss equals -mean(A) (zero within each
group: advantages are centred) minus the KL term: a GRPO loss near 0 at the
start is expected, not a bug. What moves is its gradient, sum_t A_i grad
log pi_theta(o_it): watch reward and grad norm, not the loss.

The KL estimators of pi_theta against pi_ref per token, with
d = ref_logp - logp (= log pi_ref/pi_theta):
  k1 = -d            (log-ratio; unbiased, high variance, can be negative)
  k2 = d^2 / 2
  k3 = exp(d) - d - 1   (DeepSeekMath; unbiased, always >= 0)
kl_clamp (optional) clips the per-token value to [-kl_clamp, kl_clamp].

Truncated importance sampling (off by default) corrects rollouts sampled by
a different numerical path (bf16 / FP8 rollouts, a separate engine): with
rollout_logp given, each token's term is weighted by
min(exp(old_logp - rollout_logp), tis_cap). Our rollouts and the trainer run
the same module in the same precision, so old_logp == rollout_logp and the
weight is 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo")
SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
STD_EPS = 1e-4


def group_advantages(rewards, group_size: int, scale: str = "group",
                     scored=None) -> jax.Array:
  """A per completion from rewards [N] (N = prompts x group_size, each
  prompt's completions contiguous): reward minus its group's mean, divided
  by (std + 1e-4) with std (ddof 0) over the group ("group"), over the whole
  batch ("batch"), or not divided ("none").

  scored (bool [N], optional): the rows a reward function could score. Means
  and stds are then over the scored rows only (a row no function could score
  says nothing about its group), and unscored rows get advantage 0 (the
  trainer also masks them out of the loss)."""
  if scale not in SCALES:
    raise ValueError(f"scale={scale!r} must be one of {SCALES}.")
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1:
    raise ValueError(f"rewards must be a vector [N]; got shape {r.shape}.")
  if group_size < 1 or r.shape[0] % group_size:
    raise ValueError(f"len(rewards)={r.shape[0]} must be a multiple of group_size="
                     f"{group_size} (each prompt's completions contiguous).")
  w = jnp.ones_like(r) if scored is None else jnp.asarray(scored, jnp.float32)
  if w.shape != r.shape:
    raise ValueError(f"scored has shape {w.shape}; rewards {r.shape}.")
  r = jnp.where(w > 0, r, 0.0)
  g, gw = r.reshape(-1, group_size), w.reshape(-1, group_size)
  n = jnp.maximum(gw.sum(axis=1, keepdims=True), 1.0)
  mean = (g * gw).sum(axis=1, keepdims=True) / n
  centred = ((g - mean) * gw).reshape(-1)
  if scale == "group":
    std = jnp.sqrt((((g - mean) * gw) ** 2).sum(axis=1) / n[:, 0])
    return centred / (jnp.repeat(std, group_size) + STD_EPS)
  if scale == "batch":
    total = jnp.maximum(w.sum(), 1.0)
    batch_mean = (r * w).sum() / total
    return centred / (jnp.sqrt((((r - batch_mean) * w) ** 2).sum() / total) + STD_EPS)
  return centred


def kl_per_token(logp, ref_logp, estimator: str = "k3", clamp: float | None = None):
  """The per-token KL(pi_theta || pi_ref) estimate (module docstring)."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_estimator={estimator!r} must be one of {KL_ESTIMATORS}.")
  d = ref_logp - logp
  if estimator == "k1":
    kl = -d
  elif estimator == "k2":
    kl = 0.5 * d * d
  else:
    kl = jnp.exp(d) - d - 1.0
  if clamp is not None:
    kl = jnp.clip(kl, -clamp, clamp)
  return kl


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.04, loss_type: str = "grpo",
              kl_estimator: str = "k3", kl_clamp: float | None = None,
              rollout_logp=None, tis_cap: float | None = None
              ) -> tuple[jax.Array, dict[str, Any]]:
  """(loss to minimise, metrics). logp, old_logp, ref_logp, mask: [N, L]
  (completion tokens; mask 1 on tokens that count); advantages [N].
  ref_logp may be None when beta == 0. Metrics: kl (masked token mean, 0
  without a reference), clip_low / clip_high (fraction of tokens whose ratio
  was clipped from below with A < 0 / above with A > 0; with "gspo" a
  sequence's ratio counts for each of its tokens), ratio_mean, tokens.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_TYPES}.")
  if not (0 <= eps_low < 1 and eps_high >= 0):
    raise ValueError(f"eps_low={eps_low} must lie in [0, 1) and eps_high={eps_high} >= 0.")
  if beta < 0:
    raise ValueError(f"beta={beta} must be >= 0.")
  if beta > 0 and ref_logp is None:
    raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs).")
  logp = jnp.asarray(logp, jnp.float32)
  if logp.ndim != 2:
    raise ValueError(f"logp must be [N, L]; got shape {logp.shape}.")
  for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask),
                  ("rollout_logp", rollout_logp)):
    if x is not None and jnp.shape(x) != logp.shape:
      raise ValueError(f"{name} shape {jnp.shape(x)} must equal logp shape {logp.shape}.")
  if jnp.shape(advantages) != logp.shape[:1]:
    raise ValueError(f"advantages shape {jnp.shape(advantages)} must be [N]="
                     f"{logp.shape[:1]}.")
  m = jnp.asarray(mask, jnp.float32)
  a = jnp.asarray(advantages, jnp.float32)[:, None]
  if loss_type == "gspo":      # one ratio per sequence: the geometric mean of its tokens'
    log_s = ((logp - old_logp) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
    ratio = jnp.broadcast_to(jnp.exp(log_s)[:, None], logp.shape)
  else:
    ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  surrogate = jnp.minimum(ratio * a, clipped * a)
  if rollout_logp is not None:
    log_w = old_logp - rollout_logp
    if loss_type == "gspo":    # the sequence's weight: geometric mean, as its ratio
      log_w = jnp.broadcast_to(((log_w * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
                                )[:, None], logp.shape)
    w = jnp.exp(log_w)
    if tis_cap is not None:
      w = jnp.minimum(w, tis_cap)
    surrogate = jax.lax.stop_gradient(w) * surrogate
  if beta > 0:
    kl = kl_per_token(logp, ref_logp, kl_estimator, kl_clamp)
    objective = surrogate - beta * kl
  else:
    kl = jnp.zeros_like(logp) if ref_logp is None else jax.lax.stop_gradient(
        kl_per_token(logp, ref_logp, kl_estimator, kl_clamp))
    objective = surrogate
  n_tok = m.sum()
  if loss_type in ("grpo", "gspo"):
    per_seq_tokens = m.sum(axis=1)
    has = per_seq_tokens > 0
    per_seq = (objective * m).sum(axis=1) / jnp.maximum(per_seq_tokens, 1.0)
    total = jnp.where(has, per_seq, 0.0).sum() / jnp.maximum(has.sum(), 1)
  elif loss_type == "dapo":
    total = (objective * m).sum() / jnp.maximum(n_tok, 1.0)
  else:
    total = (objective * m).sum() / (logp.shape[0] * logp.shape[1])
  denom = jnp.maximum(n_tok, 1.0)
  metrics = {
      "kl": (kl * m).sum() / denom,
      "clip_low": (((ratio < 1.0 - eps_low) & (a < 0)) * m).sum() / denom,
      "clip_high": (((ratio > 1.0 + eps_high) & (a > 0)) * m).sum() / denom,
      "ratio_mean": (ratio * m).sum() / denom,
      "tokens": n_tok,
  }
  return -total, metrics
