"""Values shaped for how XLA allocates buffers (measured at DeepSeek-V3 widths).

XLA:CPU has no 16- or 8-bit float gather, slice-into-dot or all-to-all: its
float normalization goes through float32 copies of the whole operand.
`on_bits` runs such a data move on the unsigned integers of the bits
instead (bit-exact on every backend): the MoE kernel's row moves and picked
experts (model/moe.py), gmm's chunk gathers and row slices, the exchange's
sends and all-to-alls (parallel/expert.py).

The grouped matmul (model/grouped_matmul.py) gathers a bfloat16 weight's
chunks the same way. Made inside the kernel, the bits are a second copy of
the weight beside the bfloat16 cast (one per call site: the exchange's
round 0 and its overflow rounds). A `BitsWeight` carries both from the cast
on: the kernel reads only the bits, so the float copy has no reader and XLA
drops it.

`zeros_after`: zeros XLA cannot share between loops or hoist out of a
conditional. Constant zeros are CSE'd into one broadcast; each while loop
that starts from it then copies it into its own carry, both live (the
grouped matmul's weight-gradient carries, 1.75 GiB each at V3 widths), and
inside a switch branch they are made before the conditional and copied into
the branch's result, both live through whichever branch runs (the pipeline's
no-op branches: the MTP experts' float32 gradient zeros, 10.5 GiB at V3
widths on pipe=2 x expert=4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BitsWeight(NamedTuple):
  """A 16-bit float weight handed to `gmm` with its bits made once.

  value [G, K, N]: the weight (e.g. bfloat16), the primal that takes the
    gradient; no op of gmm reads it (only its shape and dtype), so XLA drops
    the array itself when nothing else reads it.
  bits: `lax.bitcast_convert_type(value, uint16)`, what gmm's chunks gather
    (`_take`). Made where the weight is cast (`bits_weight`), one fused
    convert, the bits replace the float copy: at DeepSeek-V3 widths, with
    the weights cast per layer inside a pipeline stage, XLA otherwise held
    the bfloat16 cast (5.25 GiB per MoE layer for w1, w3, w2 at 64 experts
    per device) and a uint16 copy of it per gmm call site beside it.
  Passes through jax.tree.map / shard_map specs / pcast as its two leaves;
  a custom VJP returns BitsWeight(d_value, None) for it."""
  value: jax.Array
  bits: jax.Array

  @property
  def shape(self):
    return self.value.shape

  @property
  def dtype(self):
    return self.value.dtype

  @property
  def ndim(self):
    return self.value.ndim


def bits_weight(w):
  """w as a `BitsWeight` when it is a 16-bit float array (the kernels'
  compute dtype); anything else (float32, FP8 `Quantized`) unchanged."""
  if isinstance(w, BitsWeight) or not hasattr(w, "dtype") or \
      not jnp.issubdtype(w.dtype, jnp.floating) or jnp.dtype(w.dtype).itemsize != 2:
    return w
  return BitsWeight(w, jax.lax.bitcast_convert_type(w, jnp.uint16))


def plain_weight(w):
  """The weight array of a BitsWeight (else w itself)."""
  return w.value if isinstance(w, BitsWeight) else w


def bits_only(ops):
  """ops with each BitsWeight replaced by its bits: what a `lax.cond` takes
  as operands, so that it holds no float copy (`from_bits` undoes it inside
  the branch)."""
  return [w.bits if isinstance(w, BitsWeight) else w for w in ops]


def from_bits(like, passed):
  """`bits_only`'s inverse inside a branch: where `like` holds a BitsWeight,
  a BitsWeight whose value is the bits' bitcast (read by no op of the
  kernel, so XLA drops it; a differentiable primal for `jax.vjp`)."""
  return [BitsWeight(jax.lax.bitcast_convert_type(p, w.dtype), p)
          if isinstance(w, BitsWeight) else p for w, p in zip(like, passed)]


def on_bits(fn, a: jax.Array) -> jax.Array:
  """fn applied to a float narrower than 32 bits as the unsigned integers of
  its bits, the result bitcast back (fn only moves data: gathers, slices,
  all-to-alls; bit-exact on every backend). Other dtypes: fn(a). XLA:CPU
  float-normalizes such moves of 16- and 8-bit floats through float32
  copies, which loop-invariant code motion then hoists out of loops as
  whole-array copies."""
  if not jnp.issubdtype(a.dtype, jnp.floating) or jnp.dtype(a.dtype).itemsize >= 4:
    return fn(a)
  bits = jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * jnp.dtype(a.dtype).itemsize}"))
  return jax.lax.bitcast_convert_type(fn(bits), a.dtype)


def take_bits(a: jax.Array, idx: jax.Array, **kw) -> jax.Array:
  """jnp.take(a, idx, axis=0, **kw) through `on_bits` (a fill value of 0 is
  +0.0's bits; no other fill value is supported)."""
  if kw.get("fill_value") not in (None, 0):
    raise ValueError(f"take_bits: fill_value={kw['fill_value']!r}; only 0 (or none).")
  return on_bits(lambda b: jnp.take(b, idx, axis=0, **kw), a)


def zeros_after(spec, anchor: jax.Array):
  """Zeros of spec (arrays or ShapeDtypeStructs, any pytree) made from a
  value read from anchor: 0 x a flag of its first element, never NaN
  (module doc: no shared constant, nothing to hoist or copy)."""
  dep = 0 * (anchor.reshape(-1)[0] == 0).astype(jnp.float32)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) + dep.astype(s.dtype), spec)
