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
