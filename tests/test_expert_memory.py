"""The grouped matmul's (model/grouped_matmul.py) 16-bit weights as XLA:CPU
compiles them.

XLA:CPU has no bfloat16 gather: its float normalization gathered each chunk
of expert weights from a float32 copy of the whole [G, K, N] weight, which
loop-invariant code motion hoisted out of the chunk loop (3.5 GiB per V3
expert matrix and call). The kernel now gathers the weights' bits (uint16).
Oracles: the compiled program (no float32 value of the weight's shape
outside a fusion) and a float64 NumPy per-block loop for the numbers.

Also the expert exchange's overflow cond (parallel/expert.py): the gradient's
program returns no copies of the expert weights out of a forward cond
(oracle: the jaxpr's conds; the numbers against the one-device dense kernel).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import grouped_matmul as gm
from deepseek_jax.buffers import BitsWeight

G, K, N, N_BLOCKS, BS, N_USED = 4, 64, 32, 12, 8, 9


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N_BLOCKS * BS, K)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(G, K, N)), jnp.bfloat16)
  bg = np.sort(rng.integers(0, G, N_BLOCKS)).astype(np.int32)
  return x, w, bg


def _loss(x, w, bg):
  return (gm.gmm(x, w, bg, N_USED).astype(jnp.float32) ** 2).sum()


@pytest.fixture
def two_blocks_per_chunk(monkeypatch):
  """A chunk of 2 of the 12 blocks: the while loop over chunks."""
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", 2 * K * N * 2)


def test_bf16_weights_are_not_copied_to_float32_for_the_chunk_gather(two_blocks_per_chunk):
  x, w, bg = _problem()
  grad = jax.grad(_loss, argnums=(0, 1))
  hlo = jax.jit(grad).lower(x, w, jnp.asarray(bg)).compile().as_text()
  # Top-level values (a fusion's internal ones are not buffers): the fusions
  # and copies of each computation, by their shape.
  whole = re.findall(rf"^\s+(?:ROOT )?%[\w.\-]+ = f32\[{G},{K},{N}\]\S* (fusion|copy)\(",
                     hlo, flags=re.M)
  assert not whole, f"{len(whole)} float32 copies of the [G, K, N] weight"


def test_gmm_with_bf16_weights_matches_a_float64_loop(two_blocks_per_chunk):
  x, w, bg = _problem()
  y = gm.gmm(x, w, jnp.asarray(bg), N_USED)
  xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
  want = np.zeros((N_BLOCKS * BS, N))
  for blk in range(N_USED):
    r = slice(blk * BS, (blk + 1) * BS)
    want[r] = xf[r] @ wf[bg[blk]]
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2e-2, atol=5e-2)
  dx, dw = jax.grad(_loss, argnums=(0, 1))(x, w, jnp.asarray(bg))
  dy = 2 * np.asarray(y, np.float64)
  want_dw = np.zeros((G, K, N))
  want_dx = np.zeros_like(xf)
  for blk in range(N_USED):
    r = slice(blk * BS, (blk + 1) * BS)
    want_dw[bg[blk]] += xf[r].T @ dy[r]
    want_dx[r] = dy[r] @ wf[bg[blk]].T
  scale = np.abs(want_dw).max()
  np.testing.assert_allclose(np.asarray(dw, np.float64) / scale, want_dw / scale, atol=2e-2)
  scale = np.abs(want_dx).max()
  np.testing.assert_allclose(np.asarray(dx, np.float64) / scale, want_dx / scale, atol=2e-2)


# ---------------------------------------------------------------------------
# The expert exchange's overflow cond (parallel/expert.py, `_overflow_cond`)
# ---------------------------------------------------------------------------
E_EX, D_EX, F_EX, N_EX = 8, 16, 6, 8     # experts, width, hidden, tokens per device


def _conds(jaxpr):
  """Every cond equation of a jaxpr, nested ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _conds(inner)


def test_overflow_cond_returns_no_copies_of_its_operands():
  """The gradient's program has one cond with expert-weight-shaped outputs:
  the backward's (the overflow rounds' weight cotangents). Differentiating
  the cond itself added a forward cond that returned the weights (its
  checkpointed branch's residuals) as outputs: copies, live until the
  backward (5.25 GiB per MoE layer at V3 widths)."""
  from deepseek_jax.model import moe
  from deepseek_jax.parallel import expert as ep_lib
  mesh = jax.make_mesh((4, 2), ("data", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  P = jax.sharding.PartitionSpec
  rows = P(("data", "expert"))

  def local(x, gates, w1, w3, w2, experts):
    return ep_lib._exchanging_kernel(x, experts, gates, w1, w3, w2, axis="expert", ep=2,
                                     kernel=moe.experts_dense, capacity=1.0,
                                     batch_axes=("data", "expert"))
  run = jax.shard_map(local, mesh=mesh, out_specs=rows,
                      in_specs=(rows, rows, P("expert"), P("expert"), P("expert"), rows))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8 * N_EX, D_EX)), jnp.float32)
  gates = jnp.asarray(rng.uniform(0.2, 1, (8 * N_EX, 2)), jnp.float32)
  experts = jnp.zeros((8 * N_EX, 2), jnp.int32).at[:, 1].set(1)    # all to rank 0
  w1, w3 = (jnp.asarray(rng.normal(size=(E_EX, D_EX, F_EX)), jnp.float32) for _ in "ab")
  w2 = jnp.asarray(rng.normal(size=(E_EX, F_EX, D_EX)), jnp.float32)

  def loss(w1, w3, w2):
    return (run(x, gates, w1, w3, w2, experts) ** 2).sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(w1, w3, w2).jaxpr
  local_w = {(E_EX // 2, D_EX, F_EX), (E_EX // 2, F_EX, D_EX)}
  with_weights = [e for e in _conds(jaxpr)
                  if sum(tuple(v.aval.shape) in local_w for v in e.outvars) == 3]
  assert len(with_weights) == 1, [len(e.outvars) for e in with_weights]
  # The same gradients as the one-device dense kernel.
  want = jax.grad(lambda *w: (moe.experts_dense(x, experts, gates, *w) ** 2).sum(),
                  argnums=(0, 1, 2))(w1, w3, w2)
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w1, w3, w2)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# BitsWeight (buffers.py): the bits made once where the weight is cast
# ---------------------------------------------------------------------------
def _loss_from_master(x, w32, bg, as_bits):
  w = w32.astype(jnp.bfloat16)
  if as_bits:
    w = BitsWeight(w, jax.lax.bitcast_convert_type(w, jnp.uint16))
  return _loss(x, w, bg)


def test_bits_weight_gives_the_plain_weights_numbers(two_blocks_per_chunk):
  """gmm on a BitsWeight equals gmm on the bfloat16 array bit for bit
  (forward and both gradients, through the cast from float32 master
  weights)."""
  x, w, bg = _problem()
  w32, bg = w.astype(jnp.float32), jnp.asarray(bg)
  grads = [jax.jit(jax.value_and_grad(_loss_from_master, argnums=(0, 1)),
                   static_argnums=3)(x, w32, bg, b) for b in (False, True)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_exchange_with_bits_weights_equals_plain_weights_without_their_copies(
    monkeypatch):
  """The expert exchange (overflow rounds on: every row to one rank) with
  the blocked kernel (2 blocks per chunk: its while loops) on BitsWeight
  expert weights gives the plain bfloat16 weights' outputs and weight
  gradients exactly. No bfloat16 weight enters the overflow conds
  (their operands are the bits), where the plain weights do, forward and
  backward: each cond then held the bfloat16 cast and made its own uint16
  copy (at V3 widths 5.25 GiB each per MoE layer; bench/RESULTS.md)."""
  from deepseek_jax.model import moe
  from deepseek_jax.parallel import expert as ep_lib
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", 2 * D_EX * F_EX * 2)
  mesh = jax.make_mesh((4, 2), ("data", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  P = jax.sharding.PartitionSpec
  rows = P(("data", "expert"))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8 * N_EX, D_EX)), jnp.bfloat16)
  gates = jnp.asarray(rng.uniform(0.2, 1, (8 * N_EX, 2)), jnp.bfloat16)
  experts = jnp.zeros((8 * N_EX, 2), jnp.int32).at[:, 1].set(1)    # all to rank 0
  w32 = [jnp.asarray(rng.normal(size=s), jnp.float32)
         for s in [(E_EX, D_EX, F_EX)] * 2 + [(E_EX, F_EX, D_EX)]]

  def loss(ws, as_bits):
    def local(x, gates, w1, w3, w2, experts):
      return ep_lib._exchanging_kernel(x, experts, gates, w1, w3, w2, axis="expert", ep=2,
                                       kernel=moe.experts_blocked, capacity=1.0,
                                       batch_axes=("data", "expert"))
    w = [v.astype(jnp.bfloat16) for v in ws]
    if as_bits:
      w = [BitsWeight(v, jax.lax.bitcast_convert_type(v, jnp.uint16)) for v in w]
    run = jax.shard_map(local, mesh=mesh, out_specs=rows,
                        in_specs=(rows, rows, P("expert"), P("expert"), P("expert"), rows))
    return (run(x, gates, *w, experts).astype(jnp.float32) ** 2).sum()
  fns = [jax.jit(jax.value_and_grad(loss), static_argnums=1) for _ in range(2)]
  got = [f(w32, b) for f, b in zip(fns, (False, True))]
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Both against the one-device float32 dense kernel on the same bfloat16
  # values (the 16-bit row gathers and all_to_alls move bits: exact moves).
  w16 = [v.astype(jnp.bfloat16).astype(jnp.float32) for v in w32]
  want = (moe.experts_dense(x.astype(jnp.float32), experts, gates.astype(jnp.float32), *w16)
          ** 2).sum()
  np.testing.assert_allclose(float(got[1][0]), float(want), rtol=3e-2)
  shapes = {(E_EX // 2, D_EX, F_EX), (E_EX // 2, F_EX, D_EX)}

  def bf16_weights_into_conds(as_bits):
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(w32, as_bits).jaxpr
    return sum(tuple(v.aval.shape) in shapes and v.aval.dtype == jnp.bfloat16
               for e in _conds(jaxpr) for v in e.invars)
  assert bf16_weights_into_conds(False) >= 6          # the oracle: forward and backward
  assert bf16_weights_into_conds(True) == 0
