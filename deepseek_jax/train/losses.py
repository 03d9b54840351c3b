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

The loss is built from additive pieces, so that a pipeline can compute it
per micro-batch and per stage (parallel/pipeline.py, wired by train/step.py)
and get the same number, not a mean of micro-batch means:

  head_terms(logits, mtp_logits, batch, totals)  CE and MTP CE as sums over
        the batch's tokens divided by the WHOLE batch's counts (`batch_totals`;
        by default this batch's own);
  share_aux(aux, share)  the model's balance losses (means over the batch's
        sequences) times its share of the whole batch's sequences;
  combine(terms, aux, weights)  the weighted sum, linear in both: summed
        over micro-batches and stages, the pieces give the whole batch's loss.

`total_loss` is combine(head_terms(...), aux) on one batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.model.mtp import shift_left


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  total: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted mean token cross-entropy.

  logits [b, s, V] (any float; log-softmax in float32), targets int [b, s],
  weights [b, s]. Returns (CE, sum of weights): CE is the weighted sum
  divided by `total` (default: the sum of weights, i.e. the mean). A batch
  without any weight gives 0, not NaN.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)       # [b, s, V]
  # A masked sum over the vocabulary, not a gather (take_along_axis): the same
  # number, and with the vocabulary split over `tensor` (fsdp_tp) inside the
  # pipeline's shard_map, XLA's SPMD partitioner aborts on the gather
  # (jax 0.10.2: spmd_partitioner_util "Check failed ... device_groups").
  picked = jnp.arange(logp.shape[-1]) == targets[..., None]
  nll = -jnp.where(picked, logp, 0.0).sum(-1)
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  return (nll * weights).sum() / jnp.maximum(count if total is None else total, 1e-9), count


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


def _sequences(batch: dict[str, jax.Array]) -> jax.Array:
  """Rows with at least one non-padding token: the balance losses' count."""
  return (batch["segment_ids"] != 0).any(-1).sum().astype(jnp.float32)


def batch_totals(batch: dict[str, jax.Array], mtp_depth: int) -> dict[str, jax.Array]:
  """The whole batch's denominators: target_tokens (sum of loss_mask),
  mtp_tokens [max(D, 1)] (MTP targets per depth), sequences (non-empty rows),
  tokens (non-padding inputs)."""
  mtp = [mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], k)[1].sum()
         for k in range(1, mtp_depth + 1)]
  return {"target_tokens": batch["loss_mask"].astype(jnp.float32).sum(),
          "mtp_tokens": jnp.stack(mtp) if mtp else jnp.zeros((1,), jnp.float32),
          "sequences": _sequences(batch),
          "tokens": (batch["segment_ids"] != 0).sum().astype(jnp.float32)}


def sequence_share(batch: dict[str, jax.Array], totals: dict[str, jax.Array]) -> jax.Array:
  """This batch's non-empty sequences over the whole batch's."""
  return _sequences(batch) / jnp.maximum(totals["sequences"], 1.0)


def share_aux(aux: dict[str, Any], share: jax.Array) -> dict[str, Any]:
  """The model's aux with its loss terms (balance_loss and v2_balance: means
  over the batch's sequences) times `share`; loads and logits unchanged."""
  out = dict(aux, balance_loss=aux["balance_loss"] * share)
  if "v2_balance" in aux:
    out["v2_balance"] = jax.tree.map(lambda v: v * share, aux["v2_balance"])
  return out


def head_terms(logits: jax.Array, mtp_logits: jax.Array | None, batch: dict[str, jax.Array],
               totals: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """ce (main head), mtp (the mean over the D depths of their CE; 0 without
  MTP logits) and target_tokens (sum of loss_mask) of `batch`, CE divided by
  totals' counts (`batch_totals` of the whole batch; default this batch's)."""
  total = None if totals is None else totals["target_tokens"]
  ce, n_targets = cross_entropy(logits, batch["targets"], batch["loss_mask"], total)
  terms = {"ce": ce, "target_tokens": n_targets, "mtp": jnp.zeros((), jnp.float32)}
  if mtp_logits is not None:
    depth = mtp_logits.shape[0]
    mtp_ces = []
    for k in range(1, depth + 1):
      t_k, w_k = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], k)
      total_k = None if totals is None else totals["mtp_tokens"][k - 1]
      mtp_ces.append(cross_entropy(mtp_logits[k - 1], t_k, w_k, total_k)[0])
    terms["mtp"] = sum(mtp_ces) / depth
  return terms


V2_METRICS = (("expert", "balance_expert"), ("device", "balance_device"),
              ("comm", "balance_comm"))


def combine(terms: dict[str, jax.Array], aux: dict[str, Any], *, mtp_weight,
            balance_weight: float, expert_balance_weight: float = 0.0,
            device_balance_weight: float = 0.0, comm_balance_weight: float = 0.0
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce + lambda mtp + alpha balance (+ alpha1..3 times V2's layer sums):
  (L, metrics), linear in `terms` (head_terms) and aux's loss terms.

  metrics: loss (L), ce, mtp (before lambda), balance (L_bal before alpha),
  target_tokens. When aux has "v2_balance" (V2's losses per MoE layer), the
  three V2 weights scale their layer sums into L, and metrics add
  balance_expert, balance_device, balance_comm (layer sums before alpha), the
  per-layer values balance_expert_per_layer etc. ([layers] arrays), and
  device_tokens_per_layer ([layers, D]: tokens per sequence that send to
  each device). mtp_weight may be traced (train/step.py's schedule).
  """
  loss = terms["ce"] + mtp_weight * terms["mtp"]
  metrics = {"ce": terms["ce"], "target_tokens": terms["target_tokens"], "mtp": terms["mtp"]}
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


def total_loss(logits: jax.Array, aux: dict[str, Any], batch: dict[str, jax.Array], *,
               mtp_weight, balance_weight: float, expert_balance_weight: float = 0.0,
               device_balance_weight: float = 0.0, comm_balance_weight: float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (L, metrics) for one batch: `combine` of its `head_terms` and
  the model's aux (metrics: see combine)."""
  return combine(head_terms(logits, aux.get("mtp_logits"), batch), aux,
                 mtp_weight=mtp_weight, balance_weight=balance_weight,
                 expert_balance_weight=expert_balance_weight,
                 device_balance_weight=device_balance_weight,
                 comm_balance_weight=comm_balance_weight)
