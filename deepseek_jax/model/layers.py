"""Basic layers: RMSNorm, einsum projections, the SwiGLU MLP, the embedding.

Weights are plain arrays in the `params` collection with explicit shapes, so a
checkpoint converter can read the tree as easily as the paper: a projection
from `dim` to `n_heads x head_dim` is one kernel of shape [dim, n_heads, head_dim].
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import fp8
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
  query projection with kernel [dim, heads, head_dim]. `fp8_kind` ("attn",
  "mlp"; None = never) names the layer kind `ModelConfig.fp8_layers` selects:
  such a layer computes with `fp8_dot` when cfg.fp8 is on.

  A kernel may also come as published FP8 blocks (load_hf_checkpoint with
  keep_fp8=True): float8 `kernel` plus `kernel_scale` [ceil(K/128),
  ceil(N/128)] for the [K = contracted dims, N = the rest] matrix. It is frozen
  (no gradient); fp8 layers use its blocks directly, others dequantize it.

  bias: also a `bias` parameter over the kernel's output dims (zeros at
  init), added to the projection in cfg.dtype (the dense models' q/k/v
  biases, Qwen2); off, the layer and its parameters are as they always were.
  """
  cfg: ModelConfig
  shape: Sequence[int]
  equation: str
  fp8_kind: str | None = None
  bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array | None, *, return_kernel: bool = False) -> jax.Array:
    """x -> the projection; with return_kernel, the kernel itself in
    cfg.dtype (FP8 blocks dequantized; x unused): MLA's absorbed decode folds
    W_uk / W_uv out of it."""
    kernel = self.param("kernel", normal_init(self.cfg), tuple(self.shape),
                        dtype_of(self.cfg.param_dtype))
    if self.bias and not return_kernel:
      _, ks, out = _split_equation(self.equation, x.ndim)
      free = [c for c in ks if c in out]
      b = self.param("bias", nn.initializers.zeros, tuple(self.shape[ks.index(c)] for c in free),
                     dtype_of(self.cfg.param_dtype))
      return self._project(kernel, x, return_kernel) + _broadcast_to_output(b, free, out).astype(
          self.cfg.dtype)
    return self._project(kernel, x, return_kernel)

  def _project(self, kernel, x, return_kernel):
    dt = dtype_of(self.cfg.dtype)
    use_fp8 = bool(self.fp8_kind) and self.cfg.fp8_for(self.fp8_kind) and not return_kernel
    if self.has_variable("params", "kernel_scale"):
      blocks = fp8.Quantized(*jax.lax.stop_gradient(
          (kernel, self.get_variable("params", "kernel_scale"))))
      if use_fp8:
        return fp8_einsum(self.equation, x.astype(dt), blocks).astype(dt)
      k = _contracted_size(self.equation, kernel.shape)
      kernel = fp8.dequantize_weight(
          fp8.Quantized(blocks.q.reshape(k, -1), blocks.scale)).reshape(kernel.shape)
    elif use_fp8:
      return fp8_einsum(self.equation, x.astype(dt), kernel).astype(dt)
    if return_kernel:
      return kernel.astype(dt)
    return jnp.einsum(self.equation, x.astype(dt), kernel.astype(dt))


def _broadcast_to_output(b: jax.Array, dims: Sequence[str], out: str) -> jax.Array:
  """b over subscripts `dims` (each in `out`), transposed and expanded so it
  broadcasts against an array with subscripts `out`."""
  order = [c for c in out if c in dims]
  b = jnp.transpose(b, [list(dims).index(c) for c in order])
  return b.reshape(tuple(b.shape[order.index(c)] if c in order else 1 for c in out))


def _split_equation(equation: str, x_ndim: int):
  """(x subscripts, kernel subscripts, output subscripts) with `...` spelled out."""
  ins, out = equation.replace(" ", "").split("->")
  xs, ks = ins.split(",")
  if "..." in xs:
    extra = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)
    n_ell = x_ndim - (len(xs) - 3)
    xs, out = (t.replace("...", extra[:n_ell]) for t in (xs, out))
  return xs, ks, out


def _contracted_size(equation: str, kernel_shape: Sequence[int]) -> int:
  """K of a kernel whose contracted dims lead (every projection here)."""
  ins, out = equation.replace(" ", "").split("->")
  xs, ks = ins.split(",")
  n = sum(1 for c in ks if c in xs and c not in out)
  if any(c not in xs or c in out for c in ks[:n]):
    raise ValueError(f"einsum {equation!r}: an FP8 block kernel needs its contracted "
                     "dims first.")
  return math.prod(kernel_shape[:n])


def fp8_einsum(equation: str, x: jax.Array, kernel) -> jax.Array:
  """A projection einsum as one `fp8_dot`: the contracted dims of x are moved
  last and flattened (so 1x128 tiles run along them, e.g. wo's (heads, v)),
  the kernel becomes [contracted, rest]; the result is put back in the
  equation's output order. float32 out. `kernel` may be fp8.Quantized (FP8
  blocks of the [contracted, rest] matrix; contracted dims must lead)."""
  xs, ks, out = _split_equation(equation, x.ndim)
  blocks = kernel if isinstance(kernel, fp8.Quantized) else None
  kshape = (blocks.q if blocks is not None else kernel).shape
  contracted = [c for c in ks if c in xs and c not in out]
  free_k = [c for c in ks if c not in contracted]
  batch = [c for c in xs if c not in contracted]
  size = dict(zip(xs, x.shape)) | dict(zip(ks, kshape))
  xt = jnp.transpose(x, [xs.index(c) for c in batch + contracted])
  xt = xt.reshape(xt.shape[:len(batch)] + (-1,))
  k = math.prod(size[c] for c in contracted)
  if blocks is not None:           # the blocks tile [K, N] as stored: no transpose allowed
    _contracted_size(equation, kshape)
    kt = fp8.Quantized(blocks.q.reshape(k, -1), blocks.scale)
  else:
    kt = jnp.transpose(kernel, [ks.index(c) for c in contracted + free_k]).reshape(k, -1)
  y = fp8.fp8_dot(xt, kt, backend="auto")
  y = y.reshape(y.shape[:-1] + tuple(size[c] for c in free_k))
  return jnp.transpose(y, [(batch + free_k).index(c) for c in out])


class MLP(nn.Module):
  """SwiGLU feed-forward: W_2 (silu(W_1 x) * W_3 x) (official names w1/w3/w2);
  cfg.swiglu_limit > 0 (V4) clamps W_1 x above and W_3 x to +-limit first."""
  cfg: ModelConfig
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.cfg.dim
    gate = Einsum(self.cfg, (d, self.hidden), "...d,df->...f", "mlp", name="w1")(x)
    up = Einsum(self.cfg, (d, self.hidden), "...d,df->...f", "mlp", name="w3")(x)
    limit = self.cfg.swiglu_limit
    if limit:
      gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return Einsum(self.cfg, (self.hidden, d), "...f,fd->...d", "mlp", name="w2")(
        jax.nn.silu(gate) * up)


class Embed(nn.Module):
  """Token embedding table [vocab, dim]. return_table: the table itself
  (tokens unused): the tied output head (cfg.tie_word_embeddings) reads it."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array | None, *, return_table: bool = False) -> jax.Array:
    table = self.param("embedding", normal_init(self.cfg),
                       (self.cfg.vocab_size, self.cfg.dim),
                       dtype_of(self.cfg.param_dtype))
    if return_table:
      return table
    return jnp.take(table, tokens, axis=0).astype(self.cfg.dtype)
