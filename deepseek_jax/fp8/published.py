"""Block-FP8 weights as published checkpoints store them, dequantised on the host.

DeepSeek-V3 / R1 publish every projection weight as float8 values w_fp8
[out, in] (torch Linear layout) with a float32 `weight_scale_inv`
[ceil(out/b0), ceil(in/b1)], one per b0 x b1 block (128 x 128 as published;
edge blocks partial). Despite its name, scale_inv is the multiplier:
w = w_fp8 * scale_inv over each block.

This is NumPy, not jax: a checkpoint loader (interop/hf_load.py) dequantises
one tensor at a time in host memory and must not place each weight on a
device on the way. `quant.dequantize_weight` is the same maths in jax for
weights kept as FP8 inside the model (load_hf_checkpoint(keep_fp8=True)):
128 x 128 blocks only, scales already transposed to our [in, out] layout,
any leading stack axes.
"""

from __future__ import annotations

import numpy as np

from deepseek_jax.fp8.quant import TILE

BLOCK = (TILE, TILE)


def block_scale_shape(shape: tuple[int, int], block: tuple[int, int] = BLOCK
                      ) -> tuple[int, int]:
  """The weight_scale_inv shape of an [out, in] weight: ceil(out/b0), ceil(in/b1)."""
  return tuple(-(-n // b) for n, b in zip(shape, block))


def dequantize_fp8_blocks(w: np.ndarray, scale_inv: np.ndarray,
                          block: tuple[int, int] = BLOCK) -> np.ndarray:
  """float32 w_fp8 * scale_inv, one scale per [block] tile (edge tiles partial).

  w: [out, in]; scale_inv: [ceil(out/b0), ceil(in/b1)] (DeepSeek-V3 FP8 format).
  """
  (n_out, n_in), (b0, b1) = w.shape, block
  expected = block_scale_shape(w.shape, block)
  if tuple(scale_inv.shape) != expected:
    raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} != {expected} "
                     f"for a {w.shape} weight with {block} blocks.")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, 0), b1, 1)[:n_out, :n_in]
  return w.astype(np.float32) * scale
