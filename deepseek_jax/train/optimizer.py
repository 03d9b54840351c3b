"""AdamW with the DeepSeek-V3 learning-rate schedule (V3 report sec. 4.2).

V3 pre-training used AdamW (beta1 0.9, beta2 0.95, weight decay 0.1),
gradient clipping at global norm 1.0 and this learning-rate schedule:

  * linear warmup 0 -> 2.2e-4 over the first 2K steps,
  * constant 2.2e-4 until 10T tokens,
  * cosine decay 2.2e-4 -> 2.2e-5 over the next 4.3T tokens,
  * constant 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B.

`lr_schedule` is that shape parameterised by steps. Weight decay is decoupled
(AdamW) and skips norm scales and any other parameter with fewer than two
dimensions: decaying an RMSNorm scale towards 0 fights the normalisation
it exists for. Stacked (`nn.scan`) layers give norm scales a leading layer
axis, so the mask goes by leaf name first and by rank second. The router bias
of aux-loss-free balancing is not a parameter at all (its own collection) and
never reaches the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Leaf names that are never weight-decayed, whatever their rank.
NO_DECAY_NAMES = ("scale",)      # RMSNorm scales (the model has no additive biases)


def lr_schedule(peak_lr: float, *, warmup_steps: int, hold_steps: int = 0,
                decay_steps: int = 0, end_lr: float | None = None,
                end_steps: int = 0, final_lr: float | None = None) -> optax.Schedule:
  """The V3 schedule by steps; every segment may have length 0.

    [0, W)                 linear 0 -> peak_lr           (lr = peak * t / W)
    [W, W+H)               peak_lr
    [W+H, W+H+D)           cosine peak_lr -> end_lr
    [W+H+D, W+H+D+E)       end_lr
    [W+H+D+E, inf)         final_lr   (default: end_lr)

  with W = warmup_steps, H = hold_steps, D = decay_steps, E = end_steps.
  V3 (in tokens): W = 2K steps, H = 10T, D = 4.3T, end_lr = 2.2e-5 for
  E = 333B, final_lr = 7.3e-6 for the last 167B.
  """
  for name, v in (("warmup_steps", warmup_steps), ("hold_steps", hold_steps),
                  ("decay_steps", decay_steps), ("end_steps", end_steps)):
    if not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name}={v!r} must be a non-negative integer.")
  if not peak_lr >= 0:
    raise ValueError(f"peak_lr={peak_lr} must be >= 0.")
  end_lr = peak_lr if end_lr is None else end_lr
  final_lr = end_lr if final_lr is None else final_lr
  if not 0 <= end_lr <= peak_lr or final_lr < 0:
    raise ValueError(
        f"end_lr={end_lr}, final_lr={final_lr}: need 0 <= end_lr <= peak_lr="
        f"{peak_lr} and final_lr >= 0.")

  segments = []        # (length, schedule); length None = forever
  if warmup_steps:
    segments.append((warmup_steps, optax.linear_schedule(0.0, peak_lr, warmup_steps)))
  if hold_steps:
    segments.append((hold_steps, optax.constant_schedule(peak_lr)))
  if decay_steps:
    alpha = end_lr / peak_lr if peak_lr > 0 else 0.0
    segments.append((decay_steps, optax.cosine_decay_schedule(peak_lr, decay_steps, alpha)))
  if end_steps:
    segments.append((end_steps, optax.constant_schedule(end_lr)))
  segments.append((None, optax.constant_schedule(final_lr)))

  boundaries = np.cumsum([n for n, _ in segments[:-1]]).tolist()
  return optax.join_schedules([s for _, s in segments], boundaries)


def lr_schedule_from_config(train_cfg: Any) -> optax.Schedule:
  """`lr_schedule` from a TrainConfig; decay_steps=0 decays until the last step."""
  decay = train_cfg.decay_steps or max(
      train_cfg.steps - train_cfg.warmup_steps - train_cfg.hold_steps
      - train_cfg.end_steps, 0)
  return lr_schedule(train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
                     hold_steps=train_cfg.hold_steps, decay_steps=decay,
                     end_lr=train_cfg.end_lr, end_steps=train_cfg.end_steps,
                     final_lr=train_cfg.final_lr)


def weight_decay_mask(params: Any) -> Any:
  """True where a leaf is weight-decayed: rank >= 2 and not a norm scale."""
  def decays(path, leaf):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None))
    return bool(name not in NO_DECAY_NAMES and np.ndim(leaf) >= 2)
  return jax.tree_util.tree_map_with_path(decays, params)


def moments_stored_as(dtype, inner: optax.GradientTransformation
                      ) -> optax.GradientTransformation:
  """`inner` with its Adam moments (mu, nu) kept in `dtype` between steps;
  each update computes in float32 (V3 sec. 3.3: BF16 moments, FP32 master
  weights and gradients, no observable loss of accuracy)."""
  def convert(state, to):
    def node(n):
      if isinstance(n, optax.ScaleByAdamState):
        cast = lambda t: jax.tree.map(lambda a: a.astype(to), t)  # noqa: E731
        return n._replace(mu=cast(n.mu), nu=cast(n.nu))
      return n
    return jax.tree.map(node, state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))

  def init(params):
    return convert(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, convert(state, np.float32), params)
    return updates, convert(state, dtype)
  return optax.GradientTransformation(init, update)


MOMENT_DTYPES = ("float32", "bfloat16")


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float = 1.0, moments_dtype: str = "float32"
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) -> AdamW(schedule) with the decay mask.

  clip_norm <= 0 or inf disables clipping. moments_dtype: "float32" or
  "bfloat16" (the storage of AdamW's two moments).
  """
  if moments_dtype not in MOMENT_DTYPES:
    raise ValueError(f"moments_dtype={moments_dtype!r} must be one of {MOMENT_DTYPES}.")
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=weight_decay_mask)
  if moments_dtype != "float32":
    adamw = moments_stored_as(jnp.dtype(moments_dtype), adamw)
  if clip_norm and math.isfinite(clip_norm) and clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
  return adamw
