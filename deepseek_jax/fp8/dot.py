"""`fp8_dot`: a linear layer's three GEMMs in FP8, DeepSeek-V3's way.

    y = fp8_dot(x, w)        x [..., K], w [K, N] (input-major kernel) -> f32 [..., N]

Forward (fprop): x in 1 x 128 tiles along K, w in 128 x 128 blocks, both
E4M3 (quant.py). The product is accumulated per 128-wide K block and each
block's partial sum is promoted to float32 with its two scales applied, then
summed in float32 (V3 report sec. 3.3.2: tensor cores accumulate with limited
precision, so partial results are moved to FP32 registers every 128 of K):

    y[m, n] = sum_b  s_x[m, b] * s_w[b, n/128] * sum_{k in block b} q_x[m, k] q_w[k, n]

Backward (custom VJP), from the FP8 copies the forward kept (the layer input
is stored in FP8, not float32):

  dgrad  dx = dy w^T: dy in 1 x 128 tiles along N (the contracted axis), the
         weight's FP8 blocks transposed (a 128 x 128 block is a block of w^T);
  wgrad  dW = x^T dy: contracts the M (token) axis, so both operands are
         tiled 128 x 1, along M: the stored x is dequantized and re-tiled
         (V3: "converted from 1x128 to 128x1 tiles"), dy quantized along M.

Backends: "emulated" is the exact reference on any device: the quantization
is bit-exact (float8 casts round like ml_dtypes) and the promoted sums run as
float32 einsums. "auto" picks the fastest available; no FP8 tensor-core path
exists in this code base yet (that is the Hopper issue), so it emulates and
says so once. Emulation trades speed for fidelity: it does the work of a
float32 GEMM plus quantization.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.fp8.quant import (FORMATS, TILE, Quantized, dequantize_tiles, format_of,
                                    padded, quantize_blocks, quantize_tiles)

BACKENDS = ("auto", "emulated")
_warned_auto = []


class Fp8Options(NamedTuple):
  fmt: str = "e4m3"
  pow2: bool = False


def _promoted_dot(xq, xs, wq, ws_cols):
  """sum over K blocks of scaled partial products, float32.

  xq [M, K'] float8, xs [M, K'/128]; wq [K', N'] float8, ws_cols [K'/128, N']
  (block scales repeated along N). Returns [M, N'] float32.
  """
  m, kp = xq.shape
  kb = kp // TILE
  partial = jnp.einsum("mbk,bkn->mbn", xq.astype(jnp.float32).reshape(m, kb, TILE),
                       wq.astype(jnp.float32).reshape(kb, TILE, -1),
                       precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(partial * xs[:, :, None] * ws_cols[None], axis=1)


def _fprop(x, qw: Quantized, n: int, opts: Fp8Options):
  """x [M, K] float against the FP8 weight blocks qw (padded [K', N'])."""
  qx = quantize_tiles(x, axis=1, fmt=opts.fmt, pow2=opts.pow2)       # [M, K'] / [M, K'/128]
  y = _promoted_dot(qx.q, qx.scale, qw.q, jnp.repeat(qw.scale, TILE, axis=1))
  return y[:, :n], qx


def _dgrad(dy, qw: Quantized, k: int, opts: Fp8Options):
  """dx = dy w^T: dy tiled along N, the FP8 weight blocks transposed."""
  qdy = quantize_tiles(dy, axis=1, fmt=opts.fmt, pow2=opts.pow2)     # [M, N'] / [M, N'/128]
  return _promoted_dot(qdy.q, qdy.scale, qw.q.T, jnp.repeat(qw.scale.T, TILE, axis=1))[:, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x, w, opts: Fp8Options):
  return _fprop(x, quantize_blocks(w, fmt=opts.fmt, pow2=opts.pow2), w.shape[1], opts)[0]


def _fp8_matmul_fwd(x, w, opts: Fp8Options):
  qw = quantize_blocks(w, fmt=opts.fmt, pow2=opts.pow2)              # [K', N'] / [K'/128, N'/128]
  y, qx = _fprop(x, qw, w.shape[1], opts)
  # Residuals: the FP8 input and weight with their scales, plus zero-size
  # arrays carrying the original shapes and dtypes.
  return y, (qx, qw, jnp.zeros((0,) + x.shape, x.dtype), jnp.zeros((0,) + w.shape, w.dtype))


def _fp8_matmul_bwd(opts: Fp8Options, res, dy):
  qx, qw, x_like, w_like = res
  k = x_like.shape[2]
  dx = _dgrad(dy, qw, k, opts)
  # wgrad: contract the token axis; both operands in 128 x 1 tiles along M.
  x_deq = dequantize_tiles(qx, axis=1)                               # [M, K'] float32
  qx_m = quantize_tiles(x_deq, axis=0, fmt=opts.fmt, pow2=opts.pow2)  # [M', K'] / [M'/128, K']
  qdy_m = quantize_tiles(dy, axis=0, fmt=opts.fmt, pow2=opts.pow2)    # [M', N] / [M'/128, N]
  mb = qx_m.q.shape[0] // TILE
  partial = jnp.einsum("bmk,bmn->bkn", qx_m.q.astype(jnp.float32).reshape(mb, TILE, -1),
                       qdy_m.q.astype(jnp.float32).reshape(mb, TILE, -1),
                       precision=jax.lax.Precision.HIGHEST)
  dw = jnp.sum(partial * qx_m.scale[:, :, None] * qdy_m.scale[:, None, :], axis=0)[:k]
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# A weight that is already FP8 (a published checkpoint's blocks, loaded with
# load_hf_checkpoint(keep_fp8=True)): fprop and dgrad use its blocks as they
# are; the weight is frozen (its cotangents are zero), x still gets dgrad.
def _pad_blocks(w: Quantized) -> Quantized:
  k, n = w.q.shape
  q = jnp.pad(w.q, ((0, padded(k) - k), (0, padded(n) - n)))
  return Quantized(q, w.scale.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_matmul_frozen(x, q, scale, opts: Fp8Options):
  return _fprop(x, _pad_blocks(Quantized(q, scale)), q.shape[1], opts)[0]


def _fp8_matmul_frozen_fwd(x, q, scale, opts: Fp8Options):
  y = _fprop(x, _pad_blocks(Quantized(q, scale)), q.shape[1], opts)[0]
  return y, (q, scale, jnp.zeros((0,) + x.shape, x.dtype))


def _fp8_matmul_frozen_bwd(opts: Fp8Options, res, dy):
  q, scale, x_like = res
  dx = _dgrad(dy, _pad_blocks(Quantized(q, scale)), x_like.shape[2], opts)
  return dx.astype(x_like.dtype), jnp.zeros_like(q), jnp.zeros_like(scale)


_fp8_matmul_frozen.defvjp(_fp8_matmul_frozen_fwd, _fp8_matmul_frozen_bwd)


def _matmul(x, w, opts: Fp8Options):
  if isinstance(w, Quantized):
    return _fp8_matmul_frozen(x, w.q, w.scale, opts)
  return _fp8_matmul(x, w, opts)


def _resolve_backend(backend: str) -> str:
  if backend == "gpu":
    raise NotImplementedError(
        "fp8_dot backend 'gpu' (an FP8 tensor-core GEMM through an XLA custom call) is not "
        "built yet; use backend='emulated' (or 'auto', which emulates).")
  if backend not in BACKENDS:
    raise ValueError(f"fp8_dot backend={backend!r} must be one of {BACKENDS} "
                     "('gpu' is not built yet).")
  if backend == "auto":
    if not _warned_auto:
      _warned_auto.append(True)
      warnings.warn(f"fp8_dot: no FP8 tensor-core kernel for the {jax.default_backend()!r} "
                    "backend in this build; using exact emulation (float32 GEMMs on FP8 "
                    "values, slower than float32).", stacklevel=3)
    return "emulated"
  return backend


def _check(x, w, what: str):
  if isinstance(w, Quantized):
    _check_blocks(w, what)
    w = w.q
  if w.ndim != 2:
    raise ValueError(f"{what}: w must be a matrix [K, N]; got shape {w.shape}.")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"{what}: x [..., K] and w [K, N] disagree on K: x {x.shape}, "
                     f"w {w.shape}.")
  for name, a in (("x", x), ("w", w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{what}: {name} has dtype {a.dtype}; fp8_dot takes floating "
                       "inputs (float32 / bfloat16 / float16).")


def _check_blocks(w: Quantized, what: str):
  if w.q.ndim != 2 or w.scale.ndim != 2:
    raise ValueError(f"{what}: a pre-quantized w is Quantized(q [K, N], scale "
                     f"[ceil(K/128), ceil(N/128)]); got q {w.q.shape}, scale {w.scale.shape}.")
  if jnp.dtype(w.q.dtype) not in [jnp.dtype(d) for d, _ in FORMATS.values()]:
    raise ValueError(f"{what}: a pre-quantized w needs float8 values (e4m3 / e5m2); got "
                     f"{w.q.dtype}. Pass a float weight to have it quantized here.")
  want = tuple(-(-n // TILE) for n in w.q.shape)
  if tuple(w.scale.shape) != want:
    raise ValueError(f"{what}: w.scale has shape {tuple(w.scale.shape)}; a {w.q.shape} "
                     f"weight in 128 x 128 blocks needs {want}.")


def fp8_dot(x: jax.Array, w, *, backend: str = "auto", fmt: str = "e4m3",
            pow2_scales: bool = False) -> jax.Array:
  """x [..., K] @ w [K, N] -> float32 [..., N], all three GEMMs in FP8.

  fmt: "e4m3" (V3: every tensor) or "e5m2"; pow2_scales: UE8M0 (power-of-two)
  scales. K and N need not be multiples of 128 (zero-padded inside). The
  gradients follow the V3 recipe (module docstring), not the float32 ones.

  w may also be already quantized: `Quantized(q, scale)` with float8 q [K, N]
  and one float32 scale per 128 x 128 block (w ~= q * scale; a published FP8
  checkpoint's weight and weight_scale_inv, transposed to [K, N]). It is used
  as is and frozen: fprop and dgrad run on its blocks, its gradient is zero.
  """
  _check(x, w, "fp8_dot")
  format_of(fmt)
  _resolve_backend(backend)
  lead = x.shape[:-1]
  n = (w.q if isinstance(w, Quantized) else w).shape[1]
  y = _matmul(x.reshape(-1, x.shape[-1]), w, Fp8Options(fmt, bool(pow2_scales)))
  return y.reshape(*lead, n)


def fp8_grouped_dot(x: jax.Array, w, *, backend: str = "auto",
                    fmt: str = "e4m3", pow2_scales: bool = False) -> jax.Array:
  """Per group g: x[g] [M, K] @ w[g] [K, N] -> float32 [G, M, N] (the routed
  experts' FFNs, one group per expert or expert block). w may be a
  Quantized(q [G, K, N], scale [G, K/128, N/128]) as in `fp8_dot`."""
  wq = w.q if isinstance(w, Quantized) else w
  if x.ndim != 3 or wq.ndim != 3 or x.shape[0] != wq.shape[0]:
    raise ValueError(f"fp8_grouped_dot: x [G, M, K] and w [G, K, N] expected; got x "
                     f"{x.shape}, w {wq.shape}.")
  _check(x[0], jax.tree.map(lambda a: a[0], w), "fp8_grouped_dot")
  format_of(fmt)
  _resolve_backend(backend)
  opts = Fp8Options(fmt, bool(pow2_scales))
  return jax.vmap(lambda a, b: _matmul(a, b, opts))(x, w)
