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

DeepSeek-V3.2's indexer loss (a DSA model with dsa_stage != "off";
model/dsa.py), for the stages of the V3.2 report's continued pre-training:

  L += w_I L^I,   L^I = sum_layers mean_{valid tokens t} KL(p_t || softmax(I_t))

arrives summed over layers in `aux["indexer_loss"]`, each layer's KL already
averaged over the batch's non-padding tokens (the LM loss's CE is a mean over
target tokens likewise); w_I = TrainConfig.indexer_loss_weight. Its gradient
reaches only the indexer (its inputs and the KL target are detached).

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
  share_aux(aux, share, token_share)  the model's balance losses (means over
        the batch's sequences) times its share of the whole batch's
        sequences, the indexer loss (a mean over its tokens) times its share
        of the whole batch's non-padding tokens (`token_share`);
  combine(terms, aux, weights)  the weighted sum, linear in both: summed
        over micro-batches and stages, the pieces give the whole batch's loss.

`total_loss` is combine(head_terms(...), aux) on one batch.

Training hands the loss hidden states, not logits. The model's training
forward returns the final normalised hidden state h [b, s, d] and the MTP
modules' [D, b, s, d] (`Transformer(..., return_hidden=True)`,
`stages.head(..., hidden=True)`), and `head_terms(h, mtp_h, batch, kernel=W)`
applies the output head W [d, V] inside the cross-entropy,
`chunked_cross_entropy`: a scan over vocabulary chunks of `VOCAB_CHUNK`
columns with an online logsumexp, so the [tokens, V] float32 logits (and
their gradient) never exist at once: per chunk [tokens, chunk]. The numbers
are those of cross_entropy(h @ W) up to float summation order, and exactly
that computation when V fits in one chunk. Given logits (no kernel),
head_terms is the cross-entropy over the full vocabulary, as before.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax import config
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.parallel.rules import axes_size, constrain, current_rules, mesh_axes_of

# Vocabulary columns per step (per vocabulary shard) of chunked_cross_entropy:
# V3's 129,280 in 16 steps; per step [tokens, chunk] float32 logits, their
# gradient and the kernel's [d, chunk] slice.
VOCAB_CHUNK = config.VOCAB_CHUNK   # read at call time (tests patch it here)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  total: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted mean token cross-entropy.

  logits [b, s, V] (any float; log-softmax in float32), targets int [b, s],
  weights [b, s]. Returns (CE, sum of weights): CE is the weighted sum
  divided by `total` (default: the sum of weights, i.e. the mean). A batch
  without any weight gives 0, not NaN.

  The derivative is written out (`_token_nll`'s custom VJP): d logits =
  (softmax - onehot(target)) x the token's weight, one pass over [b, s, V]
  (autodiff of log_softmax and the masked sum made two, one of them a
  transposed copy: the CPU bench step's dearest op).
  """
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  scale = weights / jnp.maximum(count if total is None else total, 1e-9)
  return _token_nll(logits, targets, scale), count


def _picked(vocab: int, targets):
  # A mask over the vocabulary, not a gather (take_along_axis): the same
  # number, and with the vocabulary split over `tensor` (fsdp_tp) inside the
  # pipeline's shard_map, XLA's SPMD partitioner aborts on the gather
  # (jax 0.10.2: spmd_partitioner_util "Check failed ... device_groups").
  return jnp.arange(vocab) == targets[..., None]


def _nll_parts(logits, targets):
  z = logits.astype(jnp.float32)
  m = jax.lax.stop_gradient(z.max(-1, keepdims=True))
  lse = (m + jnp.log(jnp.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  return lse, lse - jnp.where(_picked(z.shape[-1], targets), z, 0.0).sum(-1)


@jax.custom_vjp
def _token_nll(logits, targets, scale):
  """sum over tokens of scale[t] x (logsumexp(logits[t]) - logits[t, target])."""
  return (_nll_parts(logits, targets)[1] * scale).sum()


def _token_nll_fwd(logits, targets, scale):
  lse, nll = _nll_parts(logits, targets)
  return (nll * scale).sum(), (logits, targets, scale, lse, nll)


def _token_nll_bwd(res, g):
  logits, targets, scale, lse, nll = res
  z = logits.astype(jnp.float32)
  dz = (jnp.exp(z - lse[..., None]) - _picked(z.shape[-1], targets)) * (scale * g)[..., None]
  return dz.astype(logits.dtype), None, nll * g


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def _weighted_mean(nll, weights, total):
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  return (nll * weights).sum() / jnp.maximum(count if total is None else total, 1e-9), count


def vocab_shards(vocab: int) -> int:
  """Devices the vocabulary is split over in the enclosing `parallel.activate`
  (its rules' `vocab` axes: `tensor` in fsdp_tp and ep_fsdp); 1 outside one,
  or when they do not divide `vocab` (the rules then leave it whole)."""
  rules = current_rules()
  if rules is None:
    return 1
  shards = axes_size(dict(jax.sharding.get_abstract_mesh().shape), mesh_axes_of("vocab", rules))
  return shards if vocab % shards == 0 else 1


def chunked_cross_entropy(h: jax.Array, kernel: jax.Array, targets: jax.Array,
                          weights: jax.Array, total: jax.Array | None = None, *,
                          chunk: int = VOCAB_CHUNK, shards: int | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """cross_entropy(h @ kernel, targets, weights, total), without the logits.

  h [..., d] (e.g. [b, s, d] or [N, d]), kernel [d, V], targets and weights
  [...]. The vocabulary is split as [shards, V / shards] (`shards`, default
  `vocab_shards(V)`: the mesh's split of the head's vocab axis, so each
  device scans its own columns and nothing is gathered); a `lax.scan` walks
  the inner axis `chunk` columns at a time, carrying per token
    m = the running max (a constant for autodiff: lse = m + log sum e^(z-m)
        holds for any m, so its gradient is softmax's without m's term),
    l = sum_j exp(z_j - m) over the columns seen, rescaled when m moves,
    z_t = the target's logit, a masked sum (not a gather: see cross_entropy),
  and nll = m + log l - z_t. Logits are float32. The last chunk is shifted
  back to end at V (dynamic_slice clamps) and masks the columns it repeats,
  so V need not be a multiple of `chunk`. With V / shards <= chunk this is
  cross_entropy(h @ kernel) itself.

  The step is under jax.checkpoint (not a custom_vjp): autodiff saves the
  three [...] carries per step and recomputes the chunk's logits in the
  backward pass, the same FLOPs as a hand-written backward (4 matmuls of
  the head instead of 3), and the rule stays correct under shard_map /
  sharded operands without per-axis bookkeeping. XLA accumulates the
  kernel's gradient slice by slice in one [d, V] buffer. Peak extra memory:
  a few [..., chunk] float32 arrays and the [d, chunk] kernel slice and its
  gradient (compiled value_and_grad, V3's head [7168, 129280] float32 on
  4096 tokens: 0.67 GiB of temporaries with chunk 8192, 0.39 GiB with 4096,
  against 3.95 GiB for the full logits; XLA:CPU, jax 0.10.2).
  """
  d, vocab = kernel.shape
  shards = vocab_shards(vocab) if shards is None else shards
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1.")
  if vocab % shards:
    raise ValueError(f"shards={shards} must divide the vocabulary ({vocab}).")
  local = vocab // shards
  if local <= chunk:
    logits = jnp.einsum("...d,dv->...v", h.astype(jnp.float32), kernel.astype(jnp.float32))
    return cross_entropy(logits, targets, weights, total)
  h = h.astype(jnp.float32)
  kernel = kernel.astype(jnp.float32)
  # [d, V] as [d, shards, V/shards] only when split: a unit axis makes XLA
  # copy the kernel into another layout.
  blocks = kernel.reshape(d, shards, local) if shards > 1 else kernel
  offsets = jnp.arange(shards)[:, None] * local                   # [shards, 1]
  n_steps = -(-local // chunk)

  def step(carry, i):
    m, l, z_t = carry
    start = jnp.minimum(i * chunk, local - chunk)
    w = jax.lax.dynamic_slice_in_dim(blocks, start, chunk, axis=blocks.ndim - 1)
    if shards > 1:
      z = jnp.einsum("...d,dkc->...kc", h, w)                      # [..., shards, chunk]
      if z.ndim == 4:
        z = constrain(z, ("batch", "seq", "vocab", None))
    else:
      z = jnp.einsum("...d,dc->...c", h, w)[..., None, :]          # [..., 1, chunk]
    column = start + jnp.arange(chunk)
    new = column >= i * chunk                  # the last chunk's repeated columns: out
    # Masks as [chunk] vectors and products, not selects against a broadcast
    # constant: XLA would hoist that [..., chunk] constant out of the loop.
    z_new = z + jnp.where(new, 0.0, -jnp.inf)
    m_next = jnp.maximum(m, jax.lax.stop_gradient(z_new.max((-2, -1))))
    l = l * jnp.exp(m - m_next) + jnp.exp(z_new - m_next[..., None, None]).sum((-2, -1))
    picked = new & (offsets + column == targets[..., None, None])
    return (m_next, l, z_t + (z * picked).sum((-2, -1))), None

  lead = h.shape[:-1]
  init = (jnp.full(lead, -jnp.inf, jnp.float32), jnp.zeros(lead, jnp.float32),
          jnp.zeros(lead, jnp.float32))
  (m, l, z_t), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init,
                                jnp.arange(n_steps))
  return _weighted_mean(m + jnp.log(l) - z_t, weights, total)


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


def token_share(batch: dict[str, jax.Array], totals: dict[str, jax.Array]) -> jax.Array:
  """This batch's non-padding tokens over the whole batch's (`batch_totals`)."""
  tokens = (batch["segment_ids"] != 0).sum().astype(jnp.float32)
  return tokens / jnp.maximum(totals["tokens"], 1.0)


def share_aux(aux: dict[str, Any], share: jax.Array,
              token_share: jax.Array | None = None) -> dict[str, Any]:
  """The model's aux with its loss terms (balance_loss and v2_balance: means
  over the batch's sequences) times `share`, and indexer_loss (a mean over
  the batch's non-padding tokens) times `token_share` (None: `share`, the
  same when every row holds as many tokens); loads and logits unchanged."""
  out = dict(aux, balance_loss=aux["balance_loss"] * share)
  if "v2_balance" in aux:
    out["v2_balance"] = jax.tree.map(lambda v: v * share, aux["v2_balance"])
  if "indexer_loss" in aux:
    out["indexer_loss"] = aux["indexer_loss"] * (share if token_share is None else token_share)
  return out


def head_terms(logits: jax.Array, mtp_logits: jax.Array | None, batch: dict[str, jax.Array],
               totals: dict[str, jax.Array] | None = None, *, kernel: jax.Array | None = None,
               chunk: int | None = None) -> dict[str, jax.Array]:
  """ce (main head), mtp (the mean over the D depths of their CE; 0 without
  MTP logits) and target_tokens (sum of loss_mask) of `batch`, CE divided by
  totals' counts (`batch_totals` of the whole batch; default this batch's).

  With `kernel` (the output head [d, V]), `logits` and `mtp_logits` are the
  hidden states the head reads ([b, s, d] and [D, b, s, d]) and every CE is
  `chunked_cross_entropy` (chunk: default VOCAB_CHUNK): the same terms
  without the [b, s, V] logits."""
  chunk = VOCAB_CHUNK if chunk is None else chunk

  def ce_of(outputs, targets, weights, total):
    if kernel is None:
      return cross_entropy(outputs, targets, weights, total)
    return chunked_cross_entropy(outputs, kernel, targets, weights, total, chunk=chunk)
  total = None if totals is None else totals["target_tokens"]
  ce, n_targets = ce_of(logits, batch["targets"], batch["loss_mask"], total)
  terms = {"ce": ce, "target_tokens": n_targets, "mtp": jnp.zeros((), jnp.float32)}
  if mtp_logits is not None:
    depth = mtp_logits.shape[0]
    mtp_ces = []
    for k in range(1, depth + 1):
      t_k, w_k = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], k)
      total_k = None if totals is None else totals["mtp_tokens"][k - 1]
      mtp_ces.append(ce_of(mtp_logits[k - 1], t_k, w_k, total_k)[0])
    terms["mtp"] = sum(mtp_ces) / depth
  return terms


V2_METRICS = (("expert", "balance_expert"), ("device", "balance_device"),
              ("comm", "balance_comm"))


def combine(terms: dict[str, jax.Array], aux: dict[str, Any], *, mtp_weight,
            balance_weight: float, expert_balance_weight: float = 0.0,
            device_balance_weight: float = 0.0, comm_balance_weight: float = 0.0,
            indexer_loss_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce + lambda mtp + alpha balance (+ alpha1..3 times V2's layer sums)
  (+ w_I indexer_loss when aux has it): (L, metrics), linear in `terms`
  (head_terms) and aux's loss terms.

  metrics: loss (L), ce, mtp (before lambda), balance (L_bal before alpha),
  target_tokens. When aux has "v2_balance" (V2's losses per MoE layer), the
  three V2 weights scale their layer sums into L, and metrics add
  balance_expert, balance_device, balance_comm (layer sums before alpha), the
  per-layer values balance_expert_per_layer etc. ([layers] arrays), and
  device_tokens_per_layer ([layers, D]: tokens per sequence that send to
  each device). With aux["indexer_loss"] (a DSA model training its indexer)
  metrics add indexer_loss (L^I, before w_I). mtp_weight may be traced
  (train/step.py's schedule).
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
  if "indexer_loss" in aux:
    loss = loss + indexer_loss_weight * aux["indexer_loss"]
    metrics["indexer_loss"] = aux["indexer_loss"]
  metrics["loss"] = loss
  return loss, metrics


def check_dsa_training(cfg: config.ModelConfig, train_cfg: Any) -> None:
  """ValueError (one line) for a DSA stage that would train nothing: the
  dense warm-up trains only the indexer, by its loss, so it needs
  train_cfg.indexer_loss_weight > 0."""
  weight = train_cfg.indexer_loss_weight
  if cfg.use_dsa and cfg.dsa_stage == "warmup" and not weight > 0:
    raise ValueError(f"indexer_loss_weight={weight}: model.dsa_stage='warmup' trains only the "
                     "indexer, by its loss; set indexer_loss_weight > 0 (1.0 is usual) or "
                     "model.dsa_stage='sparse'.")


def total_loss(logits: jax.Array, aux: dict[str, Any], batch: dict[str, jax.Array], *,
               mtp_weight, balance_weight: float, expert_balance_weight: float = 0.0,
               device_balance_weight: float = 0.0, comm_balance_weight: float = 0.0,
               indexer_loss_weight: float = 1.0, kernel: jax.Array | None = None,
               chunk: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (L, metrics) for one batch: `combine` of its `head_terms` and
  the model's aux (metrics: see combine). With `kernel`, `logits` is the
  final hidden state and the MTP terms read aux["mtp_hidden"] (head_terms'
  chunked path); else aux["mtp_logits"]."""
  mtp = aux.get("mtp_logits" if kernel is None else "mtp_hidden")
  return combine(head_terms(logits, mtp, batch, kernel=kernel, chunk=chunk), aux,
                 mtp_weight=mtp_weight, balance_weight=balance_weight,
                 expert_balance_weight=expert_balance_weight,
                 device_balance_weight=device_balance_weight,
                 comm_balance_weight=comm_balance_weight,
                 indexer_loss_weight=indexer_loss_weight)
