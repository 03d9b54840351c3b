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
if both sit in the same segment and the key is not in the future.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import Einsum, RMSNorm
from deepseek_jax.model.rope import apply_rope


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal, same-document mask [batch, 1, q, k] from segment ids [batch, seq]."""
  seq = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same_doc)[:, None]


class MLA(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [batch, seq, dim]; positions: [batch, seq]; mask: [batch, 1, seq, seq]."""
    cfg = self.cfg
    h, d_nope, d_rope, d_v = (cfg.n_heads, cfg.qk_nope_head_dim,
                              cfg.qk_rope_head_dim, cfg.v_head_dim)
    if cfg.use_q_lora:
      c_q = Einsum(cfg, (cfg.dim, cfg.q_lora_rank), "bsd,dr->bsr", name="wq_a")(x)
      c_q = RMSNorm(cfg, name="q_norm")(c_q)
      q = Einsum(cfg, (cfg.q_lora_rank, h, d_nope + d_rope), "bsr,rhk->bshk",
                 name="wq_b")(c_q)
    else:
      q = Einsum(cfg, (cfg.dim, h, d_nope + d_rope), "bsd,dhk->bshk", name="wq")(x)
    q_nope, q_rope = q[..., :d_nope], q[..., d_nope:]           # [b, s, h, *]
    q_rope = apply_rope(q_rope, positions, cfg)

    kv_a = Einsum(cfg, (cfg.dim, cfg.kv_lora_rank + d_rope), "bsd,dr->bsr",
                  name="wkv_a")(x)
    c_kv, k_rope = kv_a[..., :cfg.kv_lora_rank], kv_a[..., cfg.kv_lora_rank:]
    c_kv = RMSNorm(cfg, name="kv_norm")(c_kv)                    # [b, s, r_kv]
    k_rope = apply_rope(k_rope, positions, cfg)                  # [b, s, d_rope]
    kv = Einsum(cfg, (cfg.kv_lora_rank, h, d_nope + d_v), "bsr,rhk->bshk",
                name="wkv_b")(c_kv)
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]               # [b, s, h, *]

    scores = (jnp.einsum("bshk,bthk->bhst", q_nope, k_nope)
              + jnp.einsum("bshk,btk->bhst", q_rope, k_rope))    # [b, h, s, t]
    scores = scores.astype(jnp.float32) * cfg.softmax_scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    o = jnp.einsum("bhst,bthk->bshk", probs, v)                  # [b, s, h, d_v]
    return Einsum(cfg, (h, d_v, cfg.dim), "bshk,hkd->bsd", name="wo")(o)
