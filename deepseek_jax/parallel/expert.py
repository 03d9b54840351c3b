"""The routed-expert FFN inside `jax.shard_map`: local routing, expert parallelism.

Under a mesh (`parallel.rules.activate`), the MoE layer (`model/moe.py`) runs
its router and dispatch through `routed_experts`, per device, on the device's
own rows of the batch. This module knows nothing of the model: the layer
passes in its routed FFN (routing, grouped matmul, loads and balance terms on
some rows) and its grouped-matmul kernel, and this module places them:

  1. route the local tokens (the router weight and bias are replicated, so
     every device routes exactly as one device would);
  2. experts split over `expert` (rule `exp -> expert`, EP degree P, in every
     rule set): sort the (token, expert) rows by the device owning their
     expert, send them with `jax.lax.all_to_all` over `expert`, run the local
     experts on what arrives, send the results back, un-sort, combine with
     the gates; experts not split: run every expert locally (weights gathered
     by XLA);
  3. hidden units split over `tensor` (`mlp_moe -> tensor`): each tensor rank
     computes a slice of every expert's hidden layer; `psum` over `tensor`;
  4. the per-expert load (the aux-loss-free bias update's input) and the
     balance losses' numerators/denominator are `psum`-ed over the batch
     axes: every device sees the global batch's numbers, so all apply the
     same bias.

Dropless and exact on every backend, with fixed-size buffers (all_to_all
needs static shapes). With R = local tokens x top-k routed rows per device,
the exchange buffer has room for C rows per destination:

  C = moe_ep_capacity x R / P (rounded up to 8; ModelConfig, default 2):
      taken when no device sends more than C rows to any one device. The
      busiest pair's count is `pmax`-ed over the mesh first, so every device
      takes the same branch of a `lax.cond`;
  C = R (room for every row): the fallback for the steps whose routing is too
      skewed for the first buffer. No row is ever dropped.

Traffic and expert FLOPs (padding rows included) are P x C rows per device:
2R under the default, P R for the fallback. `jax.lax.ragged_all_to_all` would
move only the real rows, but XLA:CPU cannot compile it (DESIGN.md §8), so the
exchange is built from `all_to_all` on every backend.

`sort_by_group` is the one stable sort-and-offset of routed rows: the
exchange groups rows by destination device, the MoE kernels by expert.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.rules import Rules, axes_size, mesh_axes_of


class SortedRows(NamedTuple):
  """Rows sorted by group (`sort_by_group`)."""
  order: jax.Array       # [R] row indices, grouped (stable: row order kept within a group)
  group: jax.Array       # [R] the group of each sorted row
  counts: jax.Array      # [n_groups] rows per group
  position: jax.Array    # [R] each sorted row's index within its group (0, 1, ...)


def sort_by_group(groups: jax.Array, n_groups: int) -> SortedRows:
  """Stable sort of rows by their group id (groups [R] int, in [0, n_groups)).

  Sorted row j is row order[j]; it is the position[j]-th row of its group,
  whose rows start at cumsum(counts)[g] - counts[g] in sorted order.
  """
  order = jnp.argsort(groups, stable=True)
  group = groups[order]
  counts = jnp.bincount(groups, length=n_groups)
  start = jnp.cumsum(counts) - counts
  return SortedRows(order, group, counts, jnp.arange(groups.shape[0]) - start[group])


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def exchange_capacity(rows: int, ep: int, factor: float) -> int:
  """Rows per destination of the first-choice buffer (see the module doc):
  factor x rows / ep rounded up to a multiple of 8, at most `rows`;
  `rows` when factor is 0."""
  if not factor:
    return rows
  return min(rows, -(-math.ceil(factor * rows / ep) // 8) * 8)


def _exchange(tokens, flat, order, dest, slot, w1, w3, w2, *, axis, ep, cap, k, kernel):
  """Send rows to their experts' devices in [ep, cap, d] buffers, run the
  local experts, send the results back; returns [R, d] in routed-row order.
  order, dest, slot: `sort_by_group` of the rows by destination device
  (order, group, position)."""
  n, d = tokens.shape
  rows = n * k
  e_local = w1.shape[0]
  send_x = jnp.zeros((ep, cap, d), tokens.dtype).at[dest, slot].set(
      jnp.take(tokens, order // k, axis=0))
  # Empty slots carry local expert 0 and are never read back.
  send_e = jnp.zeros((ep, cap), jnp.int32).at[dest, slot].set(flat[order] % e_local)
  recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)                  # [ep(src), cap, d]
  recv_e = jax.lax.all_to_all(send_e, axis, 0, 0)
  y = kernel(recv_x.reshape(ep * cap, d), recv_e.reshape(ep * cap, 1),
             jnp.ones((ep * cap, 1), tokens.dtype), w1, w3, w2)     # [ep*cap, d]
  back = jax.lax.all_to_all(y.reshape(ep, cap, d), axis, 0, 0)    # [ep(dst), cap, d]
  return jnp.zeros((rows, d), y.dtype).at[order].set(back[dest, slot], unique_indices=True)


def _exchanging_kernel(tokens, experts, gates, w1, w3, w2, *, axis: str, ep: int, kernel,
                       capacity: float = 0.0, sync_axes: tuple[str, ...] = ()):
  """`kernel` with the experts split over mesh axis `axis` (size ep): same
  signature and result [n, d]; w* hold this device's E/ep experts and
  `experts` [n, k] are global ids. `sync_axes`: every mesh axis the rows
  vary over (the branch choice is pmax-ed over them)."""
  n, d = tokens.shape
  k = experts.shape[1]
  rows = n * k
  e_local = w1.shape[0]
  flat = experts.reshape(-1)                                        # [R]
  by_dest = sort_by_group(flat // e_local, ep)                      # rows by owning device
  operands = (tokens, flat, by_dest.order, by_dest.group, by_dest.position, w1, w3, w2)

  def branch(cap):
    # Rematerialised: under autodiff a cond's branches must return residuals
    # of one structure, so un-remat'd the small branch would carry zero-filled
    # copies of the big branch's [ep, rows, d] buffers.
    return jax.checkpoint(functools.partial(_exchange, axis=axis, ep=ep, cap=cap, k=k,
                                            kernel=kernel))
  cap = exchange_capacity(rows, ep, capacity)
  if cap < rows:
    busiest = jax.lax.pmax(by_dest.counts.max(), tuple(dict.fromkeys((*sync_axes, axis))))
    y_rows = jax.lax.cond(busiest <= cap, branch(cap), branch(rows), *operands)
  else:
    y_rows = _exchange(*operands, axis=axis, ep=ep, cap=rows, k=k, kernel=kernel)
  y_rows = y_rows.reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", y_rows, gates.astype(y_rows.dtype))


# ffn(x, valid, gate, bias, w1, w3, w2, kernel) -> (out, load, numerators, denominator)
RoutedFFN = Callable[..., tuple]


def routed_experts(ffn: RoutedFFN, kernel, x, valid, gate, bias, w1, w3, w2, *,
                   cfg: ModelConfig, rules: Rules):
  """Sharded routed FFN. x [b, s, d], valid [b, s]; returns (out, load [E],
  losses): each entry of the numerators dict divided by the denominator,
  both summed over the global batch (the batch mean of each balance loss).

  ffn: the model's routed FFN on one device's rows (`model.moe.routed_ffn`
    with its config and options bound): routes x, runs the routed experts
    with the kernel it is given, and returns (out, load [E], {name:
    numerator}, denominator). kernel(tokens, experts, gates, w1, w3, w2):
    the grouped-matmul kernel the layer chose; with experts split over
    devices it runs inside the exchange, on the rows that arrive.
  """
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(mesh.shape)
  batch = mesh_axes_of("batch", rules)
  exp_axes = mesh_axes_of("exp", rules)
  mlp_axes = mesh_axes_of("mlp_moe", rules)
  ep = axes_size(sizes, exp_axes)
  if len(exp_axes) > 1:
    raise NotImplementedError(f"experts split over several mesh axes {exp_axes}; "
                              "use one axis (expert) for `exp`.")
  if cfg.n_routed_experts % ep:
    raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the "
                     f"expert-parallel degree {ep} (mesh axes {exp_axes}).")
  n_rows = axes_size(sizes, batch)
  if x.shape[0] % n_rows:
    raise ValueError(f"batch of {x.shape[0]} rows is not divisible by the batch mesh axes "
                     f"{batch} (size {n_rows}); make the batch size a multiple of {n_rows}.")
  if ep > 1:
    kernel = functools.partial(_exchanging_kernel, axis=exp_axes[0], ep=ep, kernel=kernel,
                               capacity=cfg.moe_ep_capacity, sync_axes=tuple(batch))

  def local(x, valid, gate, bias, w1, w3, w2):
    out, load, nums, den = ffn(x, valid, gate, bias, w1, w3, w2, kernel)
    if mlp_axes:
      out = jax.lax.psum(out, mlp_axes)        # each tensor rank held a hidden slice
    if batch:
      load, nums, den = jax.tree.map(lambda v: jax.lax.psum(v, batch), (load, nums, den))
    return out, load, {key: v / jnp.maximum(den, 1.0) for key, v in nums.items()}

  rows = _spec_entry(batch)
  e, f = _spec_entry(exp_axes), _spec_entry(mlp_axes)
  # Inside a pipeline stage (parallel/pipeline.py) `pipe` is already manual:
  # this map takes the remaining axes.
  free = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
  fn = jax.shard_map(
      local, mesh=mesh, axis_names=free,
      in_specs=(P(rows), P(rows), P(), P(), P(e, None, f), P(e, None, f), P(e, f, None)),
      out_specs=(P(rows), P(), P()))
  return fn(x, valid, gate, bias, w1, w3, w2)
