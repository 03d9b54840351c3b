"""FSDP-sliced expert weights: `gmm(gather_axes=...)` gathers one group's
weight at a time inside shard_map; forward and gradients vs a per-block
numpy loop on the whole weights (each device its own rows and groups), and
`experts_blocked(embed_axes=...)` vs the same kernel on whole weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from deepseek_jax.model import grouped_matmul as gm
from deepseek_jax.model import moe

N_DEV = 8


def _mesh():
  return jax.make_mesh((N_DEV,), ("fsdp",), axis_types=(AxisType.Auto,))


def _problem(seed, n_blocks=6, bs=2, k=16, n=8, groups=5):
  """Per device: rows, sorted block groups and a used-block count of its own
  (so devices run their groups' loops for different trip counts)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N_DEV, n_blocks * bs, k)).astype(np.float32)
  w = rng.normal(size=(groups, k, n)).astype(np.float32)
  bg = np.sort(rng.integers(0, groups, (N_DEV, n_blocks)), axis=1).astype(np.int32)
  n_used = rng.integers(0, n_blocks + 1, N_DEV).astype(np.int32)
  dy = rng.normal(size=(N_DEV, n_blocks * bs, n)).astype(np.float32)
  return x, w, bg, n_used, dy


def _oracle(x, w, bg, n_used, dy):
  """y, dx per device and dw summed over devices, block by block (float64)."""
  bs = x.shape[1] // bg.shape[1]
  y, dx = np.zeros_like(dy, np.float64), np.zeros_like(x, np.float64)
  dw = np.zeros_like(w, np.float64)
  for d in range(N_DEV):
    for blk in range(n_used[d]):
      r, wg = slice(blk * bs, (blk + 1) * bs), w[bg[d, blk]].astype(np.float64)
      y[d, r] = x[d, r] @ wg
      dx[d, r] = dy[d, r] @ wg.T
      dw[bg[d, blk]] += x[d, r].astype(np.float64).T @ dy[d, r]
  return y, dx, dw


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("chunk", [1, 2])
def test_gathered_gmm_matches_per_block_loop(dim, chunk, monkeypatch):
  """w split over 8 devices along K (dim 1) or N (dim 2); chunk 2: chunks
  clamped to end at a group's last block (overlap re-written, neighbours
  kept)."""
  monkeypatch.setattr(gm, "_group_chunk", lambda *a: chunk)
  x, w, bg, n_used, dy = _problem(seed=dim + 10 * chunk)
  mesh = _mesh()
  w_spec = jax.P(None, "fsdp", None) if dim == 1 else jax.P(None, None, "fsdp")

  def local(x, w, bg, n_used, dy):
    y, vjp = jax.vjp(lambda a, b: gm.gmm(a, b, bg[0], n_used[0], gather_axes=("fsdp",),
                                         gather_dim=dim), x[0], w)
    dx, dw = vjp(dy[0])
    return y[None], dx[None], dw

  rows = jax.P("fsdp")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, w_spec, rows, rows, rows),
                             out_specs=(rows, rows, w_spec)))
  with jax.set_mesh(mesh):
    y, dx, dw = fn(x, w, bg, n_used, dy)
  want_y, want_dx, want_dw = _oracle(x, w, bg, n_used, dy)
  np.testing.assert_allclose(y, want_y, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dx, want_dx, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dw, want_dw, atol=1e-4, rtol=1e-5)


def test_blocked_kernel_with_sliced_weights_matches_whole_weights():
  """experts_blocked on FSDP slices (embed_axes) inside shard_map, forward and
  gradients, vs the kernel on whole weights, device by device."""
  rng = np.random.default_rng(3)
  n, d, f, n_exp, k = 12, 16, 6, 5, 2
  x = rng.normal(size=(N_DEV, n, d)).astype(np.float32)
  experts = np.stack([np.stack([rng.permutation(n_exp)[:k] for _ in range(n)])
                      for _ in range(N_DEV)]).astype(np.int32)
  experts[1] = n_exp                      # a device whose rows are all not rows
  gates = rng.uniform(size=(N_DEV, n, k)).astype(np.float32)
  w1, w3 = (rng.normal(size=(n_exp, d, f)).astype(np.float32) / 4 for _ in range(2))
  w2 = rng.normal(size=(n_exp, f, d)).astype(np.float32) / 4
  kern = functools.partial(moe.experts_blocked, block_size=2)

  def loss(kernel, x, experts, gates, w1, w3, w2):
    return jnp.sin(kernel(x, experts, gates, w1, w3, w2)).sum()

  def local(x, experts, gates, w1, w3, w2):
    sliced = functools.partial(kern, embed_axes=("fsdp",))
    val, grads = jax.value_and_grad(loss, argnums=(1, 4, 5, 6))(
        sliced, x[0], experts[0], gates[0], w1, w3, w2)
    return val[None], grads[0][None], grads[1], grads[2], grads[3]

  mesh, rows = _mesh(), jax.P("fsdp")
  w13, w2s = jax.P(None, "fsdp", None), jax.P(None, None, "fsdp")
  fn = jax.jit(jax.shard_map(local, mesh=mesh,
                             in_specs=(rows, rows, rows, w13, w13, w2s),
                             out_specs=(rows, rows, w13, w13, w2s)))
  with jax.set_mesh(mesh):
    got = fn(x, experts, gates, w1, w3, w2)
  whole = jax.jit(jax.value_and_grad(functools.partial(loss, kern), argnums=(0, 3, 4, 5)))
  want_val, want_dx, want_dw = [], [], [np.zeros_like(w1), np.zeros_like(w3), np.zeros_like(w2)]
  for dev in range(N_DEV):
    val, (dx, *dws) = whole(x[dev], experts[dev], gates[dev], w1, w3, w2)
    want_val.append(val)
    want_dx.append(dx)
    want_dw = [a + np.asarray(b) for a, b in zip(want_dw, dws)]
  for g, ref in zip(got, [np.array(want_val), np.stack(want_dx)] + want_dw):
    np.testing.assert_allclose(g, ref, atol=1e-4, rtol=1e-4)
