"""Causal, same-document softmax attention: the naive form and a blockwise one.

Both compute, per batch row and head, for queries q [s, dk] (already scaled),
keys k [t, dk] and values v [t, dv]:

  o_i = sum_j p_ij v_j,   p_ij = exp(q_i . k_j) / sum_j' exp(q_i . k_j')
        over the keys j allowed to query i: j <= i (index within the row)
        and segment_ids[j] == segment_ids[i] (the same packed document;
        segment 0, padding, is compared like any other id, as it always was)

  naive      scores [b, h, s, t] float32 plus an additive bias [b, 1, s, t]
             (`attention_bias`, built once per forward pass), one softmax,
             one value product. Its gradient holds two [b, h, s, t] float32
             arrays: temporaries ~ (2 + 1/h) x 4 b h s t bytes, 16 GiB per
             layer for one 4K row of V3's 128 heads (1 TiB at 32K).
  blockwise  FlashAttention-2 (Dao 2023) in plain JAX: q in blocks of
             `block_q` rows, and for each the key blocks up to its diagonal
             (key blocks wholly in the future are never visited: ~half the
             FLOPs of the full square), with an online softmax: a running
             row max m, normaliser l and output accumulator, rescaled by
             exp(m_old - m_new) as each key block arrives. The backward
             (`jax.custom_vjp`) keeps only o and the row logsumexp
             L = m + log l, and recomputes each tile's P = exp(S - L):
               dV_j += P^T dO_i      dP = dO_i V_j^T
               dS = P * (dP - D_i),  D = rowsum(dO * O)
               dQ_i += dS K_j        dK_j += dS^T Q_i
             Blocks are dynamic slices of the [b, h, s, d] arrays (padded
             only when s is not a multiple), so the temporaries are a few
             [b, h, block_q, block_k] float32 tiles plus O(b h s) per-row
             vectors and the float32 dQ: linear in s. Measured (value_and_grad
             compiled, dk 192, dv 128, h 128, f32, blocks 256): 500 MiB at
             s = 4096, 760 MiB at 8192 (naive: 16 and 64 GiB).

`attention_mask(cfg, segment_ids)` is what the model builds once per forward
pass and hands to every layer: the segment ids, and the naive path's bias
when the sequence is short enough to take it (s <= cfg.attn_block_size, or
attn_block_size = 0), where it is also the faster one on CPU. Softmax
statistics are float32; q, k, v stay in the model dtype, products
accumulate in float32.

Not `jax.nn.dot_product_attention`: its (public) checks require the value
head dim to equal the key's (MLA: 192 vs 128), it takes packed documents only
as a dense [b, h|1, s, t] mask, and off cuDNN it is the naive form. cuDNN's
own MLA and packed-sequence support sits behind a private module
(jax._src.cudnn), so GPUs run the blockwise path too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.grouped_matmul import loop_trips

# Masked logits: large and finite, so exp() of a masked logit minus any row
# max is exactly 0 and no row can turn into NaN.
NEG_INF = -1e30


class AttentionMask(NamedTuple):
  """What training / prefill attention needs about the batch layout.

  segment_ids [b, s] int (0 = padding); bias [b, 1, s, s] float32 when the
  naive path runs (short sequences), else None (the blockwise path)."""
  segment_ids: jax.Array
  bias: jax.Array | None


def use_blockwise(cfg: ModelConfig, seq: int) -> bool:
  """Blockwise for sequences longer than cfg.attn_block_size (0 = never)."""
  return 0 < cfg.attn_block_size < seq


def attention_bias(segment_ids: jax.Array) -> jax.Array:
  """Additive causal, same-document mask [batch, 1, q, k] from segment ids.

  0 where query q may attend key k (same segment, k <= q), a large negative
  number elsewhere. The diagonal is always allowed.
  """
  seq = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  allowed = (causal[None] & same_doc)[:, None]
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


def attention_mask(cfg: ModelConfig, segment_ids: jax.Array) -> AttentionMask:
  """The mask every layer of one forward pass shares (module doc)."""
  blockwise = use_blockwise(cfg, segment_ids.shape[1])
  return AttentionMask(segment_ids, None if blockwise else attention_bias(segment_ids))


def causal_attention(cfg: ModelConfig, q, k, v, mask: AttentionMask,
                     keep: jax.Array | None = None) -> jax.Array:
  """q [b, h, s, dk] (scaled), k [b, h, s, dk], v [b, h, s, dv] -> [b, h, s, dv]:
  the naive path when `mask` carries a bias, else the blockwise one. keep
  (bool [b, s, s], DeepSeek Sparse Attention's selection): only those keys
  besides, on either path."""
  if mask.bias is not None:
    bias = mask.bias if keep is None else jnp.where(keep[:, None], mask.bias, NEG_INF)
    return naive_attention(q, k, v, bias, cfg.dtype)
  block = cfg.attn_block_size
  return blockwise_attention(q, k, v, mask.segment_ids, mask.segment_ids,
                             block_q=block, block_k=block, keep=keep)


def naive_attention(q, k, v, bias, dtype) -> jax.Array:
  """The [b, h, s, t] form (module doc); bias [b, 1, s, t] additive.

  Its backward (`jax.custom_vjp`, as the blockwise one) keeps o and the row
  logsumexp, not the [b, h, s, t] probabilities, and recomputes them: JAX's
  own VJP saved P per layer, a [layers, b, h, s, t] float32 stack the layer
  scan zero-fills and writes every step (measured on the CPU bench shape:
  the largest single op of the forward, 22 ms of a 1.2 s step)."""
  return _naive(q, k, v, bias, jnp.dtype(dtype))


def _naive_core(q, k, v, bias, dtype):
  """(o, lse [b, h, s] float32)."""
  scores = jnp.einsum("bhsk,bhtk->bhst", q, k).astype(jnp.float32) + bias
  m = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  # Softmax with the normalisation applied to the [b, h, s, d_v] output rather
  # than to the [b, h, s, s] probabilities: one pass fewer over the big array.
  p = jnp.exp(scores - m)
  l = p.sum(-1, keepdims=True)
  o = jnp.einsum("bhst,bhtk->bhsk", p.astype(dtype), v)
  return o / l.astype(o.dtype), (m + jnp.log(l))[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _naive(q, k, v, bias, dtype):
  return _naive_core(q, k, v, bias, dtype)[0]


def _naive_fwd(q, k, v, bias, dtype):
  o, lse = _naive_core(q, k, v, bias, dtype)
  return o, (q, k, v, bias, o, lse)


def _naive_bwd(dtype, res, do):
  """P = exp(S - L) recomputed; dV = P^T dO, dS = P * (dO V^T - D),
  D = rowsum(dO * O), dQ = dS K, dK = dS^T Q (module doc's blockwise
  equations on one tile). The bias (a mask) gets no gradient."""
  q, k, v, bias, o, lse = res
  scores = jnp.einsum("bhsk,bhtk->bhst", q, k).astype(jnp.float32) + bias
  p = jnp.exp(scores - lse[..., None])
  dv = jnp.einsum("bhst,bhsk->bhtk", p.astype(dtype), do).astype(v.dtype)
  dp = jnp.einsum("bhsk,bhtk->bhst", do, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
  ds = (p * (dp - delta)).astype(dtype)
  dq = jnp.einsum("bhst,bhtk->bhsk", ds, k).astype(q.dtype)
  dk = jnp.einsum("bhst,bhsk->bhtk", ds, q).astype(k.dtype)
  return dq, dk, dv, jnp.zeros_like(bias)


_naive.defvjp(_naive_fwd, _naive_bwd)


# ---------------------------------------------------------------------------
# Blockwise attention with a recomputing backward

def _pad(x, size: int, fill=0):
  """x [b, (h,) n, ...] with the sequence axis (1 for ids [b, s], 2 for
  [b, h, s, d]) padded with `fill` to a multiple of `size` (a no-op when it
  is one: no copy)."""
  axis = 1 if x.ndim == 2 else 2
  extra = -x.shape[axis] % size
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, constant_values=fill)


def _block(x, i, size: int):
  """Block i (rows i*size ...) of the sequence axis of x (as in _pad)."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1 if x.ndim == 2 else 2)


def _put(x, block, i, size: int):
  """x [b, h, s, ...] with block i of the sequence axis replaced by `block`."""
  return jax.lax.dynamic_update_slice_in_dim(x, block.astype(x.dtype), i * size, axis=2)


def _tile_mask(i, j, seg_q, seg_k, block_q: int, block_k: int, t: int, keep=None):
  """bool [b, 1, block_q, block_k]: key j*bk + c allowed for query i*bq + r.
  Padded keys (index >= t) never are; padded query rows (segment -1) see
  nothing. keep: the padded [b, s_pad, t_pad] selection (DSA), or None."""
  rows = i * block_q + jnp.arange(block_q)[:, None]
  cols = j * block_k + jnp.arange(block_k)[None, :]
  allowed = (cols <= rows) & (cols < t)
  mask = allowed[None, None] & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
  if keep is None:
    return mask
  tile = jax.lax.dynamic_slice(keep, (0, i * block_q, j * block_k),
                               (keep.shape[0], block_q, block_k))
  return mask & tile[:, None]


def _pad_keep(keep, block_q: int, block_k: int):
  """keep [b, s, t] padded with False to whole blocks (None stays None)."""
  if keep is None:
    return None
  return jnp.pad(keep, ((0, 0), (0, -keep.shape[1] % block_q), (0, -keep.shape[2] % block_k)))


def _mean_trips(trips: list[int]) -> int:
  """A causal loop's `loop_trips` hint: its trip count averaged over the
  outer loop's trips (the FLOPs counter multiplies by it)."""
  return max(1, round(sum(trips) / max(len(trips), 1)))


def _scores(q_i, k_j, mask):
  s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
  return jnp.where(mask, s, NEG_INF)


def _forward(q, k, v, seg_q, seg_k, keep, block_q: int, block_k: int):
  """(o [b, h, s_pad, dv] in q's dtype, lse [b, h, s_pad] f32), the sequence
  padded to whole blocks (padded rows: o = 0)."""
  t = k.shape[2]
  keep = _pad_keep(keep, block_q, block_k)
  q, seg_q = _pad(q, block_q), _pad(seg_q, block_q, -1)
  k, v, seg_k = _pad(k, block_k), _pad(v, block_k), _pad(seg_k, block_k, -1)
  (b, h, s_pad, _), d_v = q.shape, v.shape[-1]
  n_k = k.shape[2] // block_k

  def query_block(i, out):
    q_i, sq_i = _block(q, i, block_q), _block(seg_q, i, block_q)

    def key_block(j, carry):
      m, l, acc = carry
      mask = _tile_mask(i, j, sq_i, _block(seg_k, j, block_k), block_q, block_k, t, keep)
      s = _scores(q_i, _block(k, j, block_k), mask)              # [b, h, bq, bk]
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _block(v, j, block_k),
                      preferred_element_type=jnp.float32)
      return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    init = (jnp.full((b, h, block_q), NEG_INF, jnp.float32),
            jnp.zeros((b, h, block_q), jnp.float32),
            jnp.zeros((b, h, block_q, d_v), jnp.float32))
    # Key blocks holding an index <= the last row of this query block.
    n_seen = jnp.minimum(n_k, ((i + 1) * block_q + block_k - 1) // block_k)
    with loop_trips(_mean_trips([min(n_k, -(-(r + 1) * block_q // block_k))
                                 for r in range(s_pad // block_q)])):
      m, l, acc = jax.lax.fori_loop(0, n_seen, key_block, init)
    l = jnp.where(l == 0.0, 1.0, l)          # rows that see no key: o = 0, no NaN
    o, lse = out
    return _put(o, acc / l[..., None], i, block_q), _put(lse, m + jnp.log(l), i, block_q)

  out = (jnp.zeros((b, h, s_pad, d_v), q.dtype), jnp.zeros((b, h, s_pad), jnp.float32))
  return jax.lax.fori_loop(0, s_pad // block_q, query_block, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blockwise(q, k, v, seg_q, seg_k, keep, block_q, block_k):
  o, _ = _forward(q, k, v, seg_q, seg_k, keep, block_q, block_k)
  return o[:, :, :q.shape[2]]


def _blockwise_fwd(q, k, v, seg_q, seg_k, keep, block_q, block_k):
  o, lse = _forward(q, k, v, seg_q, seg_k, keep, block_q, block_k)
  return o[:, :, :q.shape[2]], (q, k, v, seg_q, seg_k, keep, o, lse)


def _blockwise_bwd(block_q, block_k, res, g):
  q0, k0, v0, seg_q, seg_k, keep, o, lse = res
  s, t = q0.shape[2], k0.shape[2]
  keep = _pad_keep(keep, block_q, block_k)
  q, do, seg_q = _pad(q0, block_q), _pad(g, block_q), _pad(seg_q, block_q, -1)
  k, v, seg_k = _pad(k0, block_k), _pad(v0, block_k), _pad(seg_k, block_k, -1)
  d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)     # [b, h, s_pad]
  n_q = q.shape[2] // block_q

  def key_block(j, grads):
    k_j, v_j, sk_j = _block(k, j, block_k), _block(v, j, block_k), _block(seg_k, j, block_k)

    def query_block(i, carry):
      dq, dk_j, dv_j = carry
      q_i, do_i = _block(q, i, block_q), _block(do, i, block_q)
      mask = _tile_mask(i, j, _block(seg_q, i, block_q), sk_j, block_q, block_k, t, keep)
      p = jnp.exp(_scores(q_i, k_j, mask) - _block(lse, i, block_q)[..., None])
      p = jnp.where(mask, p, 0.0)                                 # [b, h, bq, bk]
      dv_j = dv_j + jnp.einsum("bhqk,bhqd->bhkd", p.astype(do_i.dtype), do_i,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - _block(d, i, block_q)[..., None])).astype(q_i.dtype)
      dk_j = dk_j + jnp.einsum("bhqk,bhqd->bhkd", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bhqk,bhkd->bhqd", ds, k_j, preferred_element_type=jnp.float32)
      return _put(dq, _block(dq, i, block_q) + dq_i, i, block_q), dk_j, dv_j

    dq, dk, dv = grads
    # Query blocks holding a row >= the first key of block j (the rest are its past).
    first = (j * block_k) // block_q
    init = (dq, jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
    with loop_trips(_mean_trips([n_q - (c * block_k) // block_q
                                 for c in range(k.shape[2] // block_k)])):
      dq, dk_j, dv_j = jax.lax.fori_loop(first, n_q, query_block, init)
    return dq, _put(dk, dk_j, j, block_k), _put(dv, dv_j, j, block_k)

  grads = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, k.dtype),
           jnp.zeros(v.shape, v.dtype))
  dq, dk, dv = jax.lax.fori_loop(0, k.shape[2] // block_k, key_block, grads)
  return (dq[:, :, :s].astype(q.dtype), dk[:, :, :t], dv[:, :, :t], None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, segment_ids_q, segment_ids_k, *, block_q: int = 256,
                        block_k: int = 256, keep: jax.Array | None = None) -> jax.Array:
  """Causal same-segment attention in [block_q, block_k] tiles (module doc).

  q [b, h, s, dk] (already scaled), k [b, h, t, dk], v [b, h, t, dv];
  segment_ids_q [b, s], segment_ids_k [b, t] (>= 0; 0 = padding, matched
  like any id). Key j is allowed for query i iff j <= i and the ids agree
  (and keep[b, i, j], when keep, bool [b, s, t], is given: DeepSeek Sparse
  Attention's selection, read one tile at a time; a row keeping no key
  gives 0). s and t need not be multiples of the blocks. Returns
  [b, h, s, dv] in q's dtype."""
  if min(block_q, block_k) < 1:
    raise ValueError(f"block_q={block_q}, block_k={block_k} must be >= 1.")
  block_q, block_k = min(block_q, q.shape[2]), min(block_k, k.shape[2])   # no padding
  return _blockwise(q, k, v, segment_ids_q, segment_ids_k, keep, block_q, block_k)
