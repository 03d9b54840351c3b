"""Blockwise (FlashAttention-2 style) attention equals the naive [s, s] form.

Oracles: the naive path (scores + additive bias; its recomputing backward
against autodiff of a jax.nn.softmax reference)
and, for the mask itself, a float64 NumPy loop over rows. The memory test
compiles without running and reads XLA's temporary bytes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer
from deepseek_jax.model.attention import (attention_bias, attention_mask, blockwise_attention,
                                          naive_attention)
from random_weights import random_variables

B, H, S, DK, DV = 2, 3, 37, 24, 16


@pytest.fixture(scope="module")
def inputs():
  """q (scaled), k, v, an output weighting w (so the loss is not a plain sum),
  and segment ids: row 0 two documents then padding (segment 0), row 1 one
  document then padding."""
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(B, H, S, DK)), jnp.float32) for _ in range(2))
  v, w = (jnp.asarray(rng.normal(size=(B, H, S, DV)), jnp.float32) for _ in range(2))
  seg = np.ones((B, S), np.int32)
  seg[0, 10:25], seg[0, 25:], seg[1, 30:] = 2, 0, 0
  return q, k, v, w, jnp.asarray(seg)


def _naive(q, k, v, seg):
  return naive_attention(q, k, v, attention_bias(seg), jnp.float32)


def _blockwise(block_q, block_k):
  return lambda q, k, v, seg: blockwise_attention(q, k, v, seg, seg, block_q=block_q,
                                                  block_k=block_k)


@functools.lru_cache(maxsize=None)
def _value_and_grads(attn):
  def loss(q, k, v, w, seg):
    o = attn(q, k, v, seg)
    return (o * w).sum(), o
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


def test_naive_path_matches_a_float64_loop_over_rows(inputs):
  """The mask, spelled out: key j serves query i iff j <= i and the segment
  ids agree (padding rows, segment 0, attend to earlier padding)."""
  q, k, v, _, seg = (np.asarray(x, np.float64) for x in inputs)
  want = np.zeros((B, H, S, DV))
  for b in range(B):
    for i in range(S):
      keys = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
      logits = np.einsum("hd,hkd->hk", q[b, :, i], k[b][:, keys])
      p = np.exp(logits - logits.max(-1, keepdims=True))
      want[b, :, i] = np.einsum("hk,hkd->hd", p / p.sum(-1, keepdims=True), v[b][:, keys])
  np.testing.assert_allclose(_naive(*inputs[:3], inputs[4]), want, atol=1e-5)


def _softmax_reference(q, k, v, seg):
  """Attention as jax.nn.softmax spells it; its gradient is plain autodiff."""
  scores = jnp.einsum("bhsk,bhtk->bhst", q, k) + attention_bias(seg)
  return jnp.einsum("bhst,bhtk->bhsk", jax.nn.softmax(scores, axis=-1), v)


def test_naive_recomputing_backward_matches_autodiff(inputs):
  """naive_attention's custom VJP (P recomputed from the saved logsumexp)
  against autodiff of the softmax reference: dq, dk, dv."""
  (_, want), want_grads = _value_and_grads(_softmax_reference)(*inputs)
  (_, got), got_grads = _value_and_grads(_naive)(*inputs)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for name, g, g0 in zip(("dq", "dk", "dv"), got_grads, want_grads):
    np.testing.assert_allclose(g, g0, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("block_q,block_k", [(8, 8), (5, 16), (16, 4), (37, 37), (64, 64),
                                             (1, 1)])
def test_blockwise_matches_naive_output_and_gradients(inputs, block_q, block_k):
  """Packed documents, padding rows, S = 37 not a multiple of any block
  (and blocks larger than S: clamped, one tile)."""
  q, k, v, w, seg = inputs
  (_, want), want_grads = _value_and_grads(_naive)(q, k, v, w, seg)
  (_, got), got_grads = _value_and_grads(_blockwise(block_q, block_k))(q, k, v, w, seg)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for name, g, g0 in zip(("dq", "dk", "dv"), got_grads, want_grads):
    np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-5, err_msg=name)


def test_key_blocks_past_the_diagonal_are_never_read(inputs):
  """Causal skipping, observed with NaN poison (blocks of 8). A tile that
  is visited but wholly masked still turns NaN into NaN (0 * NaN in the
  value product; p * (dP - D) with D = NaN in the backward), so:
    forward: NaN keys/values in blocks >= 1 leave query block 0 exact;
    backward: NaN queries in block 0 (hence NaN o, D there) leave dk, dv of
      key blocks >= 1 exact: only key block 0 visits query block 0."""
  q, k, v, w, seg = inputs
  blk = 8
  o = _blockwise(blk, blk)(q, k.at[:, :, blk:].set(jnp.nan), v.at[:, :, blk:].set(jnp.nan),
                           seg)
  np.testing.assert_allclose(o[:, :, :blk], _naive(q, k, v, seg)[:, :, :blk], atol=1e-5)
  assert np.all(np.isnan(o[:, :, blk:]))      # every later row sees its own NaN key

  nan_q = q.at[:, :, :blk].set(jnp.nan)
  _, (dq, dk, dv) = _value_and_grads(_blockwise(blk, blk))(nan_q, k, v, w, seg)
  _, (dq0, dk0, dv0) = _value_and_grads(_naive)(q, k, v, w, seg)
  for g, g0 in ((dq, dq0), (dk, dk0), (dv, dv0)):
    assert np.all(np.isnan(g[:, :, :blk]))
    np.testing.assert_allclose(g[:, :, blk:], g0[:, :, blk:], atol=1e-5, rtol=1e-5)


def test_bfloat16_blockwise_tracks_float32_naive(inputs):
  """q, k, v in bfloat16 (softmax statistics and accumulation in float32):
  the float32 result on the same (rounded) inputs, to bfloat16 rounding of
  the probabilities and the output; output in bfloat16."""
  q, k, v, _, seg = inputs
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  want = _naive(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
  got = jax.jit(_blockwise(8, 8))(q, k, v, seg)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2, rtol=1e-2)


def test_attention_mask_picks_the_path_by_sequence_length():
  cfg = get_preset("tiny", attn_block_size=8)
  seg = jnp.ones((2, 8), jnp.int32)
  np.testing.assert_array_equal(attention_mask(cfg, seg).bias, attention_bias(seg))
  assert attention_mask(cfg, jnp.ones((2, 9), jnp.int32)).bias is None
  assert attention_mask(cfg.replace(attn_block_size=0),
                        jnp.ones((2, 200), jnp.int32)).bias is not None
  with pytest.raises(ValueError, match="attn_block_size=-1"):
    cfg.replace(attn_block_size=-1)


# ---------------------------------------------------------------------------
# The model with blockwise attention = the model with naive attention

@pytest.fixture(scope="module")
def model():
  """tiny (a dense block, an MoE block, MTP), random weights; a batch of 20
  tokens per row: row 0 two documents with positions restarting, row 1 a
  document then padding."""
  cfg = get_preset("tiny", n_layers=2, attn_block_size=0)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
  seg = jnp.asarray([[1] * 7 + [2] * 13, [1] * 15 + [0] * 5], jnp.int32)
  pos = jnp.asarray([list(range(7)) + list(range(13)), list(range(20))], jnp.int32)
  return cfg, random_variables(cfg, seed=0), tokens, seg, pos


def _train_loss_and_grads(cfg, variables, tokens, seg, pos):
  w = jax.random.normal(jax.random.key(2), tokens.shape + (cfg.vocab_size,))

  def loss(params):
    logits, aux = Transformer(cfg).apply({**variables, "params": params}, tokens,
                                         targets=tokens, segment_ids=seg, positions=pos,
                                         return_aux=True)
    return (logits * w).sum() + (aux["mtp_logits"] * w).sum(), logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_transformer_with_blockwise_attention_matches_naive(model):
  """Training forward and every parameter's gradient, blocks of 6 over 20
  tokens (the last tile padded)."""
  cfg, variables, tokens, seg, pos = model
  (_, want), want_grads = _train_loss_and_grads(cfg, variables, tokens, seg, pos)
  (_, got), got_grads = _train_loss_and_grads(cfg.replace(attn_block_size=6),
                                              variables, tokens, seg, pos)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                           jax.tree.leaves(want_grads)):
    scale = float(np.abs(g0).max()) or 1.0
    np.testing.assert_allclose(g / scale, g0 / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_prefill_with_blockwise_attention_matches_naive(model):
  """Inference prefill takes the same switch: logits, final hidden state and
  the cache entries of every layer agree."""
  cfg, variables, tokens, seg, pos = model
  run = lambda c: jax.jit(functools.partial(Transformer(c).apply, mode="prefill"))(
      variables, tokens, segment_ids=seg, positions=pos)
  want, got = run(cfg), run(cfg.replace(attn_block_size=8))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------
# Memory: linear in the sequence length

def _temp_bytes(attn, heads: int, seq: int) -> int:
  """XLA's temporary bytes of value_and_grad(attention), compiled, not run."""
  f32 = lambda d: jax.ShapeDtypeStruct((1, heads, seq, d), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  fn = jax.value_and_grad(lambda q, k, v, s: attn(q, k, v, s).sum(), (0, 1, 2))
  compiled = jax.jit(fn).lower(f32(192), f32(192), f32(128), seg).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_temporaries_grow_linearly_with_sequence():
  """MLA's head dims (dk = 192, dv = 128), 16 heads, float32: doubling the
  sequence from 4096 to 8192 doubles blockwise temporaries at most (tiles
  are fixed; measured 1.3x), while the naive form's grow 4x (2 -> 8 GiB)."""
  block = [_temp_bytes(_blockwise(256, 256), 16, s) for s in (4096, 8192)]
  naive = [_temp_bytes(_naive, 16, s) for s in (4096, 8192)]
  assert block[1] <= 2.2 * block[0], block
  assert naive[1] >= 3.9 * naive[0], naive
  assert block[1] < naive[0] / 8, (block, naive)
