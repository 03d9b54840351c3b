"""FP8 quantization in DeepSeek-V3's fine-grained recipe (V3 report sec. 3.3).

Every FP8 GEMM input is stored as float8 values q and float32 scales s with
x ~= q * s, one scale per group of elements, computed online from the group's
largest magnitude: s = amax / fmax (448 for E4M3, the format V3 uses for all
tensors; 57344 for E5M2), so the largest element lands on the format's
largest finite value (up to the rounding of 1/fmax). Groups:

  tiles   1 x 128: one scale per row and per 128 consecutive elements along
          the tiled axis. Activations are tiled along the axis a GEMM
          contracts (per token, per 128 channels in the forward pass).
  blocks  128 x 128: one scale per block of a weight matrix, so the same
          scales serve the weight and its transpose (backward pass).

Details that matter for exactness:
- values are divided by the scale and clipped to +-fmax *before* the cast:
  float8_e4m3fn has no infinity and XLA's cast does not saturate (a value past
  448 becomes NaN; ../shared/DESIGN.md §8);
- the cast rounds to nearest even, bit-identical to ml_dtypes;
- an all-zero group gets scale 1 (its values quantize to 0);
- `pow2=True` rounds each scale up to a power of two (UE8M0 scales, as the
  DeepSeek-V3.1 checkpoints store them): dividing by it is then exact and the
  largest element lands in [fmax/2, fmax] (after rounding);
- an axis whose length is not a multiple of 128 is zero-padded to one; q keeps
  the padded shape (the dot slices the result back).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TILE = 128
FORMATS = {
    "e4m3": (jnp.float8_e4m3fn, 448.0),
    "e5m2": (jnp.float8_e5m2, 57344.0),
}


class Quantized(NamedTuple):
  """q: float8 values (padded to multiples of 128 along the grouped axes);
  scale: float32, one per group (see `quantize_tiles` / `quantize_blocks`)."""
  q: jax.Array
  scale: jax.Array


def format_of(fmt: str):
  """(float8 dtype, largest finite value) of "e4m3" or "e5m2"."""
  if fmt not in FORMATS:
    raise ValueError(f"fp8 format {fmt!r} must be one of {tuple(FORMATS)}.")
  return FORMATS[fmt]


def padded(n: int, tile: int = TILE) -> int:
  return -(-n // tile) * tile


def _pad_axis(x: jax.Array, axis: int, tile: int = TILE) -> jax.Array:
  extra = padded(x.shape[axis], tile) - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def scale_from_amax(amax: jax.Array, fmax: float, pow2: bool = False) -> jax.Array:
  """amax / fmax (rounded up to a power of two with pow2); 1 where amax = 0."""
  amax = amax.astype(jnp.float32)
  # amax * (1/fmax) with the reciprocal rounded to float32 once: XLA rewrites
  # a division by a constant into this product anyway, so spell it out and
  # every backend (and the NumPy oracle) gets the same bits.
  s = amax * jnp.float32(1.0 / fmax)
  if pow2:
    mant, exp = jnp.frexp(s)                       # s = mant * 2**exp, mant in [0.5, 1)
    s = jnp.ldexp(jnp.ones_like(s), jnp.where(mant == 0.5, exp - 1, exp))
  return jnp.where(amax > 0, s, jnp.float32(1.0))


def _cast(x: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
  dtype, fmax = format_of(fmt)
  return jnp.clip(x / scale, -fmax, fmax).astype(dtype)


def quantize_tiles(x: jax.Array, axis: int = -1, *, fmt: str = "e4m3",
                   pow2: bool = False) -> Quantized:
  """1 x 128 tiles along `axis`: q has `axis` padded to a multiple of 128;
  scale has `axis` replaced by the number of tiles (one scale per tile and per
  index of every other axis)."""
  _, fmax = format_of(fmt)
  axis = axis % x.ndim
  x = _pad_axis(x.astype(jnp.float32), axis)
  n_tiles = x.shape[axis] // TILE
  tiled = x.reshape(x.shape[:axis] + (n_tiles, TILE) + x.shape[axis + 1:])
  amax = jnp.max(jnp.abs(tiled), axis=axis + 1)
  scale = scale_from_amax(amax, fmax, pow2)
  q = _cast(tiled, jnp.expand_dims(scale, axis + 1), fmt).reshape(x.shape)
  return Quantized(q, scale)


def dequantize_tiles(t: Quantized, axis: int = -1) -> jax.Array:
  """float32 q * scale of `quantize_tiles` (padded shape)."""
  axis = axis % t.q.ndim
  return t.q.astype(jnp.float32) * jnp.repeat(t.scale, TILE, axis=axis)


def quantize_blocks(w: jax.Array, *, fmt: str = "e4m3", pow2: bool = False) -> Quantized:
  """128 x 128 blocks of a matrix w [K, N]: q [K', N'] (padded to multiples
  of 128), scale [K'/128, N'/128]."""
  if w.ndim != 2:
    raise ValueError(f"block quantization takes a matrix; got shape {w.shape}.")
  _, fmax = format_of(fmt)
  w = _pad_axis(_pad_axis(w.astype(jnp.float32), 0), 1)
  kb, nb = w.shape[0] // TILE, w.shape[1] // TILE
  blocks = w.reshape(kb, TILE, nb, TILE)
  scale = scale_from_amax(jnp.max(jnp.abs(blocks), axis=(1, 3)), fmax, pow2)
  q = _cast(blocks, scale[:, None, :, None], fmt).reshape(w.shape)
  return Quantized(q, scale)


def dequantize_blocks(b: Quantized) -> jax.Array:
  """float32 q * scale of `quantize_blocks` (padded shape)."""
  full = jnp.repeat(jnp.repeat(b.scale, TILE, axis=0), TILE, axis=1)
  return b.q.astype(jnp.float32) * full


def dequantize_weight(w: Quantized) -> jax.Array:
  """float32 q * scale of a block-quantized weight stored unpadded: q
  [..., K, N] float8, scale [..., ceil(K/128), ceil(N/128)] (edge blocks
  partial), as load_hf_checkpoint(keep_fp8=True) keeps published weights."""
  k, n = w.q.shape[-2:]
  full = jnp.repeat(jnp.repeat(w.scale.astype(jnp.float32), TILE, axis=-2), TILE, axis=-1)
  return w.q.astype(jnp.float32) * full[..., :k, :n]


def quantize_tensor(x: jax.Array, *, fmt: str = "e4m3") -> Quantized:
  """One scale for the whole tensor (per-tensor scaling, what XLA's FP8
  rewrite and flax's fp8 ops do): the baseline the fine-grained recipe beats
  on activations with outliers. scale has shape ()."""
  _, fmax = format_of(fmt)
  x = x.astype(jnp.float32)
  scale = scale_from_amax(jnp.max(jnp.abs(x)), fmax)
  return Quantized(_cast(x, scale, fmt), scale)


def quantize_channels(x: jax.Array, axis: int = -1, *, fmt: str = "e4m3") -> Quantized:
  """One scale per index of `axis` over all other axes (per-channel scaling),
  a second baseline. scale keeps `axis` and has size 1 elsewhere."""
  _, fmax = format_of(fmt)
  x = x.astype(jnp.float32)
  others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  scale = scale_from_amax(jnp.max(jnp.abs(x), axis=others, keepdims=True), fmax)
  return Quantized(_cast(x, scale, fmt), scale)

