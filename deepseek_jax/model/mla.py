"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1, V3 report eqs. 1-11).

Keys and values are not projected per head from h; they are rebuilt from one
low-rank latent per token, which is all an inference cache has to keep:

  c_kv = RMSNorm(W_dkv h)                       [kv_lora_rank]        (eq. 1)
  k_C  = W_uk c_kv,  v_C = W_uv c_kv            [heads, d_nope / d_v] (eqs. 2, 5)
  k_R  = RoPE(W_kr h)                           [d_rope], one per token, shared
                                                 by all heads          (eq. 3)
  c_q  = RMSNorm(W_dq h);  q_C = W_uq c_q;  q_R = RoPE(W_qr c_q)       (eqs. 6-8)
  o_i  = softmax((q_C,i . k_C,i + q_R,i . k_R) * scale) v_C,i          (eq. 10)
  u    = W_o [o_1; ...; o_heads]                                       (eq. 11)

Weights follow the official names: `wq_a` (W_dq), `q_norm`, `wq_b` ([W_uq;
W_qr] per head) or `wq` when q_lora_rank = 0; `wkv_a` ([W_dkv; W_kr]),
`kv_norm`, `wkv_b` ([W_uk; W_uv] per head), `wo`.

Two paths compute the same attention (DESIGN.md §3):

  naive   (training, and prefilling an inference cache): K and V are
          materialised per head from c_kv and the rotary key is broadcast
          to every head (k = [k_C; k_R], dk = d_nope + d_rope = 192 for V3,
          dv = 128). Packed documents are handled with `segment_ids`: a
          query attends to a key only if both sit in the same segment and
          the key is not in the future. The softmax itself runs one of two
          ways (model/attention.py; `attention_mask` decides once per
          forward pass from the sequence length s):
            s <= cfg.attn_block_size (or 0): the [b, h, s, s] float32 scores
              plus an additive [b, 1, s, s] bias; with the gradient, about
              (2 + 1/h) x 4 b h s^2 bytes of temporaries (16 GiB per layer
              for one 4K row at h = 128, 1 TiB at 32K); fastest for short
              rows (on CPU up to about one block).
            s > cfg.attn_block_size: blockwise FlashAttention-2 with a
              recomputing backward: a few [b, h, block, block] float32 tiles
              plus linear buffers (the float32 dQ, per-row statistics),
              key blocks past each query block's diagonal skipped (half the
              FLOPs of the square): 0.5 GiB at 4K, 0.76 GiB at 8K for one
              row at h = 128, blocks of 256 (measured, compiled).
  absorb  (decoding from a cache, `mode="decode"`): the cache holds only
          c_kv and k_R per token (kv_lora_rank + qk_rope_head_dim values per
          layer: 576 for V3). W_uk is folded into the query and W_uv into the
          output, so per-head keys and values never exist:
            q_C . k_C = (W_uk^T q_C) . c_kv      scores over the latent
            o = W_uv (sum_t p_t c_kv,t)          values in the latent
          The new tokens' c_kv / k_R are written into the cache rows at their
          positions (a row's cache column = its token position) first, and a
          query at position p sees cache columns <= p (`decode_bias`).

`mode="prefill"` runs the naive path (either softmax) and also returns the
new tokens' c_kv and k_R for the cache; `mode="decode"` returns them too (the
caller writes them into its cache, see deepseek_jax/infer/cache.py).

DeepSeek Sparse Attention (V3.2, cfg.index_topk > 0; model/dsa.py): an
`indexer` submodule scores the allowed keys of each query from h and c_q
(both detached: the selection is not differentiable, and the indexer's own
loss must not train the rest) and every path keeps only its top-k, as a
mask on the scores (naive, blockwise or absorbed; the cache also keeps the
indexer's key per token, "k_index"). With cfg.dsa_stage "warmup" / "sparse"
the training forward returns (output, the indexer's KL loss for the layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import dsa
from deepseek_jax.model.attention import NEG_INF, AttentionMask, causal_attention
from deepseek_jax.model.layers import Einsum, RMSNorm
from deepseek_jax.model.rope import apply_rope

def decode_bias(positions: jax.Array, cache_len: int) -> jax.Array:
  """Additive mask [batch, 1, t, cache_len] for queries at `positions` [b, t]
  over a cache whose column j holds the token at position j: 0 where
  j <= the query's position, a large negative number elsewhere."""
  cols = jnp.arange(cache_len, dtype=positions.dtype)
  allowed = cols[None, None, :] <= positions[:, :, None]
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buf [b, T, ...] with new [b, t, ...] written at columns start[b] ... + t."""
  def one(row, cols, i):
    return jax.lax.dynamic_update_slice_in_dim(row, cols.astype(row.dtype), i, axis=0)
  return jax.vmap(one)(buf, new, start)


class MLA(nn.Module):
  """mode: "train" (naive) | "prefill" (naive, returns the cache entries) |
  "decode" (absorbed, over `cache`)."""
  cfg: ModelConfig
  mode: str = "train"

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: AttentionMask | jax.Array, cache: dict | None = None):
    """x: [batch, seq, dim]; positions: [batch, seq]; mask: train/prefill an
    `AttentionMask` (attention.attention_mask), decode the additive
    [batch, 1, seq, T] `decode_bias`; cache (decode):
    {"c_kv": [b, T, kv_lora_rank], "k_rope": [b, T, d_rope]} (+ "k_index"
    [b, T, index_head_dim] with DSA).

    Returns the output [b, seq, dim]; in prefill/decode mode (output,
    {"c_kv", "k_rope"(, "k_index")} of the new tokens); in training with
    cfg.dsa_stage != "off" (output, the indexer loss, a float32 scalar)."""
    cfg = self.cfg
    h, d_nope, d_rope, d_v = (cfg.n_heads, cfg.qk_nope_head_dim,
                              cfg.qk_rope_head_dim, cfg.v_head_dim)
    # Heads-major layout [b, h, s, *] so the score/value contractions are plain
    # batched matmuls (measurably faster on XLA:CPU than seq-major einsums).
    if cfg.use_q_lora:
      c_q = Einsum(cfg, (cfg.dim, cfg.q_lora_rank), "bsd,dr->bsr", "attn", name="wq_a")(x)
      c_q = RMSNorm(cfg, name="q_norm")(c_q)
      q = Einsum(cfg, (cfg.q_lora_rank, h, d_nope + d_rope), "bsr,rhk->bhsk",
                 "attn", name="wq_b")(c_q)
    else:
      q = Einsum(cfg, (cfg.dim, h, d_nope + d_rope), "bsd,dhk->bhsk", "attn", name="wq")(x)
    q_rope = apply_rope(q[..., d_nope:], positions[:, None], cfg)  # [b, h, s, d_rope]
    q = jnp.concatenate([q[..., :d_nope], q_rope], axis=-1) * cfg.softmax_scale

    kv_a = Einsum(cfg, (cfg.dim, cfg.kv_lora_rank + d_rope), "bsd,dr->bsr",
                  "attn", name="wkv_a")(x)
    c_kv, k_rope = kv_a[..., :cfg.kv_lora_rank], kv_a[..., cfg.kv_lora_rank:]
    c_kv = RMSNorm(cfg, name="kv_norm")(c_kv)                    # [b, s, r_kv]
    k_rope = apply_rope(k_rope, positions, cfg)                  # [b, s, d_rope]
    wkv_b = Einsum(cfg, (cfg.kv_lora_rank, h, d_nope + d_v), "bsr,rhk->bhsk",
                   "attn", name="wkv_b")
    wo = Einsum(cfg, (h, d_v, cfg.dim), "bhsk,hkd->bsd", "attn", name="wo")
    new_entries = {"c_kv": c_kv, "k_rope": k_rope}
    if cfg.use_dsa:
      indexed = dsa.Indexer(cfg, name="indexer")(
          jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q), positions)
      new_entries["k_index"] = indexed[1]
    if self.mode == "decode":
      if cfg.use_dsa:
        mask = self._decode_selection(indexed, mask, cache, positions)
      return wo(self._absorbed(q, wkv_b, mask, cache, new_entries, positions)), new_entries
    kv = wkv_b(c_kv)
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]               # [b, h, s, *]
    # The single rotary key is shared by all heads: q_C.k_C + q_R.k_R in one dot.
    k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_rope[:, None], k_nope.shape[:3] + (d_rope,))], -1)

    if cfg.use_dsa:
      o, loss = self._sparse(q, k, v, indexed, mask)
    else:
      o, loss = causal_attention(cfg, q, k, v, mask), None       # [b, h, s, d_v]
    if self.mode == "prefill":
      return wo(o), new_entries
    return wo(o) if loss is None else (wo(o), loss)

  def _sparse(self, q, k, v, indexed, mask: AttentionMask):
    """DSA's training / prefill attention (module doc): (o [b, h, s, d_v],
    the indexer loss when training with cfg.dsa_stage != "off", else None).
    Without the loss, the selection is a mask on MLA's usual path (naive or
    blockwise, as `mask` says); the loss stages run the naive one."""
    cfg = self.cfg
    allowed = dsa.allowed_keys(mask.segment_ids)                 # causal, same segment
    stage = cfg.dsa_stage if self.mode == "train" else "off"
    if stage == "off":
      block = 0 if mask.bias is not None else cfg.attn_block_size
      selected = dsa.select(cfg, indexed, allowed, block)
      return causal_attention(cfg, q, k, v, mask, keep=selected), None
    scores = dsa.index_scores(cfg, *indexed)                     # [b, s, t]
    selected = dsa.select_topk(scores, allowed, cfg.index_topk)
    keep = allowed if stage == "warmup" else selected
    o, probs = dsa.attention_with_probs(q, k, v, dsa.selection_bias(keep), cfg.dtype)
    kl = dsa.indexer_kl(scores, probs, keep)
    return o, dsa.indexer_loss(kl, mask.segment_ids != 0)

  def _decode_selection(self, indexed, bias, cache, positions):
    """decode_bias [b, 1, t, T] restricted to the indexer's top-k of the
    cached keys (the new tokens' keys written at their columns first)."""
    q_i, k_new, w = indexed
    keys = write_rows(cache["k_index"], k_new, positions[:, 0])   # [b, T, D]
    scores = dsa.index_scores(self.cfg, q_i, keys, w)             # [b, t, T]
    selected = dsa.select_topk(scores, bias[:, 0] == 0.0, self.cfg.index_topk)
    return dsa.selection_bias(selected)

  def _absorbed(self, q, wkv_b, bias, cache, new, positions):
    """Attention over the latent cache; q [b, h, t, nope + rope] (scaled)."""
    cfg = self.cfg
    d_nope = cfg.qk_nope_head_dim
    start = positions[:, 0]
    c_kv = write_rows(cache["c_kv"], new["c_kv"], start)          # [b, T, r]
    k_rope = write_rows(cache["k_rope"], new["k_rope"], start)    # [b, T, d_rope]
    w = wkv_b(None, return_kernel=True)                           # [r, h, nope + v]
    q_latent = jnp.einsum("bhtn,rhn->bhtr", q[..., :d_nope], w[..., :d_nope])
    scores = (jnp.einsum("bhtr,bTr->bhtT", q_latent, c_kv.astype(q.dtype))
              + jnp.einsum("bhtk,bTk->bhtT", q[..., d_nope:], k_rope.astype(q.dtype)))
    scores = scores.astype(jnp.float32) + bias
    p = jnp.exp(scores - scores.max(-1, keepdims=True))
    o_latent = jnp.einsum("bhtT,bTr->bhtr", p.astype(q.dtype), c_kv.astype(q.dtype))
    o_latent = o_latent / p.sum(-1, keepdims=True).astype(q.dtype)
    return jnp.einsum("bhtr,rhv->bhtv", o_latent, w[..., d_nope:])   # [b, h, t, v]
