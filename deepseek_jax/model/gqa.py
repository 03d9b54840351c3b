"""Grouped-query attention: the dense decoders' attention (Llama, Qwen2,
DeepSeek LLM), selected by `ModelConfig.attention = "gqa"`.

  q = W_q h (+ b_q)   [n_heads, head_dim]
  k = W_k h (+ b_k)   [n_kv_heads, head_dim]      v = W_v h (+ b_v)   (same)
  q, k rotated over the whole head, halves (x_j, x_{j + d/2}) (model/rope.py)
  o_i = softmax(q_i . k_g(i) * scale) v_g(i),  g(i) = i // (n_heads / n_kv_heads)
  u   = W_o [o_1; ...; o_heads]                   (no bias, as in Llama / Qwen2)

Weights: `wq` [dim, n_heads, head_dim], `wk` / `wv` [dim, n_kv_heads,
head_dim], `wo` [n_heads, head_dim, dim]; with cfg.attention_bias each of
wq / wk / wv also holds `bias` [heads, head_dim] (Qwen2).

The modes are MLA's (model/mla.py), with the same inputs and mask:
  train / prefill  keys and values repeated to every query head of their group
                   (HF's `repeat_kv`), then the shared causal, same-document
                   softmax (model/attention.py: naive below
                   cfg.attn_block_size, blockwise above); prefill also returns
                   the new tokens' rotated keys and values.
  decode           the cache holds per-kv-head keys (after RoPE) and values,
                   {"k", "v": [b, T, n_kv_heads, head_dim]}; the new tokens'
                   are written at their positions first, and a query at
                   position p sees columns <= p (`decode_bias`). Queries are
                   grouped [b, kv, group, t, d] so the cache is never repeated.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.attention import AttentionMask, causal_attention
from deepseek_jax.model.layers import Einsum
from deepseek_jax.model.mla import write_rows
from deepseek_jax.model.rope import apply_rope


class GQA(nn.Module):
  """mode: "train" | "prefill" (returns the cache entries) | "decode" (over
  `cache`); the interface of model/mla.py's MLA."""
  cfg: ModelConfig
  mode: str = "train"

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: AttentionMask | jax.Array, cache: dict | None = None):
    """x: [batch, seq, dim]; positions: [batch, seq]; mask: an AttentionMask
    (train / prefill) or the additive [batch, 1, seq, T] decode_bias;
    cache (decode): {"k", "v": [b, T, n_kv_heads, head_dim]}.

    Returns the output [b, seq, dim]; in prefill/decode mode (output,
    {"k", "v": [b, seq, n_kv_heads, head_dim]} of the new tokens)."""
    cfg = self.cfg
    h, kv, d = cfg.n_heads, cfg.kv_heads, cfg.gqa_head_dim
    bias = cfg.attention_bias

    def proj(heads, name):
      return Einsum(cfg, (cfg.dim, heads, d), "bsd,dhk->bhsk", "attn", bias=bias,
                    name=name)(x)                                # [b, heads, s, d]
    q = apply_rope(proj(h, "wq"), positions[:, None], cfg) * cfg.softmax_scale
    k = apply_rope(proj(kv, "wk"), positions[:, None], cfg)
    v = proj(kv, "wv")
    wo = Einsum(cfg, (h, d, cfg.dim), "bhsk,hkd->bsd", "attn", name="wo")
    new_entries = {"k": jnp.swapaxes(k, 1, 2), "v": jnp.swapaxes(v, 1, 2)}  # [b, s, kv, d]
    if self.mode == "decode":
      return wo(self._cached(q, mask, cache, new_entries, positions)), new_entries
    group = h // kv
    o = causal_attention(cfg, q, jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1),
                         mask)                                   # [b, h, s, d]
    if self.mode == "prefill":
      return wo(o), new_entries
    return wo(o)

  def _cached(self, q, bias, cache, new, positions):
    """Attention over the per-kv-head cache; q [b, h, t, d] (scaled, rotated)."""
    cfg = self.cfg
    b, h, t, d = q.shape
    kv = cfg.kv_heads
    start = positions[:, 0]
    k = write_rows(cache["k"], new["k"], start).astype(q.dtype)   # [b, T, kv, d]
    v = write_rows(cache["v"], new["v"], start).astype(q.dtype)
    qg = q.reshape(b, kv, h // kv, t, d)
    scores = jnp.einsum("bkgtd,bTkd->bkgtT", qg, k).astype(jnp.float32) + bias[:, None]
    p = jnp.exp(scores - scores.max(-1, keepdims=True))
    o = jnp.einsum("bkgtT,bTkd->bkgtd", p.astype(q.dtype), v)
    o = o / p.sum(-1, keepdims=True).astype(q.dtype)
    return o.reshape(b, h, t, d)
