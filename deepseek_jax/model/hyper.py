"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4 sec. 2.2).

A V4 model carries `hc_mult` = n residual streams per token, x [b, s, n, d],
in place of one residual. Around each attention and each FFN sublayer a
`HyperConnection` reads all n streams (flattened, RMS-normalised without a
weight, float32) and a one-layer perceptron turns them into three mixings:

  [p~, q~, C~] = RMS(x_flat) W_fn           W_fn [n d, 2n + n^2]
  pre   = sigmoid(scale_0 p~ + base_p) + eps           [n]   collapse weights
  post  = 2 sigmoid(scale_1 q~ + base_q)               [n]   expand weights
  comb  = Sinkhorn(softmax_rows(scale_2 C~ + base_C) + eps)   [n, n]

The sublayer runs on the collapse u = sum_j pre_j x_j and its output o goes
back as  x'_k = post_k o + sum_j comb_jk x_j: the streams mix through a
doubly stochastic matrix (rows and columns sum to 1, `sinkhorn`), so the
residual path neither grows nor shrinks the streams' total. After the last
block `HyperHead` collapses the streams once more, with sigmoid weights of
the same form (no post / comb), before the final norm.

Parameters (HF names in brackets): `fn` [n d, (2 + n) n] (the transpose of
HF's [(2 + n) n, n d] `fn`), `base` [(2 + n) n], `scale` [3]; the head's
`fn` [n d, n] [hc_fn, transposed], `base` [n] [hc_base], `scale` [1]
[hc_scale]. Init as transformers: fn normal(init_std), base 0, scale 1.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import dtype_of, normal_init


def unweighted_rms(x: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def sinkhorn(m: jax.Array, iters: int, eps: float) -> jax.Array:
  """Sinkhorn-Knopp on positive matrices m [..., n, n]: columns normalised,
  then iters - 1 rounds of (rows, columns); eps in each denominator (as
  DeepSeek's kernel and transformers). The result is doubly stochastic up to
  the last round's row error."""
  def rows_then_columns(_, m):
    m = m / (m.sum(-1, keepdims=True) + eps)
    return m / (m.sum(-2, keepdims=True) + eps)
  m = m / (m.sum(-2, keepdims=True) + eps)
  return jax.lax.fori_loop(0, iters - 1, rows_then_columns, m)


def hc_merge(streams: jax.Array, out: jax.Array, post: jax.Array, comb: jax.Array
             ) -> jax.Array:
  """x'_k = post_k out + sum_j comb_jk x_j. streams [b, s, n, d], out
  [b, s, d], post [b, s, n], comb [b, s, n, n] (float32 mixings applied in
  the streams' dtype)."""
  dt = streams.dtype
  mixed = jnp.einsum("bsjk,bsjd->bskd", comb.astype(dt), streams)
  return post.astype(dt)[..., None] * out.astype(dt)[..., None, :] + mixed


class HyperConnection(nn.Module):
  """The mixings around one sublayer (module doc): streams [b, s, n, d] ->
  (post [b, s, n], comb [b, s, n, n], the collapse [b, s, d])."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, streams: jax.Array):
    cfg = self.cfg
    b, s, n, d = streams.shape
    pdt = dtype_of(cfg.param_dtype)
    fn = self.param("fn", normal_init(cfg), (n * d, (2 + n) * n), pdt)
    base = self.param("base", nn.initializers.zeros, ((2 + n) * n,), pdt)
    scale = self.param("scale", nn.initializers.ones, (3,), pdt)
    flat = unweighted_rms(streams.reshape(b, s, n * d), cfg.rms_norm_eps)
    mix = flat @ fn.astype(jnp.float32)
    base, scale = base.astype(jnp.float32), scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = mix[..., 2 * n:] * scale[2] + base[2 * n:]
    comb = jax.nn.softmax(comb.reshape(b, s, n, n), axis=-1) + cfg.hc_eps
    comb = sinkhorn(comb, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    collapsed = jnp.einsum("bsn,bsnd->bsd", pre, streams.astype(jnp.float32))
    return post, comb, collapsed.astype(streams.dtype)


class HyperHead(nn.Module):
  """The final collapse of the streams [b, s, n, d] -> [b, s, d] (module doc)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, streams: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, s, n, d = streams.shape
    pdt = dtype_of(cfg.param_dtype)
    fn = self.param("fn", normal_init(cfg), (n * d, n), pdt)
    base = self.param("base", nn.initializers.zeros, (n,), pdt)
    scale = self.param("scale", nn.initializers.ones, (1,), pdt)
    flat = unweighted_rms(streams.reshape(b, s, n * d), cfg.rms_norm_eps)
    pre = jax.nn.sigmoid((flat @ fn.astype(jnp.float32)) * scale.astype(jnp.float32)[0]
                         + base.astype(jnp.float32)) + cfg.hc_eps
    return jnp.einsum("bsn,bsnd->bsd", pre, streams.astype(jnp.float32)).astype(streams.dtype)
