"""Basic layers: RMSNorm, einsum projections, the SwiGLU MLP, the embedding.

Weights are plain arrays in the `params` collection with explicit shapes, so a
checkpoint converter can read the tree as easily as the paper: a projection
from `dim` to `n_heads x head_dim` is one kernel of shape [dim, n_heads, head_dim].
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def normal_init(cfg: ModelConfig):
  return nn.initializers.normal(stddev=cfg.init_std)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       dtype_of(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                              + self.cfg.rms_norm_eps)
    return (scale.astype(jnp.float32) * x32).astype(self.cfg.dtype)


class Einsum(nn.Module):
  """A bias-free projection written as an einsum over a kernel of `shape`.

  `equation` contracts the input with the kernel, e.g. "btd,dhk->bthk" for a
  query projection with kernel [dim, heads, head_dim].
  """
  cfg: ModelConfig
  shape: Sequence[int]
  equation: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", normal_init(self.cfg), tuple(self.shape),
                        dtype_of(self.cfg.param_dtype))
    dt = dtype_of(self.cfg.dtype)
    return jnp.einsum(self.equation, x.astype(dt), kernel.astype(dt))


class MLP(nn.Module):
  """SwiGLU feed-forward: W_2 (silu(W_1 x) * W_3 x) (official names w1/w3/w2)."""
  cfg: ModelConfig
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.cfg.dim
    gate = Einsum(self.cfg, (d, self.hidden), "...d,df->...f", name="w1")(x)
    up = Einsum(self.cfg, (d, self.hidden), "...d,df->...f", name="w3")(x)
    return Einsum(self.cfg, (self.hidden, d), "...f,fd->...d", name="w2")(
        jax.nn.silu(gate) * up)


class Embed(nn.Module):
  """Token embedding table [vocab, dim]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.param("embedding", normal_init(self.cfg),
                       (self.cfg.vocab_size, self.cfg.dim),
                       dtype_of(self.cfg.param_dtype))
    return jnp.take(table, tokens, axis=0).astype(self.cfg.dtype)
