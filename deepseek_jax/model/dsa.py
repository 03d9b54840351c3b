"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer, top-k
token selection, and the indexer's training loss.

The indexer scores every earlier token s for a query token t cheaply, and MLA
then attends only to the `index_topk` best (model/mla.py):

  q_j   = W_qI c_q          [index_n_heads, index_head_dim]  (c_q: MLA's
                                                               query latent)
  k     = LayerNorm(W_kI h)  [index_head_dim], one key per token, shared by
                                                               every head
  RoPE on the first qk_rope_head_dim channels of q_j and k, rotating the two
  halves (x_i, x_{i + d/2}) of that part: NOT MLA's interleaved pairs
  w_j   = (W_w h)_j * index_n_heads^-0.5                      (float32)
  I_ts  = sum_j w_tj * ReLU(q_tj . k_s * index_head_dim^-0.5)
  S_t   = the index_topk tokens s allowed for t (causal, same segment) with
          the largest I_ts (all of them when fewer are allowed)

Weights (`indexer/...`): `wq_b` [q_lora_rank, index_n_heads, index_head_dim]
(W_qI), `wk_index` [dim, index_head_dim] (W_kI), `k_norm` {scale, bias}
[index_head_dim], `weights_proj` [dim, index_n_heads] (W_w) (HF:
self_attn.indexer.{wq_b, wk, k_norm, weights_proj}). The published FP8
scoring and Hadamard rotation of the keys and queries change no score (the
rotation is orthogonal) beyond rounding, so they are left out, as in
transformers.

Training (the V3.2 report's continued pre-training): the target is the main
attention's probabilities summed over its heads and L1-normalised over the keys,
p_t = sum_h A_h,t / ||sum_h A_h,t||_1, and the indexer's loss
L^I = sum_t KL(p_t || softmax(I_t)): over every allowed key in the dense
warm-up (attention dense, only the indexer trained), over S_t in the sparse
stage (p and the softmax both restricted to S_t), the indexer's inputs
detached so that the language-modelling loss trains the model and L^I only
the indexer (`indexer_kl`, `ModelConfig.dsa_stage`).

Memory: the selection is computed a query block at a time
(cfg.attn_block_size; [b, index_n_heads, block, t] float32 scores) and MLA
reads it as a bool [b, s, t] mask on either of its softmax paths (naive,
or blockwise one tile at a time): beyond MLA's own, DSA adds that mask,
O(s^2) bytes (16 MiB per row at 4K). The loss stages (`indexer_kl`) need
the whole [b, s, t] scores and the heads' probabilities, so they run the
naive path. A gathered top-k kernel (each query reading only its k keys'
latents) is what FLOPs at long context need; this computes the dense
scores and masks them, as transformers' eager path does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.attention import NEG_INF
from deepseek_jax.model.layers import Einsum, dtype_of
from deepseek_jax.model.rope import rope_frequencies

LAYER_NORM_EPS = 1e-6     # the indexer key's LayerNorm (official and HF code)


def rope_halves(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x [..., index_head_dim] with RoPE on its first qk_rope_head_dim channels,
  channel i rotated with channel i + d_rope/2 (MLA's frequencies, YaRN
  included); the rest unchanged. positions broadcast to x.shape[:-1]."""
  d_rope = cfg.qk_rope_head_dim
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  first, second = jnp.split(x[..., :d_rope].astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
  return jnp.concatenate([rotated.astype(x.dtype), x[..., d_rope:]], axis=-1)


class LayerNorm(nn.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, pdt = x.shape[-1], dtype_of(self.cfg.param_dtype)
    scale = self.param("scale", nn.initializers.ones, (d,), pdt)
    bias = self.param("bias", nn.initializers.zeros, (d,), pdt)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.cfg.dtype)


class Indexer(nn.Module):
  """The lightning indexer's projections (module doc)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, c_q: jax.Array, positions: jax.Array):
    """x [b, s, dim] (the attention's input), c_q [b, s, q_lora_rank] ->
    (q [b, H, s, D] rotated, k [b, s, D] rotated: the shared keys, what a
    decode cache keeps, w [b, H, s] float32 head weights, H^-0.5 folded in)."""
    cfg = self.cfg
    h, d = cfg.index_n_heads, cfg.index_head_dim
    q = Einsum(cfg, (cfg.q_lora_rank, h, d), "bsr,rhk->bhsk", name="wq_b")(c_q)
    q = rope_halves(q, positions[:, None], cfg)
    k = Einsum(cfg, (cfg.dim, d), "bsd,dk->bsk", name="wk_index")(x)
    k = rope_halves(LayerNorm(cfg, name="k_norm")(k), positions, cfg)
    w = Einsum(cfg.replace(dtype="float32"), (cfg.dim, h), "bsd,dh->bhs",
               name="weights_proj")(x.astype(jnp.float32))
    return q, k, w * h ** -0.5


def index_scores(cfg: ModelConfig, q: jax.Array, k: jax.Array, w: jax.Array) -> jax.Array:
  """I [b, s, t] float32 (module doc) from the Indexer's q [b, H, s, D],
  keys k [b, t, D] and weights w [b, H, s]."""
  dots = jnp.einsum("bhsd,btd->bhst", q, k.astype(q.dtype),
                    preferred_element_type=jnp.float32)
  per_head = jax.nn.relu(dots * cfg.index_head_dim ** -0.5)
  return jnp.einsum("bhs,bhst->bst", w, per_head)


def allowed_keys(segment_ids: jax.Array) -> jax.Array:
  """bool [b, s, s]: key j allowed for query i (j <= i, the same segment):
  what the indexer selects among (attention.attention_bias's pattern)."""
  s = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def select(cfg: ModelConfig, indexed, allowed: jax.Array, block: int = 0) -> jax.Array:
  """bool [b, s, t]: each query's top-k allowed keys (`select_topk` of
  `index_scores`) from the Indexer's (q, k, w) and allowed [b, s, t]. With
  0 < block < s the queries go `block` at a time (lax.map), so the
  [b, index_n_heads, block, t] float32 scores are the only temporaries
  beyond the result (the same selection)."""
  q, k, w = indexed
  b, h, s, d = q.shape
  if not 0 < block < s:
    return select_topk(index_scores(cfg, q, k, w), allowed, cfg.index_topk)
  n, pad = -(-s // block), -s % block
  q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, n, block, d)
  w = jnp.pad(w, ((0, 0), (0, 0), (0, pad))).reshape(b, h, n, block)
  allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0))).reshape(b, n, block, -1)

  def one(args):
    q_i, w_i, a_i = args
    return select_topk(index_scores(cfg, q_i, k, w_i), a_i, cfg.index_topk)

  keep = jax.lax.map(one, (jnp.moveaxis(q, 2, 0), jnp.moveaxis(w, 2, 0),
                           jnp.moveaxis(allowed, 1, 0)))            # [n, b, block, t]
  return jnp.moveaxis(keep, 0, 1).reshape(b, n * block, -1)[:, :s]


def select_topk(scores: jax.Array, allowed: jax.Array, k: int) -> jax.Array:
  """bool [b, s, t]: for each query the `k` allowed keys with the largest
  scores (every allowed key when fewer are); scores [b, s, t], allowed
  bool [b, s, t]. Ties: the lower key index first (lax.top_k)."""
  k = min(k, scores.shape[-1])
  masked = jnp.where(allowed, scores, -jnp.inf)
  _, idx = jax.lax.top_k(masked, k)                                 # [b, s, k]
  b, s, _ = idx.shape
  chosen = jnp.zeros(scores.shape, bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], idx].set(True)
  return chosen & allowed


def selection_bias(selected: jax.Array) -> jax.Array:
  """Additive [b, 1, s, t] float32 mask: 0 at selected keys, NEG_INF elsewhere."""
  return jnp.where(selected, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def indexer_kl(scores: jax.Array, attn_probs: jax.Array, keep: jax.Array) -> jax.Array:
  """Per-query KL(p_t || softmax(I_t)) [b, s] over the keys `keep` [b, s, t]
  (module doc): p = attn_probs [b, s, t] (the main attention's probabilities
  summed, or averaged, over heads) restricted to `keep` and L1-normalised;
  the softmax of scores [b, s, t] restricted to `keep`. The target carries
  no gradient. A row keeping no key (or no mass) gives 0."""
  p = jnp.where(keep, jax.lax.stop_gradient(attn_probs).astype(jnp.float32), 0.0)
  total = p.sum(-1, keepdims=True)
  p = p / jnp.where(total > 0, total, 1.0)
  log_q = jax.nn.log_softmax(jnp.where(keep, scores, NEG_INF), axis=-1)
  return jnp.sum(jax.scipy.special.xlogy(p, p) - p * jnp.where(keep, log_q, 0.0), axis=-1)


def indexer_loss(kl: jax.Array, valid: jax.Array) -> jax.Array:
  """The report's L^I per token: the mean of `kl` [b, s] over valid queries
  (segment != 0), so that its weight does not scale with the batch."""
  valid = valid.astype(jnp.float32)
  return jnp.sum(kl * valid) / jnp.maximum(valid.sum(), 1.0)


def attention_with_probs(q, k, v, bias, dtype):
  """The naive softmax attention (q [b, h, s, dk] scaled, k [b, h, t, dk],
  v [b, h, t, dv], additive bias [b, 1, s, t]) -> (o [b, h, s, dv], the
  probabilities averaged over heads [b, s, t] float32): the indexer's
  training target."""
  scores = jnp.einsum("bhsk,bhtk->bhst", q, k).astype(jnp.float32) + bias
  p = jax.nn.softmax(scores, axis=-1)
  o = jnp.einsum("bhst,bhtk->bhsk", p.astype(dtype), v)
  return o, p.mean(1)
