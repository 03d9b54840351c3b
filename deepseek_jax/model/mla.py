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

This is the "naive" path used for training: K and V are materialised per head.
Packed documents are handled with `segment_ids`: a query attends to a key only
if both sit in the same segment and the key is not in the future (an additive
bias built once per forward pass by `attention_bias`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import Einsum, RMSNorm
from deepseek_jax.model.rope import apply_rope

# Masked logits: large and finite so fully masked rows (never produced by
# `attention_bias`: the diagonal is always allowed) cannot turn into NaN.
_NEG_INF = -1e30


def attention_bias(segment_ids: jax.Array) -> jax.Array:
  """Additive causal, same-document mask [batch, 1, q, k] from segment ids.

  0 where query q may attend key k (same segment, k <= q), a large negative
  number elsewhere. Built once per forward pass and shared by all layers.
  """
  seq = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  allowed = (causal[None] & same_doc)[:, None]
  return jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)


class MLA(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array) -> jax.Array:
    """x: [batch, seq, dim]; positions: [batch, seq]; bias: [batch, 1, seq, seq]."""
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
    kv = Einsum(cfg, (cfg.kv_lora_rank, h, d_nope + d_v), "bsr,rhk->bhsk",
                "attn", name="wkv_b")(c_kv)
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]               # [b, h, s, *]
    # The single rotary key is shared by all heads: q_C.k_C + q_R.k_R in one dot.
    k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_rope[:, None], k_nope.shape[:3] + (d_rope,))], -1)

    scores = jnp.einsum("bhsk,bhtk->bhst", q, k).astype(jnp.float32) + bias
    # Softmax with the normalisation applied to the [b, h, s, d_v] output rather
    # than to the [b, h, s, s] probabilities: one pass fewer over the big array.
    p = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    o = jnp.einsum("bhst,bhtk->bhsk", p.astype(cfg.dtype), v)
    o = o / p.sum(-1, keepdims=True).astype(o.dtype)             # [b, h, s, d_v]
    return Einsum(cfg, (h, d_v, cfg.dim), "bhsk,hkd->bsd", "attn", name="wo")(o)
