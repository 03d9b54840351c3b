"""Grouped matmul over row blocks: each block of rows times its group's weight.

    y = gmm(x, w, block_group, n_used)
    x [n_blocks * bs, K]   rows sorted by group, each group's rows padded to a
                           multiple of bs (so every block of bs rows belongs
                           to one group)
    w [G, K, N]            one weight per group (an array, or FP8 blocks
                           `fp8.Quantized` with fp8=True)
    block_group [n_blocks] the group of each block, non-decreasing over the
                           used blocks
    n_used                 blocks actually used (int32 scalar); blocks
                           n_used.. are the static bound's unused tail
    y[blk] = x[blk] @ w[block_group[blk]] for blk < n_used, 0 after.

The blocks are processed `chunk` at a time: a chunk gathers its blocks'
weights ([chunk, K, N]) and runs one batched GEMM. `chunk` keeps the gathered
bytes under GATHER_BUDGET_BYTES, so memory never holds a weight copy per
block (at DeepSeek-V3 widths one [7168, 2048] bfloat16 slice is 28 MiB: two
blocks per chunk; the per-block gather this replaces held [n_blocks, K, N],
~8 GiB per matrix for 288 blocks, and as much again for its gradient).

  one chunk covers every block (small widths: tests, CPU runs): one batched
    einsum over all n_blocks blocks, no loop; the unused tail is computed on
    its rows and masked to 0 (the fastest form on CPU at these sizes);
  otherwise a while loop over ceil(n_used / chunk) chunks, so FLOPs follow
    the used blocks (the real rows plus < one block of padding per group)
    plus < one chunk. The last chunk's start is clamped to n_blocks - chunk:
    it may recompute blocks an earlier chunk wrote (same values).

The derivative is defined here (`jax.custom_vjp`), the same way blocked:

  dx[blk] = dy[blk] @ w[g]^T      the forward's loop over chunks, on the
                                  chunk's gathered weights (no w^T copy);
  dw[g]   = sum_{blk of g} x[blk]^T dy[blk]
                                  a loop over groups, each summing its used
                                  blocks `chunk` at a time into one float32
                                  [K, N] accumulator, written to dw[g] in w's
                                  dtype (< one chunk of wasted work per group).
                                  One chunk: every block's product at once,
                                  scatter-added into its group.

so neither pass materialises per-block weights or per-block weight gradients
beyond one chunk. With fp8=True each chunk's GEMMs run through
`fp8.fp8_grouped_dot` (V3's FP8 recipe, every block quantized as its own
group exactly as a per-block call would; the backward by `jax.vjp` of the
chunk); a `Quantized` weight is frozen (zero gradient), as in `fp8_dot`.

Inside `jax.shard_map`, x and w are first made to vary over the same mesh axes
(`jax.lax.pcast`): a custom_vjp's backward must return each cotangent with its
primal's axis type, and the pcast's transpose sums w's gradient over the axes
the rows are split across, as plain autodiff would.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from deepseek_jax import fp8 as fp8_lib
from deepseek_jax.buffers import BitsWeight, on_bits, plain_weight, take_bits, zeros_after

def loop_trips(n: int):
  """A named scope marking the while loop traced inside it as running about
  `n` times per entry (its trip count is data). It changes nothing in the
  program; the compile report (train/compile_report.py, `flops_all_trips`)
  reads it from the loop's op_name to count the loop's FLOPs n times, where
  XLA's own count and `hlo_flops` count a loop of unknown trips once."""
  return jax.named_scope(f"dsj_trips={max(int(n), 1)}")


# Upper bound on the bytes of the weights one chunk gathers ([chunk, K, N]);
# at least one block per chunk whatever its size.
GATHER_BUDGET_BYTES = 64 * 2**20


def _weight_array(w) -> jax.Array:
  if isinstance(w, BitsWeight):
    return w.value
  return w.q if isinstance(w, fp8_lib.Quantized) else w


def chunk_blocks(n_blocks: int, k: int, n: int, itemsize: int) -> int:
  """Blocks per chunk: as many as keep chunk * k * n * itemsize <= the budget."""
  return int(max(1, min(n_blocks, GATHER_BUDGET_BYTES // max(k * n * itemsize, 1))))


def _chunk_of(w, fp8: bool, n_blocks: int) -> int:
  wa = _weight_array(w)
  # Emulated FP8 upcasts each gathered block to float32 before its GEMM.
  itemsize = 4 if fp8 else jnp.dtype(wa.dtype).itemsize
  return chunk_blocks(n_blocks, wa.shape[1], wa.shape[2], itemsize)


def _take(w, index):
  """w[index] of a weight or of FP8 blocks (values and scales alike).

  A float narrower than 32 bits is gathered as the unsigned integers of its
  bits: XLA:CPU has no 16- or 8-bit float gather, and its float
  normalization gathered from a float32 copy of the whole weight, which
  loop-invariant code motion then hoisted out of the chunk loop (at V3
  widths 3.5 GiB per [64, 7168, 2048] expert matrix and call, beside the
  bfloat16 weight). Bit-exact on every backend. (The bitcast is hoisted
  too: a uint16 copy of the weight, 1.75 GiB per V3 matrix, half the float32
  one. Per-block dynamic slices of the bfloat16 weight instead were measured
  worse: XLA:CPU normalizes them the same way, a float32 copy per matrix.)
  A `BitsWeight` brings its bits: they are gathered directly."""
  if isinstance(w, BitsWeight):
    return jax.lax.bitcast_convert_type(jnp.take(w.bits, index, axis=0, mode="clip"),
                                        w.value.dtype)

  return jax.tree.map(lambda a: take_bits(a, index, mode="clip"), w)


def _block_dot(xc, wc, fp8: bool):
  """[c, bs, K] x [c, K, N] -> [c, bs, N], block by block."""
  if fp8:
    return fp8_lib.fp8_grouped_dot(xc, wc).astype(xc.dtype)
  return jnp.einsum("cbk,ckn->cbn", xc, wc)


def _start(i, c, n_blocks):
  """First block of chunk i, clamped so that the chunk fits in n_blocks."""
  return jnp.minimum(i * c, n_blocks - c)


def _rows(a, s, c, bs):
  """Rows of blocks s .. s + c - 1 of a [n_blocks * bs, ...].

  A 16-bit float `a` is sliced as its uint16 bits: XLA:CPU runs 16-bit dots
  in float32, and converting the slice's operand instead converted the whole
  loop-invariant array, hoisted out of the chunk loop (a float32 copy of
  each row operand: at V3 widths 2 GiB per [ep cap, 7168] cotangent)."""
  return on_bits(lambda b: jax.lax.dynamic_slice_in_dim(b, s * bs, c * bs), a)


def _forward(fp8, x, w, block_group, n_used):
  n_blocks = block_group.shape[0]
  bs = x.shape[0] // n_blocks
  c = _chunk_of(w, fp8, n_blocks)
  n_out = _weight_array(w).shape[2]
  out_dtype = x.dtype if fp8 else jnp.result_type(x.dtype, _weight_array(w).dtype)

  def one(i, y):
    s = _start(i, c, n_blocks)
    xc = _rows(x, s, c, bs)
    wc = _take(w, jax.lax.dynamic_slice_in_dim(block_group, s, c))
    yc = _block_dot(xc.reshape(c, bs, -1), wc, fp8)
    live = (s + jnp.arange(c)) < n_used
    yc = jnp.where(live[:, None, None], yc, 0).astype(out_dtype).reshape(c * bs, n_out)
    return jax.lax.dynamic_update_slice_in_dim(y, yc, s * bs, axis=0)

  # The loop carry varies over the mesh axes x does (inside shard_map).
  y = _vary_like(_varying(x) | _varying(_weight_array(w)),
                 zeros_after(jax.ShapeDtypeStruct((n_blocks * bs, n_out), out_dtype), x))
  if c == n_blocks:
    return one(0, y)
  with loop_trips(-(-n_blocks // c)):
    return jax.lax.fori_loop(0, (n_used + c - 1) // c, one, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(fp8, x, w, block_group, n_used):
  return _forward(fp8, x, w, block_group, n_used)


def _gmm_fwd(fp8, x, w, block_group, n_used):
  return _forward(fp8, x, w, block_group, n_used), (x, w, block_group, n_used)


def _dx_chunk(xc, wc, dyc, fp8: bool):
  """dx [c, bs, K] of one chunk: dy[blk] @ w[g]^T (FP8: the recipe's dgrad)."""
  if not fp8:
    return jnp.einsum("cbn,ckn->cbk", dyc, wc).astype(xc.dtype)
  _, vjp = jax.vjp(lambda a: _block_dot(a, wc, True), xc)
  return vjp(dyc)[0]


def _dw_blocks(xc, wc, dyc, fp8: bool):
  """x[blk]^T dy[blk] per block, float32 [c, K, N] (FP8: the recipe's wgrad,
  each block quantized along its rows; wc [c, K, N] only gives its shape)."""
  if not fp8:
    return jnp.einsum("cbk,cbn->ckn", xc, dyc, preferred_element_type=jnp.float32)
  _, vjp = jax.vjp(lambda b: _block_dot(xc, b, True), wc)
  return vjp(dyc)[0].astype(jnp.float32)


def _dw_chunk(xc, wg, dyc, fp8: bool):
  """sum over the chunk's blocks of x[blk]^T dy[blk], float32 [K, N]; the
  blocks all belong to the group of weight wg."""
  if not fp8:
    return jnp.einsum("cbk,cbn->kn", xc, dyc, preferred_element_type=jnp.float32)
  wc = jnp.broadcast_to(wg, (xc.shape[0],) + wg.shape)
  return _dw_blocks(xc, wc, dyc, True).sum(0)


def _loop_dx(fp8, x, w, block_group, n_used, dy, c):
  """dx, chunk by chunk over the used blocks (the forward's loop)."""
  n_blocks = block_group.shape[0]
  bs = x.shape[0] // n_blocks

  def one(i, dx):
    s = _start(i, c, n_blocks)
    xc, dyc = _rows(x, s, c, bs), _rows(dy, s, c, bs)
    wc = _take(w, jax.lax.dynamic_slice_in_dim(block_group, s, c))
    dxc = _dx_chunk(xc.reshape(c, bs, -1), wc, dyc.reshape(c, bs, -1), fp8)
    dxc = jnp.where(((s + jnp.arange(c)) < n_used)[:, None, None], dxc, 0)
    return jax.lax.dynamic_update_slice_in_dim(dx, dxc.reshape(c * bs, -1), s * bs, axis=0)

  dx = _vary_like(_varying(x) | _varying(dy) | _varying(_weight_array(w)), zeros_after(x, dy))
  if c == n_blocks:
    return one(0, dx)
  with loop_trips(-(-n_blocks // c)):
    return jax.lax.fori_loop(0, (n_used + c - 1) // c, one, dx)


def _loop_dw(fp8, x, w, block_group, n_used, dy, c):
  """dw [G, K, N] in w's dtype: per group g, its used blocks [lo, hi) c at a
  time into one float32 [K, N] accumulator, then written to dw[g]. A chunk
  that overhangs the group (or, clamped, starts before lo) zeroes the other
  blocks' dy rows: < c blocks of wasted work per group."""
  n_blocks = block_group.shape[0]
  bs = x.shape[0] // n_blocks
  n_groups = w.shape[0]
  live_group = jnp.where(jnp.arange(n_blocks) < n_used, block_group, n_groups)
  if c == n_blocks:      # one chunk: every block's x^T dy, summed into its group
    xb, dyb = x.reshape(n_blocks, bs, -1), dy.reshape(n_blocks, bs, -1)
    dwb = _dw_blocks(xb, _take(w, block_group) if fp8 else None, dyb, fp8)
    return jnp.zeros(w.shape, jnp.float32).at[live_group].add(
        dwb, mode="drop").astype(w.dtype)
  lo = jnp.searchsorted(live_group, jnp.arange(n_groups), side="left")
  hi = jnp.searchsorted(live_group, jnp.arange(n_groups), side="right")

  axes = _varying(x) | _varying(dy) | _varying(_weight_array(w))   # carries' type in shard_map

  def group(g, dw):
    def one(j, acc):
      first = lo[g] + j * c
      s = jnp.minimum(first, n_blocks - c)
      blk = s + jnp.arange(c)
      keep = (blk >= first) & (blk < hi[g])
      xc, dyc = _rows(x, s, c, bs), _rows(dy, s, c, bs)
      dyc = jnp.where(keep[:, None, None], dyc.reshape(c, bs, -1), 0)
      wg = jax.lax.dynamic_index_in_dim(w, g, keepdims=False) if fp8 else None
      return acc + _dw_chunk(xc.reshape(c, bs, -1), wg, dyc, fp8)

    with loop_trips(_mean_group_trips(n_blocks, n_groups, c)):
      acc = jax.lax.fori_loop(0, (hi[g] - lo[g] + c - 1) // c, one,
                              _vary_like(axes, jnp.zeros(w.shape[1:], jnp.float32)))
    return jax.lax.dynamic_update_index_in_dim(dw, acc.astype(dw.dtype), g, axis=0)

  # The carry's zeros made from dy (buffers.zeros_after): not one shared
  # constant that each call's loop copies (1.75 GiB per V3 expert matrix).
  init = zeros_after(jax.ShapeDtypeStruct(w.shape, w.dtype), dy)
  return jax.lax.fori_loop(0, n_groups, group, _vary_like(axes, init))


def _gmm_bwd(fp8, res, dy):
  x, w, block_group, n_used = res
  c = _chunk_of(w, fp8, block_group.shape[0])
  dy = dy.astype(x.dtype) if fp8 else dy
  dx = _loop_dx(fp8, x, w, block_group, n_used, dy, c)
  if isinstance(w, fp8_lib.Quantized):          # published FP8 blocks: frozen
    return dx, jax.tree.map(jnp.zeros_like, w), None, None
  dw = _loop_dw(fp8, x, w, block_group, n_used, dy, c)
  return dx, (BitsWeight(dw, None) if isinstance(w, BitsWeight) else dw), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ---------------------------------------------------------------------------
# Sharded weights: one group's weight gathered at a time
# ---------------------------------------------------------------------------
def _group_spans(block_group, n_used, n_groups: int):
  """(lo, hi) [G]: group g's used blocks are lo[g] .. hi[g] - 1."""
  n_blocks = block_group.shape[0]
  live = jnp.where(jnp.arange(n_blocks) < n_used, block_group, n_groups)
  groups = jnp.arange(n_groups)
  return (jnp.searchsorted(live, groups, side="left"),
          jnp.searchsorted(live, groups, side="right"))


def _group_chunk(n_blocks: int, n_groups: int, bs: int, k: int, n: int, itemsize: int) -> int:
  """Blocks per chunk of one group's loop: about half a group's mean share of
  the blocks (each group wastes < one chunk), rows under the budget."""
  rows_cap = GATHER_BUDGET_BYTES // max(bs * max(k, n) * itemsize, 1)
  return int(max(1, min(n_blocks, rows_cap, n_blocks // (2 * n_groups))))


def _gather_group(w, g, axes, dim):
  """Group g's whole weight [K, N] from this device's slice of w (tiled)."""
  return jax.lax.all_gather(jax.lax.dynamic_index_in_dim(w, g, keepdims=False), axes,
                            axis=dim - 1, tiled=True)


def _group_blocks(g, lo, hi, n_blocks: int, c: int, body, carry):
  """body(s, keep [c], carry) -> carry over chunks of c blocks [s, s + c)
  covering group g's used blocks lo[g] .. hi[g] - 1, the last chunk clamped
  to end at hi[g]; keep marks the chunk's blocks of group g not yet done."""
  def one(j, carry):
    first = lo[g] + j * c
    s = jnp.clip(jnp.minimum(first, hi[g] - c), 0, n_blocks - c)
    blk = s + jnp.arange(c)
    return body(s, (blk >= first) & (blk < hi[g]), carry)
  with loop_trips(_mean_group_trips(n_blocks, hi.shape[0], c)):
    return jax.lax.fori_loop(0, (hi[g] - lo[g] + c - 1) // c, one, carry)


def _mean_group_trips(n_blocks: int, n_groups: int, c: int) -> int:
  """A group loop's hint (`loop_trips`): the static buffer's blocks spread
  evenly over the groups, c per trip, rounded up (each group's last chunk)."""
  return -(-n_blocks // (n_groups * c)) if n_blocks >= n_groups * c else 1


def _gathered_sizes(x, w, block_group, axes, dim) -> tuple[int, int, int, int]:
  """(bs, K, N, c): block rows, one group's whole weight [K, N], blocks per chunk."""
  n_blocks = block_group.shape[0]
  bs = x.shape[0] // n_blocks
  split = math.prod(jax.lax.axis_size(a) for a in axes)
  k, n = w.shape[1:]
  k, n = (k * split, n) if dim == 1 else (k, n * split)
  return bs, k, n, _group_chunk(n_blocks, w.shape[0], bs, k, n, jnp.dtype(x.dtype).itemsize)


def _gathered_forward(fp8, axes, dim, x, w, block_group, n_used):
  """y = gmm(x, w_whole, ...): for g in range(G) (a fixed trip count, so every
  device gathers group g in step g), g's weight gathered, then its blocks."""
  n_blocks, n_groups = block_group.shape[0], w.shape[0]
  bs, k_full, n_full, c = _gathered_sizes(x, w, block_group, axes, dim)
  out_dtype = x.dtype if fp8 else jnp.result_type(x.dtype, w.dtype)
  lo, hi = _group_spans(block_group, n_used, n_groups)

  def group(g, y):
    wc = jnp.broadcast_to(_gather_group(w, g, axes, dim), (c, k_full, n_full))

    def body(s, keep, y):
      yc = _block_dot(_rows(x, s, c, bs).reshape(c, bs, -1), wc, fp8).astype(out_dtype)
      yc = jnp.where(keep[:, None, None], yc, _rows(y, s, c, bs).reshape(c, bs, -1))
      return jax.lax.dynamic_update_slice_in_dim(y, yc.reshape(c * bs, -1), s * bs, axis=0)
    return _group_blocks(g, lo, hi, n_blocks, c, body, y)

  y = _vary_like(_varying(x) | _varying(w),
                 zeros_after(jax.ShapeDtypeStruct((n_blocks * bs, n_full), out_dtype), x))
  return jax.lax.fori_loop(0, n_groups, group, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gmm_gathered(fp8, axes, dim, x, w, block_group, n_used):
  return _gathered_forward(fp8, axes, dim, x, w, block_group, n_used)


def _gathered_fwd(fp8, axes, dim, x, w, block_group, n_used):
  return (_gathered_forward(fp8, axes, dim, x, w, block_group, n_used),
          (x, w, block_group, n_used))


def _gathered_bwd(fp8, axes, dim, res, dy):
  """Per group g: its weight gathered again for dx = dy w^T, and
  dw[g] = sum over its blocks of x^T dy (float32), reduce-scattered back
  to this device's slice (the all-gather's transpose)."""
  x, w, block_group, n_used = res
  n_blocks, n_groups = block_group.shape[0], w.shape[0]
  bs, k_full, n_full, c = _gathered_sizes(x, w, block_group, axes, dim)
  dy = dy.astype(x.dtype) if fp8 else dy
  vary = _varying(x) | _varying(dy) | _varying(w)
  lo, hi = _group_spans(block_group, n_used, n_groups)

  def group(g, carry):
    dx, dw = carry
    wg = _gather_group(w, g, axes, dim)
    wc = jnp.broadcast_to(wg, (c, k_full, n_full))

    def body(s, keep, carry):
      dx, acc = carry
      xc = _rows(x, s, c, bs).reshape(c, bs, -1)
      dyc = jnp.where(keep[:, None, None], _rows(dy, s, c, bs).reshape(c, bs, -1), 0)
      dxc = jnp.where(keep[:, None, None], _dx_chunk(xc, wc, dyc, fp8),
                      _rows(dx, s, c, bs).reshape(c, bs, -1))
      dx = jax.lax.dynamic_update_slice_in_dim(dx, dxc.reshape(c * bs, -1), s * bs, axis=0)
      return dx, acc + _dw_chunk(xc, wg, dyc, fp8)
    acc = _vary_like(vary, jnp.zeros((k_full, n_full), jnp.float32))
    dx, acc = _group_blocks(g, lo, hi, n_blocks, c, body, (dx, acc))
    part = jax.lax.psum_scatter(acc, axes, scatter_dimension=dim - 1, tiled=True)
    return dx, jax.lax.dynamic_update_index_in_dim(dw, part.astype(dw.dtype), g, axis=0)

  init = _vary_like(vary, zeros_after((x, jax.ShapeDtypeStruct(w.shape, w.dtype)), dy))
  dx, dw = jax.lax.fori_loop(0, n_groups, group, init)
  return dx, dw, None, None


_gmm_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _varying(a) -> frozenset:
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def _vary_like(axes: frozenset, tree):
  def cast(a):
    missing = tuple(sorted(axes - _varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a
  return jax.tree.map(cast, tree)


def gmm(x: jax.Array, w, block_group: jax.Array, n_used, *, fp8: bool = False,
        gather_axes: tuple[str, ...] = (), gather_dim: int = 1) -> jax.Array:
  """y[blk] = x[blk] @ w[block_group[blk]] per block of rows (see module doc).

  x [n_blocks * bs, K]; w [G, K, N] (or `fp8.Quantized` q [G, K', N'] with
  fp8=True); block_group [n_blocks] int in [0, G); n_used: blocks in use.
  Returns [n_blocks * bs, N] (x's dtype with fp8), rows of unused blocks 0.
  gather_axes (inside `jax.shard_map` only): w is this device's slice of the
  weights, split along dim `gather_dim` (1: K, 2: N) over these mesh axes
  (FSDP); each group's weight is gathered whole one group at a time (module
  doc, "Sharded weights").
  """
  x, w, block_group = jax.tree.map(jnp.asarray, (x, w, block_group))
  wa = _weight_array(w)
  n_blocks = block_group.shape[0]
  k = wa.shape[1] * (math.prod(jax.lax.axis_size(a) for a in gather_axes)
                     if gather_dim == 1 else 1)
  if x.ndim != 2 or wa.ndim != 3 or x.shape[0] % max(n_blocks, 1) or \
      (not fp8 and x.shape[1] != k):
    raise ValueError(f"gmm: x [n_blocks * bs, K], w [G, K, N], block_group [n_blocks] "
                     f"expected; got x {x.shape}, w {wa.shape}, block_group "
                     f"{block_group.shape}.")
  axes = _varying(x) | frozenset().union(*(_varying(a) for a in jax.tree.leaves(w)))
  x, w = _vary_like(axes, (x, w))
  block_group, n_used = block_group.astype(jnp.int32), jnp.asarray(n_used, jnp.int32)
  if gather_axes:
    w = plain_weight(w)       # gathered per group: the bits would not be read
    if isinstance(w, fp8_lib.Quantized) or gather_dim not in (1, 2):
      raise ValueError("gmm: gather_axes needs a plain weight array and gather_dim 1 or 2.")
    return _gmm_gathered(bool(fp8), tuple(gather_axes), gather_dim, x, w, block_group,
                         n_used)
  return _gmm(bool(fp8), x, w, block_group, n_used)
