"""FP8 recipe (deepseek_jax/fp8) against independent oracles.

Oracles: loop-by-loop NumPy transcriptions using ml_dtypes' float8 types
(quantization: bit-exact; the promoted per-128-K-block dot and the V3
backward GEMMs: float64 sums of the same FP8 values and scales), float32
matmuls (error bounds), and jax.grad of a straight-through emulated forward.
"""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import fp8
from deepseek_jax.fp8 import dot as dot_lib

F8 = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
T = 128


def np_scale(amax, fmax, pow2):
  if amax == 0:
    return np.float32(1.0)
  s = np.float32(np.float32(amax) * np.float32(1.0 / fmax))
  if pow2:
    s = np.float32(2.0 ** np.ceil(np.log2(np.float64(s))))
  return s


def np_tiles(x, fmt="e4m3", pow2=False):
  """1 x 128 tiles along the last axis of a 2-D x, element by element."""
  dtype, fmax = F8[fmt]
  rows, cols = x.shape
  nt = -(-cols // T)
  q = np.zeros((rows, nt * T), dtype)
  s = np.ones((rows, nt), np.float32)
  for r in range(rows):
    for t in range(nt):
      tile = np.zeros(T, np.float32)
      chunk = np.asarray(x[r, t * T:(t + 1) * T], np.float32)
      tile[:len(chunk)] = chunk
      s[r, t] = np_scale(np.abs(tile).max(), fmax, pow2)
      q[r, t * T:(t + 1) * T] = np.clip(tile / s[r, t], -fmax, fmax).astype(dtype)
  return q, s


def np_blocks(w, fmt="e4m3", pow2=False):
  dtype, fmax = F8[fmt]
  k, n = w.shape
  kb, nb = -(-k // T), -(-n // T)
  wp = np.zeros((kb * T, nb * T), np.float32)
  wp[:k, :n] = w
  q = np.zeros_like(wp, dtype=dtype)
  s = np.ones((kb, nb), np.float32)
  for i in range(kb):
    for j in range(nb):
      blk = wp[i * T:(i + 1) * T, j * T:(j + 1) * T]
      s[i, j] = np_scale(np.abs(blk).max(), fmax, pow2)
      q[i * T:(i + 1) * T, j * T:(j + 1) * T] = np.clip(blk / s[i, j], -fmax, fmax).astype(dtype)
  return q, s


def np_promoted(xq, xs, wq, ws):
  """y[m, n] = sum_b xs[m,b] ws[b,n//128] sum_{k in b} xq[m,k] wq[k,n], float64."""
  xq, wq = xq.astype(np.float64), wq.astype(np.float64)
  m, kp = xq.shape
  y = np.zeros((m, wq.shape[1]))
  for b in range(kp // T):
    part = xq[:, b * T:(b + 1) * T] @ wq[b * T:(b + 1) * T]
    y += part * xs[:, b:b + 1] * np.repeat(ws[b], T)[None, :wq.shape[1]]
  return y


def np_fp8_linear(x, w, dy):
  """The V3 recipe's forward, dgrad and wgrad for x [M, K], w [K, N], dy [M, N]."""
  (m, k), n = x.shape, w.shape[1]
  xq, xs = np_tiles(x)
  wq, ws = np_blocks(w)
  y = np_promoted(xq, xs, wq, ws)[:, :n]
  dyq, dys = np_tiles(dy)                               # along N
  dx = np_promoted(dyq, dys, wq.T, ws.T)[:, :k]
  x_deq = (xq.astype(np.float32) * np.repeat(xs, T, axis=1))          # stored FP8 input
  xmq, xms = np_tiles(np.ascontiguousarray(x_deq.T))    # 128 x 1 tiles along M
  dymq, dyms = np_tiles(np.ascontiguousarray(dy.T))
  mp = xmq.shape[1]
  dw = np.zeros((x_deq.shape[1], n))
  for b in range(mp // T):
    part = xmq[:, b * T:(b + 1) * T].astype(np.float64) @ dymq[:, b * T:(b + 1) * T].astype(
        np.float64).T
    dw += part * xms[:, b:b + 1] * dyms[None, :, b]
  return y, dx, dw[:k]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e4m3", True), ("e5m2", False)])
def test_tile_and_block_quantization_is_bit_exact(fmt, pow2):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((6, 300)) * np.exp(rng.uniform(-8, 8, (6, 1)))).astype(np.float32)
  x[2, 128:256] = 0.0                                    # an all-zero tile
  x[4, 5] = 1e30                                         # would overflow E4M3 unclipped
  got = fp8.quantize_tiles(jnp.asarray(x), fmt=fmt, pow2=pow2)
  q, s = np_tiles(x, fmt, pow2)
  assert got.q.shape == (6, 384) and got.scale.shape == (6, 3)
  np.testing.assert_array_equal(np.asarray(got.q).view(np.uint8), q.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(got.scale), s)
  assert s[2, 1] == 1.0 and not np.asarray(got.q.astype(jnp.float32))[2, 128:256].any()
  assert np.isfinite(np.asarray(got.q.astype(jnp.float32))).all()
  if pow2:   # UE8M0: powers of two, and the largest element in [fmax/2, fmax] after rounding
    assert np.all(np.log2(s) == np.round(np.log2(s)))
    amax = np.abs(np.asarray(got.q.astype(jnp.float32))).reshape(6, 3, T).max(-1)
    assert np.all((amax >= F8[fmt][1] / 2) | (amax == 0))   # 225 rounds to 224
  w = rng.standard_normal((200, 130)).astype(np.float32)
  got = fp8.quantize_blocks(jnp.asarray(w), fmt=fmt, pow2=pow2)
  q, s = np_blocks(w, fmt, pow2)
  np.testing.assert_array_equal(np.asarray(got.q).view(np.uint8), q.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(got.scale), s)
  deq = np.asarray(fp8.dequantize_blocks(got))[:200, :130]
  assert _rel(deq, w) < (0.04 if fmt == "e4m3" else 0.1)


def test_tiles_along_a_leading_axis_are_the_transposed_tiles():
  x = np.random.default_rng(1).standard_normal((300, 7)).astype(np.float32)
  a = fp8.quantize_tiles(jnp.asarray(x), axis=0)
  b = fp8.quantize_tiles(jnp.asarray(x.T), axis=-1)
  np.testing.assert_array_equal(np.asarray(a.q.astype(jnp.float32)).T,
                                np.asarray(b.q.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(a.scale).T, np.asarray(b.scale))


def test_fp8_dot_forward_and_backward_follow_the_v3_recipe_exactly():
  """Against the NumPy transcription: same FP8 values and scales, float64 sums."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 75, 300)).astype(np.float32)   # M = 150: one partial M tile
  w = (rng.standard_normal((300, 200)) * 0.05).astype(np.float32)
  dy = rng.standard_normal((2, 75, 200)).astype(np.float32)
  y, vjp = jax.vjp(lambda a, b: fp8.fp8_dot(a, b, backend="emulated"), x, w)
  dx, dw = vjp(jnp.asarray(dy))
  ry, rdx, rdw = np_fp8_linear(x.reshape(150, 300), w, dy.reshape(150, 200))
  assert y.dtype == jnp.float32 and y.shape == (2, 75, 200)
  np.testing.assert_allclose(np.asarray(y).reshape(150, 200), ry, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(dx).reshape(150, 300), rdx, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(dw), rdw, rtol=2e-5, atol=2e-4)
  # ...and all three stay close to the float32 GEMMs.
  assert _rel(y, x @ w) < 0.05
  assert _rel(dx, dy @ w.T) < 0.05
  assert _rel(dw, x.reshape(150, 300).T @ dy.reshape(150, 200)) < 0.05


def test_outlier_tokens_need_fine_grained_scales():
  """Tokens 1e4x (and 1e5x) larger than the rest (V3 sec. 3.3.1). fp8_dot
  stays within 5e-2 of float32. Quantizing only the activations (w kept in
  float32) with one scale per tensor, the normal tokens fall into E4M3's
  subnormals or flush to zero; 1x128 tiles do not notice the outliers."""
  rng = np.random.default_rng(3)
  x0 = rng.standard_normal((256, 512)).astype(np.float32)
  w = (rng.standard_normal((512, 256)) * 0.05).astype(np.float32)
  normal = np.ones(256, bool)
  normal[::37] = False

  def activation_only(q):
    return np.asarray(q.q.astype(jnp.float32) * q.scale)[:, :512] @ w

  errors = {}
  for factor in (1e4, 1e5):
    x = x0.copy()
    x[::37] *= factor                                    # outlier tokens
    ref = x @ w
    y = np.asarray(fp8.fp8_dot(x, w, backend="emulated"))
    assert _rel(y, ref) <= 5e-2 and _rel(y[normal], ref[normal]) <= 5e-2
    qt = fp8.quantize_tiles(jnp.asarray(x))
    tiles = activation_only(fp8.Quantized(qt.q, jnp.repeat(qt.scale, 128, axis=1)))
    tensor = fp8.quantize_tensor(jnp.asarray(x))
    errors[factor] = (_rel(tiles[normal], ref[normal]),
                      _rel(activation_only(tensor)[normal], ref[normal]),
                      float((np.asarray(tensor.q.astype(jnp.float32))[normal] == 0).mean()))
  (tile4, tensor4, flushed4), (tile5, tensor5, flushed5) = errors[1e4], errors[1e5]
  assert max(tile4, tile5) < 0.03
  assert tensor4 > 1.5 * tile4 and flushed4 > 0.05, errors      # 6% of values flushed
  assert tensor5 > 10 * tile5 and flushed5 > 0.5, errors        # most of them


def test_custom_vjp_matches_grad_of_a_straight_through_emulated_forward():
  """jax.grad of quantize -> dequantize -> matmul with the rounding passed
  straight through: the same gradient up to the FP8 rounding of dy (and of
  x, w in the other GEMM)."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((64, 256)).astype(np.float32)
  w = (rng.standard_normal((256, 130)) * 0.05).astype(np.float32)

  def ste(a, q):
    return a + jax.lax.stop_gradient(q - a)

  def emulated(a, b):
    qa = fp8.quantize_tiles(a)
    qb = fp8.quantize_blocks(b)
    a_deq = fp8.dequantize_tiles(qa)[:, :a.shape[1]]
    b_deq = fp8.dequantize_blocks(qb)[:b.shape[0], :b.shape[1]]
    return ste(a, a_deq) @ ste(b, b_deq)

  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))        # noqa: E731
  got = jax.grad(loss(lambda a, b: fp8.fp8_dot(a, b, backend="emulated")), (0, 1))(x, w)
  want = jax.grad(loss(emulated), (0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape
    assert _rel(g, r) < 0.05


def test_grouped_dot_is_the_dot_per_group_and_differentiates():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 40, 64)).astype(np.float32)
  w = (rng.standard_normal((3, 64, 48)) * 0.1).astype(np.float32)
  got = jax.jit(lambda a, b: fp8.fp8_grouped_dot(a, b, backend="emulated"))(x, w)
  single = jax.jit(lambda a, b: fp8.fp8_dot(a, b, backend="emulated"))
  for g in range(3):
    np.testing.assert_allclose(np.asarray(got[g]), np.asarray(single(x[g], w[g])),
                               rtol=1e-6, atol=1e-6)
  gx, gw = jax.jit(jax.grad(lambda a, b: fp8.fp8_grouped_dot(a, b, backend="emulated").sum(),
                            (0, 1)))(x, w)
  assert _rel(gw, jnp.einsum("gmk,gmn->gkn", x, jnp.ones((3, 40, 48)))) < 0.05
  assert gx.shape == x.shape


def test_prequantized_weights_are_used_as_is_and_frozen():
  """A Quantized(q, scale) weight (published FP8 blocks, unpadded) gives the
  same fprop and dgrad as quantizing the float weight inside, bit for bit,
  when the blocks are those quantize_blocks makes; its own gradient is 0."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal((3, 50, 300)).astype(np.float32)
  w = (rng.standard_normal((300, 200)) * 0.05).astype(np.float32)
  qb = fp8.quantize_blocks(jnp.asarray(w))
  blocks = fp8.Quantized(qb.q[:300, :200], qb.scale)      # as a checkpoint stores them
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_weight(blocks)),
                                np.asarray(fp8.dequantize_blocks(qb))[:300, :200])
  dot = lambda a, b: fp8.fp8_dot(a, b, backend="emulated")        # noqa: E731
  y, vjp = jax.vjp(dot, x, w)
  yq, vjpq = jax.vjp(dot, x, blocks)
  dy = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(yq), np.asarray(y))
  (dx, _), (dxq, dblocks) = vjp(dy), vjpq(dy)
  np.testing.assert_array_equal(np.asarray(dxq), np.asarray(dx))
  assert not np.asarray(dblocks.q, np.float32).any() and not np.asarray(dblocks.scale).any()
  # grouped: per-group blocks
  wg = (rng.standard_normal((2, 64, 160)) * 0.1).astype(np.float32)
  qg = [fp8.quantize_blocks(jnp.asarray(a)) for a in wg]
  gblocks = fp8.Quantized(jnp.stack([q.q[:64, :160] for q in qg]),
                          jnp.stack([q.scale for q in qg]))
  xg = x[:2, :, :64]
  np.testing.assert_array_equal(
      np.asarray(fp8.fp8_grouped_dot(xg, gblocks, backend="emulated")),
      np.asarray(fp8.fp8_grouped_dot(xg, wg, backend="emulated")))
  with pytest.raises(ValueError, match="w.scale has shape \\(1, 1\\); a \\(300, 200\\) "
                     "weight in 128 x 128 blocks needs \\(3, 2\\)"):
    dot(x, fp8.Quantized(blocks.q, jnp.ones((1, 1))))
  with pytest.raises(ValueError, match="needs float8 values"):
    dot(x, fp8.Quantized(jnp.asarray(w), qb.scale))


def test_bad_requests_are_refused_with_the_reason():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  with pytest.raises(ValueError, match="backend='cuda' must be one of"):
    fp8.fp8_dot(x, w, backend="cuda")
  with pytest.raises(NotImplementedError, match="backend 'gpu'.*not built yet"):
    fp8.fp8_dot(x, w, backend="gpu")
  with pytest.raises(ValueError, match="disagree on K: x \\(4, 8\\), w \\(7, 3\\)"):
    fp8.fp8_dot(x, jnp.ones((7, 3)))
  with pytest.raises(ValueError, match="x has dtype int32"):
    fp8.fp8_dot(jnp.ones((4, 8), jnp.int32), w, backend="emulated")
  with pytest.raises(ValueError, match="fp8 format 'e3m4' must be one of"):
    fp8.fp8_dot(x, w, fmt="e3m4", backend="emulated")
  with pytest.raises(ValueError, match="x \\[G, M, K\\] and w \\[G, K, N\\] expected"):
    fp8.fp8_grouped_dot(x, w)


def test_auto_backend_emulates_and_says_so_once(monkeypatch):
  monkeypatch.setattr(dot_lib, "_warned_auto", [])
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = fp8.fp8_dot(x, w)
    b = fp8.fp8_dot(x, w)
  assert len([c for c in caught if "exact emulation" in str(c.message)]) == 1
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(fp8.fp8_dot(x, w, backend="emulated")))


# ---------------------------------------------------------------------------
# The model switch (ModelConfig.fp8)
def test_fp8_einsum_is_fp8_dot_on_the_flattened_contraction():
  """Oracle: transposes and reshapes written out by hand for each projection
  form the model uses (wo contracts a heads-major (heads, v) pair)."""
  from deepseek_jax.model.layers import fp8_einsum
  rng = np.random.default_rng(6)
  b, s, h, k, d, r = 2, 5, 3, 8, 16, 12
  dot = lambda a, w: fp8.fp8_dot(a, w, backend="emulated")        # noqa: E731
  o = rng.standard_normal((b, h, s, k)).astype(np.float32)          # wo: "bhsk,hkd->bsd"
  wo = rng.standard_normal((h, k, d)).astype(np.float32)
  want = dot(o.transpose(0, 2, 1, 3).reshape(b, s, h * k), wo.reshape(h * k, d))
  np.testing.assert_array_equal(np.asarray(fp8_einsum("bhsk,hkd->bsd", o, wo)), want)
  c = rng.standard_normal((b, s, r)).astype(np.float32)             # wq_b: "bsr,rhk->bhsk"
  wq = rng.standard_normal((r, h, k)).astype(np.float32)
  want = np.asarray(dot(c, wq.reshape(r, h * k))).reshape(b, s, h, k).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(np.asarray(fp8_einsum("bsr,rhk->bhsk", c, wq)), want)
  x = rng.standard_normal((4, b, s, d)).astype(np.float32)          # MLP: "...d,df->...f"
  w1 = rng.standard_normal((d, r)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(fp8_einsum("...d,df->...f", x, w1)), dot(x, w1))


def test_fp8_model_quantizes_exactly_the_v3_layers(monkeypatch):
  """Recorded kernel shapes of every FP8 GEMM in one forward of the tiny
  preset: MLA projections, dense/shared MLPs and the routed experts; never
  the embedding, the output head, the MoE gate or MTP's eh_proj."""
  from deepseek_jax import get_preset
  from deepseek_jax.model import Transformer, init_variables
  cfg = get_preset("tiny", inter_dim=96)       # dim 64: no MLP shape equals eh_proj [128, 64]
  seen = []
  real_dot, real_grouped = fp8.fp8_dot, fp8.fp8_grouped_dot
  monkeypatch.setattr(fp8, "fp8_dot", lambda x, w, **kw: seen.append(w.shape) or real_dot(
      x, w, backend="emulated"))
  monkeypatch.setattr(fp8, "fp8_grouped_dot", lambda x, w, **kw: seen.append(
      ("grouped",) + w.shape[1:]) or real_grouped(x, w, backend="emulated"))
  variables = init_variables(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  ref = jax.jit(Transformer(cfg).apply)(variables, tokens)
  out = jax.jit(Transformer(cfg.replace(fp8=True)).apply)(variables, tokens)
  d, h = cfg.dim, cfg.n_heads
  qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  attn = {(d, cfg.q_lora_rank), (cfg.q_lora_rank, h * qk),
          (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
          (cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
          (h * cfg.v_head_dim, d)}
  mlp = {(d, cfg.inter_dim), (cfg.inter_dim, d),
         (d, cfg.n_shared_experts * cfg.moe_inter_dim), (cfg.n_shared_experts * cfg.moe_inter_dim, d)}
  experts = {("grouped", d, cfg.moe_inter_dim), ("grouped", cfg.moe_inter_dim, d)}
  assert set(seen) == attn | mlp | experts
  assert (d, cfg.vocab_size) not in seen and (d, cfg.n_routed_experts) not in seen
  assert (2 * d, d) not in seen                                   # MTP eh_proj
  assert _rel(out, ref) < 0.15                                     # same model, FP8 noise
  seen.clear()
  jax.eval_shape(Transformer(cfg.replace(fp8=True, fp8_layers="experts")).apply, variables,
                 tokens)
  assert set(seen) == experts


def test_fp8_train_step_learns_and_bad_settings_are_refused():
  from deepseek_jax import get_preset
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import init_train_state, make_train_step
  sys_path_bench()
  from train_throughput import random_batch
  cfg = get_preset("tiny", fp8=True, n_mtp_depth=0)
  tcfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=0, lr=3e-3,
                     fast_compile=True)
  state = init_train_state(cfg, tcfg, jax.random.key(0))
  step = make_train_step(cfg, tcfg)
  batch = random_batch(cfg.vocab_size, 4, 32, 0)
  losses = []
  for _ in range(4):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  with pytest.raises(ValueError, match="moe_impl='ragged' has no FP8 path"):
    get_preset("tiny", fp8=True, moe_impl="ragged")
  with pytest.raises(ValueError, match="fp8_layers a comma-separated subset"):
    get_preset("tiny", fp8=True, fp8_layers="attn,head")


def sys_path_bench():
  import os
  import sys
  bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
  if bench not in sys.path:
    sys.path.insert(0, bench)
