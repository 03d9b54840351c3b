"""Training objective: next-token CE + MTP CE + sequence-wise balance loss.

  L = CE + (lambda / D) sum_{k=1..D} CE_k + alpha * L_bal        (V3 eqs. 25, 17)

CE is the cross-entropy of the main head, averaged over target tokens weighted
by `loss_mask`, with the log-softmax in float32. MTP depth k at position i
predicts t_{i+k+1}, which is `targets[:, i + k]` (see `model/mtp.py`). That
target is valid only when it is a real target of the batch (its loss_mask is
non-zero) and belongs to the same packed document as position i: in a packed
row the next document's tokens must not be predicted from this one's context.
L_bal arrives from the model already summed over MoE layers and unscaled
(`aux["balance_loss"]`); alpha is a training hyperparameter (V3: 1e-4).

DeepSeek-V2's auxiliary losses, for ablations (off unless the model was built
with balance_devices > 0, which the trainer does when one of their weights is):

  L += alpha1 L_expert + alpha2 L_device + alpha3 L_comm     (V2 sec. 2.2.3)

each summed over the MoE layers (MTP blocks included), from
`aux["v2_balance"]` (per-layer, unscaled; model.moe.v2_balance_losses).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.model.mtp import shift_left


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Weighted mean token cross-entropy.

  logits [b, s, V] (any float; log-softmax in float32), targets int [b, s],
  weights [b, s]. Returns (mean CE, sum of weights). A batch without any
  weight gives 0, not NaN.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)       # [b, s, V]
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  total = weights.sum()
  return (nll * weights).sum() / jnp.maximum(total, 1e-9), total


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array]:
  """Targets and weights of MTP depth k (1-based): t_{i+k+1} at position i.

  targets_k[i] = targets[i + k]; weight_k[i] = loss_mask[i + k] when position
  i + k is in the same (non-padding) segment as i, else 0. All [b, s].
  """
  targets_k = shift_left(targets, k)
  same_doc = (shift_left(segment_ids, k) == segment_ids) & (segment_ids != 0)
  weights_k = shift_left(loss_mask.astype(jnp.float32), k) * same_doc
  return targets_k, weights_k


V2_METRICS = (("expert", "balance_expert"), ("device", "balance_device"),
              ("comm", "balance_comm"))


def total_loss(logits: jax.Array, aux: dict[str, Any], batch: dict[str, jax.Array], *,
               mtp_weight: float, balance_weight: float, expert_balance_weight: float = 0.0,
               device_balance_weight: float = 0.0, comm_balance_weight: float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (L, metrics) for one batch.

  metrics: loss (L), ce (main head), mtp (mean CE over the D depths, before
  lambda), balance (L_bal before alpha), target_tokens (sum of loss_mask).
  When aux has "v2_balance" (V2's losses per MoE layer), the three V2 weights
  (alpha1..3) scale their layer sums into L, and metrics add balance_expert,
  balance_device, balance_comm (layer sums before alpha) and the per-layer
  values balance_expert_per_layer etc. ([layers] arrays), and
  device_tokens_per_layer ([layers, D]: tokens per sequence that send to
  each device).
  """
  ce, n_targets = cross_entropy(logits, batch["targets"], batch["loss_mask"])
  loss = ce
  metrics = {"ce": ce, "target_tokens": n_targets}
  if "mtp_logits" in aux:
    depth = aux["mtp_logits"].shape[0]
    mtp_ces = []
    for k in range(1, depth + 1):
      t_k, w_k = mtp_targets(batch["targets"], batch["loss_mask"],
                             batch["segment_ids"], k)
      mtp_ces.append(cross_entropy(aux["mtp_logits"][k - 1], t_k, w_k)[0])
    mtp = sum(mtp_ces) / depth
    loss = loss + mtp_weight * mtp
    metrics["mtp"] = mtp
  else:
    metrics["mtp"] = jnp.zeros((), jnp.float32)
  balance = aux.get("balance_loss", jnp.zeros((), jnp.float32))
  loss = loss + balance_weight * balance
  metrics["balance"] = balance
  weights = (expert_balance_weight, device_balance_weight, comm_balance_weight)
  if "v2_balance" in aux:
    for (key, name), weight in zip(V2_METRICS, weights):
      per_layer = aux["v2_balance"][key]
      total = per_layer.sum()
      loss = loss + weight * total
      metrics[name] = total
      metrics[f"{name}_per_layer"] = per_layer
    if "device_tokens" in aux["v2_balance"]:   # [layers, D] per sequence
      metrics["device_tokens_per_layer"] = aux["v2_balance"]["device_tokens"]
  elif any(weights):
    raise ValueError("V2 balance weights > 0 need the model's V2 losses (aux['v2_balance']): "
                     "build it with Transformer(cfg, balance_devices=D, "
                     "balance_max_devices=M).")
  metrics["loss"] = loss
  return loss, metrics
