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
