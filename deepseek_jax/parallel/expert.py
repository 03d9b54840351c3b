"""The routed-expert FFN inside `jax.shard_map`: local routing, expert parallelism.

Under a mesh (`parallel.rules.activate`), `model.moe.MoE` runs its router and
dispatch here, per device, on the device's own rows of the batch:

  1. route the local tokens (the router weight and bias are replicated, so
     every device routes exactly as one device would);
  2. experts split over `expert` (rule `exp -> expert`, EP degree P):
     sort the (token, expert) rows by the device owning their expert, send
     them with `jax.lax.all_to_all` over `expert`, run the local experts on
     what arrives, send the results back, un-sort, combine with the gates;
     experts not split: run every expert locally (weights gathered by XLA);
  3. hidden units split over `tensor` (`mlp_moe -> tensor`): each tensor rank
     computes a slice of every expert's hidden layer; `psum` over `tensor`;
  4. the per-expert load (the aux-loss-free bias update's input) and the
     balance loss's numerator/denominator are `psum`-ed over the batch axes:
     every device sees the global batch's numbers, so all apply the same bias.

Dropless and exact on every backend: each device sends every row it holds in
a buffer with room for all of them (capacity R = local tokens x top-k per
destination), so no routing skew can overflow. That costs P times the
minimum traffic and P times the expert FLOPs on padding rows; it is the
exact reference path. `jax.lax.ragged_all_to_all` would move only the real
rows, but XLA:CPU cannot compile it (../shared/DESIGN.md §8), and a GPU path
that cannot be tested here is left for the GPU issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.rules import Rules, mesh_axes_of


def _axes_size(mesh, axes) -> int:
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _exchange_and_compute(tokens, experts, w1, w3, w2, *, axis: str, ep: int, kernel):
  """Per-row expert outputs [n, k, d] with experts split over `axis` (size ep).

  tokens [n, d]; experts [n, k] global ids; w* hold this device's E/ep experts.
  """
  n, d = tokens.shape
  k = experts.shape[1]
  rows = n * k
  e_local = w1.shape[0]
  flat = experts.reshape(-1)                                        # [R]
  dest = flat // e_local                                            # owning device
  order = jnp.argsort(dest, stable=True)                            # rows by device
  sorted_dest = dest[order]
  counts = jnp.bincount(dest, length=ep)
  start = jnp.cumsum(counts) - counts
  slot = jnp.arange(rows) - start[sorted_dest]                      # place in buffer
  send_x = jnp.zeros((ep, rows, d), tokens.dtype).at[sorted_dest, slot].set(
      jnp.take(tokens, order // k, axis=0))
  # Empty slots carry local expert 0 and are never read back.
  send_e = jnp.zeros((ep, rows), jnp.int32).at[sorted_dest, slot].set(
      flat[order] % e_local)
  recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)                  # [ep(src), R, d]
  recv_e = jax.lax.all_to_all(send_e, axis, 0, 0)
  y = kernel(recv_x.reshape(ep * rows, d), recv_e.reshape(ep * rows, 1),
             jnp.ones((ep * rows, 1), tokens.dtype), w1, w3, w2)     # [ep*R, d]
  back = jax.lax.all_to_all(y.reshape(ep, rows, d), axis, 0, 0)   # [ep(dst), R, d]
  y_sorted = back[sorted_dest, slot]                                # [R, d]
  return jnp.zeros((rows, d), y.dtype).at[order].set(
      y_sorted, unique_indices=True).reshape(n, k, d)


def routed_experts(x, valid, gate, bias, w1, w3, w2, *, cfg: ModelConfig, rules: Rules,
                   kernel, route_fn, balance_terms_fn):
  """Sharded routed FFN. x [b, s, d], valid [b, s]; returns (out, load [E], bal).

  `kernel(tokens, experts, gates, w1, w3, w2)` is the grouped-matmul kernel
  (model.moe); `route_fn` and `balance_terms_fn` are the router and the
  balance-loss terms, passed in so this module adds no second implementation.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch = tuple(a for a in mesh_axes_of("batch", rules) if a in mesh.axis_names)
  exp_axes = mesh_axes_of("exp", rules)
  mlp_axes = mesh_axes_of("mlp_moe", rules)
  ep = _axes_size(mesh, exp_axes)
  if len(exp_axes) > 1:
    raise NotImplementedError(f"experts split over several mesh axes {exp_axes}; "
                              "use one axis (expert) for `exp`.")
  if cfg.n_routed_experts % ep:
    raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the "
                     f"expert-parallel degree {ep} (mesh axes {exp_axes}).")
  n_exp = cfg.n_routed_experts
  n_rows = _axes_size(mesh, batch)
  if x.shape[0] % n_rows:
    raise ValueError(f"batch of {x.shape[0]} rows is not divisible by the batch mesh axes "
                     f"{batch} (size {n_rows}); make the batch size a multiple of {n_rows}.")

  def local(x, valid, gate, bias, w1, w3, w2):
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    logits = jnp.einsum("nd,de->ne", tokens.astype(jnp.float32), gate.astype(jnp.float32))
    gates, experts, scores = route_fn(logits, bias, cfg)
    if ep > 1:
      y_rows = _exchange_and_compute(tokens, experts, w1, w3, w2, axis=exp_axes[0],
                                     ep=ep, kernel=kernel)
      out = jnp.einsum("nkd,nk->nd", y_rows, gates.astype(y_rows.dtype))
    else:
      out = kernel(tokens, experts, gates, w1, w3, w2)
    if mlp_axes:
      out = jax.lax.psum(out, mlp_axes)        # each tensor rank held a hidden slice
    experts_bsk = experts.reshape(b, s, -1)
    load = jnp.einsum("bske,bs->e", jax.nn.one_hot(experts_bsk, n_exp, dtype=jnp.float32),
                      valid.astype(jnp.float32))
    num, den = balance_terms_fn(scores.reshape(b, s, n_exp), experts_bsk, valid, n_exp)
    if batch:
      load, num, den = (jax.lax.psum(v, batch) for v in (load, num, den))
    return out.reshape(b, s, d), load, num / jnp.maximum(den, 1.0)

  rows = _spec_entry(batch)
  e, f = _spec_entry(exp_axes), _spec_entry(mlp_axes)
  fn = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(rows), P(rows), P(), P(), P(e, None, f), P(e, None, f), P(e, f, None)),
      out_specs=(P(rows), P(), P()))
  return fn(x, valid, gate, bias, w1, w3, w2)

