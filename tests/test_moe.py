"""DeepSeekMoE: router, dropless dispatch kernels and balance terms vs naive loops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import moe


def _cfg(**kw):
  base = dict(n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
              n_limited_groups=2, score_func="sigmoid", route_scale=2.5)
  base.update(kw)
  return get_preset("tiny", **base)


def naive_route(logits, bias, cfg):
  """V3 report eqs. 13-16 transcribed token by token, in float64."""
  logits = np.asarray(logits, np.float64)
  bias = np.asarray(bias, np.float64)
  n_exp, g, k = cfg.n_routed_experts, cfg.n_expert_groups, cfg.n_activated_experts
  per_group = n_exp // g
  all_gates, all_experts = [], []
  for row in logits:
    if cfg.score_func == "sigmoid":
      s = 1 / (1 + np.exp(-row))
    else:
      s = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    biased = s + bias
    allowed = set(range(n_exp))
    if g > 1:
      group_score = []
      for j in range(g):
        members = sorted(biased[j * per_group:(j + 1) * per_group], reverse=True)
        group_score.append(sum(members[:2]) if cfg.score_func == "sigmoid" else members[0])
      best_groups = sorted(range(g), key=lambda j: -group_score[j])[:cfg.n_limited_groups]
      allowed = {e for e in range(n_exp) if e // per_group in best_groups}
    chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
    gates = np.array([s[e] for e in chosen])
    if cfg.score_func == "sigmoid":
      gates = gates / gates.sum()
    all_gates.append(gates * cfg.route_scale)
    all_experts.append(chosen)
  return np.array(all_gates), np.array(all_experts)


@pytest.mark.parametrize("score_func,groups,limited", [
    ("sigmoid", 4, 2), ("sigmoid", 1, 1), ("softmax", 1, 1), ("softmax", 4, 1)])
def test_router_matches_paper_formulas_token_by_token(score_func, groups, limited):
  cfg = _cfg(score_func=score_func, n_expert_groups=groups, n_limited_groups=limited)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 8)).astype(np.float32)
  bias = rng.normal(scale=0.3, size=(8,)).astype(np.float32)
  gates, experts, _ = jax.jit(moe.route, static_argnums=2)(
      jnp.asarray(logits), jnp.asarray(bias), cfg)
  ref_gates, ref_experts = naive_route(logits, bias, cfg)
  # Compare as sets per token (top_k order is an implementation detail).
  for t in range(64):
    got = dict(zip(np.asarray(experts[t]).tolist(), np.asarray(gates[t]).tolist()))
    want = dict(zip(ref_experts[t].tolist(), ref_gates[t].tolist()))
    assert got.keys() == want.keys(), t
    np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=1e-5)


def test_router_bias_steers_selection_but_not_gate_values():
  cfg = _cfg()
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  bias = jnp.zeros((8,)).at[5].set(10.0)  # expert 5 always wins selection
  gates, experts, scores = moe.route(logits, bias, cfg)
  assert np.all(np.any(np.asarray(experts) == 5, axis=1))
  # Gates are the un-biased sigmoid scores, renormalised over the chosen experts.
  chosen = np.take_along_axis(np.asarray(scores), np.asarray(experts), 1)
  np.testing.assert_allclose(gates, chosen / chosen.sum(1, keepdims=True) * 2.5, rtol=1e-6)


def _naive_moe(x, experts, gates, w1, w3, w2):
  x, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x, w1, w3, w2))
  out = np.zeros_like(x)
  silu = lambda z: z / (1 + np.exp(-z))
  for t in range(x.shape[0]):
    for e, g in zip(np.asarray(experts[t]), np.asarray(gates[t])):
      h = silu(x[t] @ w1[e]) * (x[t] @ w3[e])
      out[t] += g * (h @ w2[e])
  return out


def _random_problem(n=40, d=16, f=8, n_exp=6, k=2, seed=0, skew=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  if skew:   # most tokens to expert 0, some experts empty: uneven groups
    experts = np.stack([np.zeros(n, int), rng.integers(1, 3, n)], 1)
  else:
    experts = np.stack([rng.permutation(n_exp)[:k] for _ in range(n)])
  gates = rng.uniform(size=(n, k)).astype(np.float32)
  w1, w3 = (rng.normal(size=(n_exp, d, f)).astype(np.float32) / 4 for _ in range(2))
  w2 = rng.normal(size=(n_exp, f, d)).astype(np.float32) / 3
  return x, experts.astype(np.int32), gates, w1, w3, w2


KERNELS = {
    "dense": moe.experts_dense,
    "ragged": moe.experts_ragged,
    "blocked_auto": moe.experts_blocked,
    "blocked_1": lambda *a: moe.experts_blocked(*a, block_size=1),
    "blocked_8": lambda *a: moe.experts_blocked(*a, block_size=8),
    "blocked_64": lambda *a: moe.experts_blocked(*a, block_size=64),
}


@pytest.mark.parametrize("kernel,skew", list(itertools.product(KERNELS, [False, True])))
def test_dropless_dispatch_matches_per_token_loop(kernel, skew):
  args = _random_problem(skew=skew)
  got = jax.jit(KERNELS[kernel])(*map(jnp.asarray, args))
  np.testing.assert_allclose(got, _naive_moe(*args), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", ["ragged", "blocked_8"])
def test_dispatch_gradients_match_dense_reference(kernel):
  x, experts, gates, w1, w3, w2 = map(jnp.asarray, _random_problem(skew=True, seed=3))

  def loss(fn, x, gates, w1, w3, w2):
    return jnp.sum(jnp.sin(fn(x, experts, gates, w1, w3, w2)))

  want = jax.jit(jax.grad(lambda *a: loss(moe.experts_dense, *a), argnums=range(5)))(
      x, gates, w1, w3, w2)
  got = jax.jit(jax.grad(lambda *a: loss(KERNELS[kernel], *a), argnums=range(5)))(
      x, gates, w1, w3, w2)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_sequence_balance_loss_matches_hand_computation():
  rng = np.random.default_rng(0)
  b, s, n_exp, k = 3, 7, 6, 2
  scores = rng.uniform(0.05, 1, size=(b, s, n_exp)).astype(np.float32)
  experts = np.stack([[rng.permutation(n_exp)[:k] for _ in range(s)] for _ in range(b)])
  valid = np.ones((b, s), bool)
  valid[1, 4:] = False          # padding at the end of row 1
  valid[2, :] = False           # an all-padding row is ignored
  total, rows = 0.0, 0
  for i in range(b):
    idx = [t for t in range(s) if valid[i, t]]
    if not idx:
      continue
    t_len = len(idx)
    loss = 0.0
    for e in range(n_exp):
      f = n_exp / (k * t_len) * sum(e in experts[i, t] for t in idx)
      p = sum(scores[i, t, e] / scores[i, t].sum() for t in idx) / t_len
      loss += f * p
    total += loss
    rows += 1
  got = moe.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(experts),
                                  jnp.asarray(valid), n_exp)
  np.testing.assert_allclose(got, total / rows, rtol=1e-5)


def test_moe_layer_output_and_load_match_naive_computation():
  cfg = _cfg(moe_impl="blocked", n_shared_experts=2)
  layer = moe.MoE(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 5, cfg.dim))
  valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  variables = jax.jit(layer.init)(jax.random.key(1), x, valid)
  variables["router_bias"]["bias"] = jnp.linspace(-0.2, 0.3, 8)
  out, aux = jax.jit(layer.apply)(variables, x, valid)

  p = variables["params"]
  tokens = np.asarray(x).reshape(-1, cfg.dim)
  logits = tokens @ np.asarray(p["gate"])
  gates, experts = naive_route(logits, variables["router_bias"]["bias"], cfg)
  want = _naive_moe(tokens, experts, gates, p["w1"], p["w3"], p["w2"])
  sh = p["shared_experts"]
  silu = lambda z: z / (1 + np.exp(-z))
  want += (silu(tokens @ sh["w1"]["kernel"]) * (tokens @ sh["w3"]["kernel"])) @ sh["w2"]["kernel"]
  np.testing.assert_allclose(np.asarray(out).reshape(-1, cfg.dim), want, atol=1e-4, rtol=1e-4)

  load = np.zeros(8)
  for t, ok in enumerate(np.asarray(valid).reshape(-1)):
    if ok:
      for e in experts[t]:
        load[e] += 1
  np.testing.assert_array_equal(aux["load"], load)
  assert aux["load"].sum() == 8 * cfg.n_activated_experts


def test_default_block_size_stays_in_range():
  assert moe.default_block_size(8192, 16) == 64
  assert moe.default_block_size(10, 64) == 8
  assert moe.default_block_size(10**7, 4) == 128


# ---------------------------------------------------------------------------
# Grouped matmul (model/grouped_matmul.py) and the blocked kernel built on it
# ---------------------------------------------------------------------------
from deepseek_jax import fp8 as fp8_lib  # noqa: E402
from deepseek_jax.model import grouped_matmul as gm  # noqa: E402


def _budget_for(chunk, k, n, itemsize=4):
  """GATHER_BUDGET_BYTES giving `chunk` blocks per chunk (None: one chunk)."""
  return 2**40 if chunk is None else chunk * k * n * itemsize


def _gmm_problem(seed=0, n_blocks=7, bs=4, k=6, n=5, groups=3, n_used=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n_blocks * bs, k)).astype(np.float32)
  w = rng.normal(size=(groups, k, n)).astype(np.float32)
  bg = np.sort(rng.integers(0, groups, n_blocks)).astype(np.int32)
  dy = rng.normal(size=(n_blocks * bs, n)).astype(np.float32)
  return x, w, bg, n_used, dy


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_gmm_forward_and_vjp_match_per_block_loop(chunk, monkeypatch):
  """chunk 3 of 7 blocks with 5 used: two loop trips, the second clamped to
  start at block 4 (recomputes block 4); None: the single-einsum path."""
  x, w, bg, n_used, dy = _gmm_problem()
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", _budget_for(chunk, 6, 5))
  bs = x.shape[0] // bg.shape[0]
  want_y, want_dx, want_dw = np.zeros_like(dy), np.zeros_like(x), np.zeros_like(w, np.float64)
  for blk in range(n_used):
    r = slice(blk * bs, (blk + 1) * bs)
    want_y[r] = x[r] @ w[bg[blk]]
    want_dx[r] = dy[r] @ w[bg[blk]].T
    want_dw[bg[blk]] += x[r].astype(np.float64).T @ dy[r]
  y, vjp = jax.vjp(lambda a, b: gm.gmm(a, b, jnp.asarray(bg), jnp.int32(n_used)), x, w)
  dx, dw = jax.jit(vjp)(jnp.asarray(dy))
  np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, want_dx, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dw, want_dw, atol=1e-5, rtol=1e-5)


def test_move_rows_matches_take_and_its_gradient():
  """move_rows: a[idx] (out-of-range -> 0) with a gather backward, vs
  jnp.take's own VJP (a scatter-add), over a permutation with padding and
  several outputs per input row (the blocked kernel's two uses)."""
  rng = np.random.default_rng(4)
  n, k, slots, d = 5, 3, 20, 4
  a = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  slot = rng.permutation(slots + 4)[:n * k]            # some past the end: no slot
  idx = np.full(slots, n, np.int32)                     # each slot's row; n: padding
  ok = slot < slots
  idx[slot[ok]] = (np.arange(n * k) // k)[ok]
  ct = jnp.asarray(rng.normal(size=(slots, d)), jnp.float32)
  want, vjp = jax.vjp(lambda a: jnp.take(a, jnp.asarray(idx), axis=0, mode="fill",
                                         fill_value=0), a)
  got, vjp2 = jax.vjp(lambda a: moe.move_rows(a, jnp.asarray(idx),
                                              jnp.asarray(slot.reshape(n, k), jnp.int32)), a)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(vjp2(ct)[0], vjp(ct)[0], atol=1e-6, rtol=1e-6)
  # and back: slots -> rows (each slot read at most once)
  back = np.full((slots, 1), n * k, np.int32)
  back[slot[ok], 0] = np.arange(n * k)[ok]
  y = jnp.asarray(rng.normal(size=(slots, d)), jnp.float32)
  ct2 = jnp.asarray(rng.normal(size=(n * k, d)), jnp.float32)
  want, vjp = jax.vjp(lambda y: jnp.take(y, jnp.asarray(slot), axis=0, mode="fill",
                                         fill_value=0), y)
  got, vjp2 = jax.vjp(lambda y: moe.move_rows(y, jnp.asarray(slot), jnp.asarray(back)), y)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(vjp2(ct2)[0], vjp(ct2)[0], atol=1e-6, rtol=1e-6)


def _routing_case(case, n=24, n_exp=5, k=2, seed=0):
  """(x, experts, gates, w1, w3, w2) with a routing pattern; experts may hold
  the sentinel n_exp (and -1): rows that are not rows."""
  x, experts, gates, w1, w3, w2 = _random_problem(n=n, n_exp=n_exp, k=k, seed=seed)
  rng = np.random.default_rng(seed + 1)
  if case == "one_expert":            # skewed: every row to expert 3 (k = 1)
    experts, gates = np.full((n, 1), 3), gates[:, :1]
  elif case == "empty_experts":       # experts 0, 2, 4 get no rows
    experts = np.stack([rng.permutation([1, 3]) for _ in range(n)])
  elif case == "sentinel":            # a third of the slots are not rows
    experts = np.where(rng.uniform(size=(n, k)) < 0.35, n_exp, experts)
    experts[0, 0], experts[1, 1] = -1, n_exp + 7
  elif case == "all_sentinel":
    experts = np.full((n, k), n_exp)
  return x, experts.astype(np.int32), gates, w1, w3, w2


def _dense_oracle(x, experts, gates, w1, w3, w2):
  """Every expert on every token, weighted by its summed gates; a non-row
  (expert id outside [0, E)) adds to a dropped column E."""
  n_exp = w1.shape[0]
  ok = (experts >= 0) & (experts < n_exp)
  dense_gates = jnp.zeros((x.shape[0], n_exp + 1)).at[
      jnp.arange(x.shape[0])[:, None], jnp.where(ok, experts, n_exp)].add(gates)[:, :n_exp]
  h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w1)) * jnp.einsum("nd,edf->enf", x, w3)
  return jnp.einsum("enf,efd,ne->nd", h, w2, dense_gates)


def _loss_grads(fn, experts, args):
  def loss(x, gates, w1, w3, w2):
    return jnp.sum(jnp.sin(fn(x, experts, gates, w1, w3, w2)))
  return jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)


CASES = ["random", "one_expert", "empty_experts", "sentinel", "all_sentinel"]


@pytest.mark.parametrize("case,chunk,bs", [
    (c, ch, bs) for c in CASES for ch, bs in [(None, 0), (1, 4), (2, 3)]])
def test_blocked_matches_dense_and_ragged_forward_and_grads(case, chunk, bs, monkeypatch):
  """Forward and d/d(x, gates, w1, w3, w2) to 1e-5 in float32: chunk None is
  the one-einsum path, 1 and 2 the loop (2: clamped last chunk)."""
  x, experts, *rest = map(jnp.asarray, _routing_case(case))
  args = (x, rest[0], *rest[1:])
  d, f = x.shape[1], rest[1].shape[2]
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", _budget_for(chunk, d, f))
  blocked = lambda *a: moe.experts_blocked(*a, block_size=bs)   # noqa: E731
  got = _loss_grads(blocked, experts, args)
  refs = [_loss_grads(_dense_oracle, experts, args)]
  if "sentinel" not in case:
    refs += [_loss_grads(moe.experts_dense, experts, args),
             _loss_grads(moe.experts_ragged, experts, args)]
  for want in refs:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  y = jax.jit(blocked)(x, experts, *rest)
  np.testing.assert_allclose(y, _dense_oracle(x, experts, *rest), atol=1e-5, rtol=1e-5)
  if case == "all_sentinel":
    assert not np.asarray(y).any()


def test_blocked_holds_no_per_block_weight_copy(monkeypatch):
  """With a chunk of 2 blocks, no array in the forward or backward program
  has the [n_blocks, D, F] shape of a per-block weight gather (the old
  kernel's), and the loop runs ceil(used blocks / 2) times."""
  x, experts, gates, w1, w3, w2 = map(jnp.asarray, _random_problem(n=40, n_exp=6, k=2))
  d, f = w1.shape[1:]
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", _budget_for(2, d, f))
  bs = 8
  n_blocks = -(-80 // bs) + 6
  loss = lambda *a: moe.experts_blocked(x, experts, *a, block_size=bs).sum()  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(gates, w1, w3, w2)

  def shapes(jx):
    for eqn in jx.eqns:
      for v in eqn.outvars:
        yield tuple(getattr(v.aval, "shape", ()))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else [p]):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None:
            yield from shapes(getattr(inner, "jaxpr", inner))
  seen = set(shapes(jaxpr.jaxpr))
  assert (2, d, f) in seen and (2, f, d) in seen           # a chunk's gathered weights
  assert not {(n_blocks, d, f), (n_blocks, f, d)} & seen


def _fp8_per_block_reference(x, experts, gates, w1, w3, w2, bs):
  """The committed FP8 path: every block's expert weights gathered, one
  fp8_grouped_dot per GEMM over all blocks (no sentinel rows here)."""
  n, d = x.shape
  k, n_exp = experts.shape[1], w1.shape[0]
  n_blocks = -(-n * k // bs) + n_exp
  order, sorted_e, counts, position = moe.sort_by_group(experts.reshape(-1), n_exp)
  padded = (counts + bs - 1) // bs * bs
  pad_end = jnp.cumsum(padded)
  slot = jnp.zeros((n * k,), jnp.int32).at[order].set((pad_end - padded)[sorted_e] + position)
  xs = jnp.zeros((n_blocks * bs, d), x.dtype).at[slot].set(jnp.repeat(x, k, axis=0))
  be = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_blocks) * bs, side="right"),
                   n_exp - 1)
  dot = lambda a, w: fp8_lib.fp8_grouped_dot(a, w[be], backend="emulated")  # noqa: E731
  xb = xs.reshape(n_blocks, bs, d)
  y = dot(jax.nn.silu(dot(xb, w1)) * dot(xb, w3), w2).reshape(n_blocks * bs, d)
  return jnp.einsum("nkd,nk->nd", y[slot].reshape(n, k, d), gates)


@pytest.mark.parametrize("chunk", [None, 2])
def test_blocked_fp8_matches_per_block_fp8_path(chunk, monkeypatch):
  """FP8 experts: each block's GEMMs quantize exactly as the per-block gather
  did (1x128 tiles per row, a block within one M tile), in either path."""
  x, experts, gates, w1, w3, w2 = map(jnp.asarray, _random_problem(n=24, d=16, f=8,
                                                                   n_exp=4, skew=True))
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", _budget_for(chunk, 16, 8))
  args = (x, gates, w1, w3, w2)
  got = _loss_grads(lambda *a: moe.experts_blocked(*a, block_size=8, fp8=True), experts, args)
  want = _loss_grads(lambda *a: _fp8_per_block_reference(*a, bs=8), experts, args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_gmm_frozen_fp8_blocks_give_dx_and_zero_dw(monkeypatch):
  """Published FP8 blocks (Quantized) are frozen: dx as fp8_grouped_dot's,
  zero weight cotangents; the loop path with chunk 1."""
  x, w, bg, n_used, dy = _gmm_problem(k=16, n=8)
  q = fp8_lib.quantize_blocks(jnp.asarray(w[0]))
  qw = fp8_lib.Quantized(*(jnp.stack([a] * 3) for a in (q.q[:16, :8], q.scale)))
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", _budget_for(1, 128, 128))
  y, vjp = jax.vjp(lambda a, b: gm.gmm(a, b, jnp.asarray(bg), n_used, fp8=True), x, qw)
  dx, dqw = vjp(jnp.asarray(dy))
  xb, dyb = x.reshape(7, 4, 16), dy.reshape(7, 4, 8)
  want_y, ref_vjp = jax.vjp(lambda a: fp8_lib.fp8_grouped_dot(
      a, jax.tree.map(lambda t: t[bg], qw), backend="emulated"), xb)
  live = (np.arange(7) < n_used)[:, None, None]
  np.testing.assert_allclose(y.reshape(7, 4, 8), want_y * live, atol=1e-6)
  np.testing.assert_allclose(dx.reshape(7, 4, 16), ref_vjp(dyb)[0] * live, atol=1e-6)
  assert not np.asarray(dqw.scale).any() and not np.asarray(dqw.q, np.float32).any()


@pytest.mark.parametrize("chunk", [None, 1])
def test_gmm_grads_inside_shard_map_match_one_device(chunk, monkeypatch):
  """Rows split over 8 devices, w replicated: the custom VJP's weight
  gradient is summed over the row shards (pcast), as plain autodiff does;
  chunk 1: the looped path (its carries must vary like the operands: the
  V3-width case)."""
  from jax.sharding import AxisType
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", _budget_for(chunk, 4, 3))
  mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(5)
  bs, n_blocks, k, n, groups = 2, 3, 4, 3, 2
  x = jnp.asarray(rng.normal(size=(8, n_blocks * bs, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(groups, k, n)), jnp.float32)
  bg = jnp.asarray(np.tile([0, 1, 1], (8, 1)), jnp.int32)

  def local(x, w, bg):
    return jnp.sin(gm.gmm(x[0], w, bg[0], 2)).sum()[None]

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(jax.P("rows"), jax.P(), jax.P("rows")),
                          out_specs=jax.P("rows"))
  got = jax.jit(jax.grad(lambda x, w: sharded(x, w, bg).sum(), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(lambda x, w: sum(local(x[i:i + 1], w, bg[i:i + 1]).sum()
                                           for i in range(8)), argnums=(0, 1)))(x, w)
  for g, ref in zip(got, want):
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,fp8,want", [
    ("cpu", False, "blocked"), ("gpu", False, "blocked"), ("tpu", False, "ragged"),
    ("tpu", True, "blocked")])
def test_auto_kernel_is_ragged_only_on_tpu(backend, fp8, want, monkeypatch):
  """ragged_dot is a dense dot over every expert on CPU and (jaxlib 0.10) CUDA;
  decoding-sized batches take "dense" on any backend."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  cfg = _cfg(moe_impl="auto", fp8=fp8)
  assert moe.resolve_moe_impl(cfg, 4096) == want
  assert moe.resolve_moe_impl(cfg, 1) == "dense"
  assert moe.resolve_moe_impl(_cfg(moe_impl="ragged"), 4096) == "ragged"
