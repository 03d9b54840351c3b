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
     experts on what arrives, send the results back, add each, times its
     gate, to its token (rounds of fixed capacity, below); experts not
     split: run every expert locally (weights gathered by XLA);
  3. hidden units split over `tensor` (`mlp_moe -> tensor`): each tensor rank
     computes a slice of every expert's hidden layer; `psum` over `tensor`;
  4. the per-expert load (the aux-loss-free bias update's input) and the
     balance losses' numerators/denominator are `psum`-ed over the batch
     axes: every device sees the global batch's numbers, so all apply the
     same bias.

Padding tokens (valid False) are never dispatched: they get a sentinel
destination (experts split) or the sentinel expert id E (not split), and
their routed output is 0 (the model masks them anyway; loads and balance
terms already weigh tokens by valid).

The exchange: dropless and exact for any routing, from fixed-size buffers
(all_to_all needs static shapes). A device holds R = local tokens x top-k
routed rows; it sorts them by destination device (the owner of their
expert), and the row at position q among those for destination p goes out
in round q // C, slot q % C, with

  C = moe_ep_capacity x R / P (rounded up to 8, at most R; ModelConfig,
      default 2; C = R when the factor is 0): rows per destination and round.

  round 0     always, straight-line code: a [P, C, d] buffer goes out with
              `jax.lax.all_to_all` over `expert`, the local experts run on
              the P C slots that arrive, the results come back, and each is
              added, times its gate, to its token's [n, d] output.
  rounds 1..m only in steps whose busiest destination holds more than C
              rows: m = ceil(R / C) - 1 is the static bound (every row to one
              device). A `lax.cond` on busiest > C (busiest: the largest
              count `pmax`-ed over `expert`, so all devices of one all_to_all
              group take the same branch; groups along other axes decide on
              their own) runs a `lax.scan` over the m rounds, each of the
              same [P, C, d] shape and skipped (cond) when busiest <= r C
              (m = 1: the one round, no inner cond or scan). A custom VJP
              (`_overflow_cond`): its residuals are its inputs themselves (no
              copies out of the cond), and its backward is a cond that
              replays the rounds, one at a time (checkpointed scan body).

Empty slots carry the sentinel expert id E/P (out of range for the local
experts): a kernel that skips such rows (the contract of the model's
kernels) computes nothing for them, and their output is zeroed after the
kernel in any case. The overflow rounds run before round 0 and, through a
data dependency (`_sequenced`), their backward after round 0's, so the
backward holds one round's buffers at a time.

Per device and round: P C rows of d values go out and as many come back;
the buffers are [P, C, d] (send, receive, results), the kernel's working
set on P C rows and [n, d] accumulators: nothing is sized for every row a
device could receive. Expert FLOPs: 6 d f (f: moe_inter_dim) per row
received; empty slots cost nothing with a kernel that skips the sentinel
(the blocked kernel still pads each expert's rows to its block). A step
whose busiest destination gets at most C rows (at the default, twice the
even share R/P) is round 0 alone: 2R rows of buffer each way; one needing
m' extra rounds moves (1 + m') P C rows each way, at most ceil(R/C) P C ~
P R when every row goes to one device. `jax.lax.ragged_all_to_all` would
move only the real rows, but XLA:CPU cannot compile it (DESIGN.md §8), so
the exchange is built from `all_to_all` on every backend.

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

from deepseek_jax import fp8 as fp8_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.rules import Rules, as_axes, axes_size, mesh_axes_of, spec_for
from deepseek_jax.buffers import (BitsWeight, bits_only, from_bits, on_bits, plain_weight,
                                  take_bits)


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
  """Rows per destination and round (see the module doc): factor x rows / ep
  rounded up to a multiple of 8, at most `rows`; `rows` when factor is 0."""
  if not factor:
    return rows
  return min(rows, -(-math.ceil(factor * rows / ep) // 8) * 8)


def _round(r, tokens, flat, gates, order, counts, start, w1, w3, w2, *, axis: str, ep: int,
           cap: int, k: int, kernel):
  """Exchange round r: rows at positions [r cap, (r+1) cap) of their
  destination go out in one [ep, cap, d] buffer, the local experts run on
  what arrives, the results come back and are added, gated, to their tokens.
  Returns [n, d]. flat, gates [R]: each routed row's global expert and gate;
  order, counts, start: the rows sorted by destination (rows of destination
  p are order[start[p] : start[p] + counts[p]])."""
  n, d = tokens.shape
  e_local = w1.shape[0]
  j = r * cap + jnp.arange(cap)
  filled = j[None, :] < counts[:, None]                            # [ep, cap]
  src = order[jnp.minimum(start[:, None] + j[None, :], flat.shape[0] - 1)]  # row ids
  send_x = jnp.where(filled[..., None], take_bits(tokens, src // k, mode="clip"), 0)
  # Empty slots carry the sentinel expert id e_local: the kernel skips them.
  send_e = jnp.where(filled, flat[src] % e_local, e_local)
  recv_x = _all_to_all(send_x, axis).reshape(ep * cap, d)         # [ep(src) cap, d]
  recv_e = jax.lax.all_to_all(send_e, axis, 0, 0).reshape(ep * cap, 1)
  live = recv_e < e_local
  y = kernel(recv_x, recv_e, live.astype(tokens.dtype), w1, w3, w2)
  # Zero the sentinel slots whatever the kernel made of them.
  y = jnp.where(live, y, jnp.zeros((), y.dtype)).reshape(ep, cap, d)
  back = _all_to_all(y, axis)                                      # [ep(dst), cap, d]
  weight = jnp.where(filled, gates[src], 0).astype(back.dtype)
  return jnp.zeros((n, d), back.dtype).at[src // k].add(back * weight[..., None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _all_to_all(x, axis: str):
  """all_to_all(x, axis, 0, 0), a 16-bit float x sent as its uint16 bits,
  forward and backward (its transpose is the same exchange). XLA:CPU has no
  16-bit float all-to-all: its float normalization sent float32 copies
  (2 GiB per [ep cap, 7168] buffer at V3 widths, two live in a MoE
  backward); bit-exact on every backend."""
  return on_bits(lambda b: jax.lax.all_to_all(b, axis, 0, 0), x)


def _all_to_all_fwd(x, axis):
  return _all_to_all(x, axis), None


def _all_to_all_bwd(axis, _, ct):
  return (_all_to_all(ct, axis),)


_all_to_all.defvjp(_all_to_all_fwd, _all_to_all_bwd)


def _overflow(busiest, *operands, rnd, rounds: int, cap: int):
  """Rounds 1..rounds of `_round` (`rnd`, bound to its statics), each only
  when the busiest destination of the expert group holds rows past r cap;
  returns the sum of their outputs [n, d]. The body is rematerialised, so a
  round's buffers live one round at a time, forward and backward."""
  if rounds == 1:
    # The caller's cond already says the one round is needed (busiest >
    # cap) and replays this function in its backward: no inner cond, whose
    # linearization passed its operands (the expert weights among them) out
    # of the branch as residuals, copies (5.25 GiB at V3 widths), and no
    # one-step scan.
    return rnd(1, *operands)
  zeros = jnp.zeros_like(operands[0])   # zeros_like keeps the varying mesh axes

  @jax.checkpoint
  def body(acc, r):
    part = jax.lax.cond(busiest > r * cap, lambda: rnd(r, *operands), lambda: zeros)
    return acc + part, None
  return jax.lax.scan(body, zeros, jnp.arange(1, rounds + 1))[0]


def _exchanging_kernel(tokens, experts, gates, w1, w3, w2, *, axis: str, ep: int, kernel,
                       capacity: float = 0.0, token_valid: jax.Array | None = None,
                       batch_axes: tuple[str, ...] = (), mlp_axes: tuple[str, ...] = ()):
  """`kernel` with the experts split over mesh axis `axis` (size ep): same
  signature and result [n, d]; w* hold this device's E/ep experts and
  `experts` [n, k] are global ids. token_valid [n] (optional): tokens that
  are False (padding) are not sent; their output is 0.

  batch_axes: the mesh axes the rows are split over; mlp_axes: those the
  weights' hidden units are split over. Devices along batch axes other than
  `axis` may take different overflow branches, so every operand is made
  varying over all of them first (`pcast`): the gradient's psums (its
  transpose) then run outside the branches, on every device."""
  n, d = tokens.shape
  k = experts.shape[1]
  rows = n * k
  flat = experts.reshape(-1)                                        # [R]
  dest = flat // w1.shape[0]                                        # owning device
  if token_valid is not None:
    dest = jnp.where(jnp.repeat(token_valid.astype(bool), k), dest, ep)   # ep: not sent
  by_dest = sort_by_group(dest, ep + 1)
  counts = by_dest.counts[:ep]
  start = jnp.cumsum(counts) - counts
  others = tuple(a for a in batch_axes if a != axis)
  if others:
    w1, w3, w2 = jax.tree.map(lambda w: jax.lax.pcast(w, others, to="varying"),
                              (w1, w3, w2))
  if mlp_axes:
    tokens, gates = (jax.lax.pcast(v, tuple(mlp_axes), to="varying") for v in (tokens, gates))
  operands = (tokens, flat, gates.reshape(-1), by_dest.order, counts, start, w1, w3, w2)
  cap = exchange_capacity(rows, ep, capacity)
  rnd = functools.partial(_round, axis=axis, ep=ep, cap=cap, k=k, kernel=kernel)
  rounds = -(-rows // cap) - 1                 # extra rounds a fully skewed step needs
  if not rounds:
    return rnd(0, *operands)
  # All devices of one all_to_all group (the expert axis) take one branch.
  busiest = jax.lax.pmax(counts.max(), axis)
  extra = _overflow_cond(busiest, *operands, rnd=rnd, rounds=rounds, cap=cap)
  # Round 0 after the overflow rounds; its backward before theirs.
  tokens, flat, gates, order, counts, start, w1, w3, w2 = operands
  extra, (tokens, gates, w1, w3, w2) = _sequenced(extra, (tokens, gates, w1, w3, w2))
  return extra + rnd(0, tokens, flat, gates, order, counts, start, w1, w3, w2)


# The float operands of `_round` (tokens, gates, w1, w3, w2) by position.
_FLOAT_OPERANDS = (0, 2, 6, 7, 8)


def _with_value(op, value):
  """op with its differentiable array replaced by value (a BitsWeight keeps
  its bits)."""
  return op._replace(value=value) if isinstance(op, BitsWeight) else value


def _overflow_cond(busiest, *operands, rnd, rounds: int, cap: int):
  """The overflow rounds (`_overflow`) when busiest > cap, else 0 [n, d].

  With a custom VJP: differentiating the `lax.cond` itself made its forward
  return the checkpointed branch's residuals (its operands: the tokens and
  the expert weights) as outputs of the cond, i.e. copies (5.25 GiB of
  bfloat16 expert weights per MoE layer at V3 widths, live until the
  backward). Here the residuals are the operands themselves, and the
  backward is its own cond: the rounds' VJP (each round recomputed) or zero
  cotangents for the float operands."""
  run = functools.partial(_overflow, rnd=rnd, rounds=rounds, cap=cap)
  # A BitsWeight crosses into the branches as its bits alone (buffers.py:
  # its value is rebuilt inside as a bitcast nothing reads), so no cond
  # operand holds a 16-bit float copy of the weights.
  like = operands

  def switch(busiest, *ops):
    def overflow(b, *o):
      return run(b, *from_bits(like, o))
    return jax.lax.cond(busiest > cap, overflow, lambda b, *o: jnp.zeros_like(o[0]), busiest,
                        *bits_only(ops))

  def fwd(busiest, *ops):
    return switch(busiest, *ops), (busiest, ops)

  def bwd(res, ct):
    busiest, ops = res

    def grads(ct, busiest, *passed):
      full = from_bits(like, passed)

      def f(*fl):
        ops_fl = list(full)
        for i, v in zip(_FLOAT_OPERANDS, fl):
          ops_fl[i] = _with_value(full[i], v)
        return run(busiest, *ops_fl)
      return jax.vjp(f, *(plain_weight(full[i]) for i in _FLOAT_OPERANDS))[1](ct)

    def zeros(ct, busiest, *passed):
      return tuple(jnp.zeros_like(plain_weight(v)) for v in from_bits(
          [like[i] for i in _FLOAT_OPERANDS], [passed[i] for i in _FLOAT_OPERANDS]))

    cts = jax.lax.cond(busiest > cap, grads, zeros, ct, busiest, *bits_only(ops))
    full = [None] * len(ops)
    for i, v in zip(_FLOAT_OPERANDS, cts):
      full[i] = BitsWeight(v, None) if isinstance(ops[i], BitsWeight) else v
    return (None, *full)

  f = jax.custom_vjp(switch)
  f.defvjp(fwd, bwd)
  return f(busiest, *operands)


@jax.custom_vjp
def _sequenced(first, then):
  """Identity on (first, then) whose transpose hands back first's cotangent
  only after every cotangent of `then` exists: the backward of what consumes
  `then` (round 0) completes, and its residuals are freed, before the
  backward of what produced `first` (the overflow rounds) starts. An
  optimization_barrier would say this, but XLA:CPU drops barriers before
  scheduling; this is a real data dependency (0 x an element of each)."""
  return first, then


def _sequenced_fwd(first, then):
  return (first, then), None


def _sequenced_bwd(_, cts):
  ct_first, ct_then = cts
  dep = sum(c.reshape(-1)[0].astype(jnp.float32) for c in jax.tree.leaves(ct_then)
            if jnp.issubdtype(c.dtype, jnp.floating))      # not a BitsWeight's bits
  return ct_first.at[(0,) * ct_first.ndim].add((0 * dep).astype(ct_first.dtype)), ct_then


_sequenced.defvjp(_sequenced_fwd, _sequenced_bwd)


def _masked_kernel(tokens, experts, gates, w1, w3, w2, *, kernel, token_valid):
  """`kernel` with padding tokens (token_valid False) given the sentinel
  expert id E (not computed) and output 0."""
  live = token_valid.astype(bool)[:, None]
  y = kernel(tokens, jnp.where(live, experts, w1.shape[0]), jnp.where(live, gates, 0),
             w1, w3, w2)
  return jnp.where(live, y, jnp.zeros((), y.dtype))


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
    devices it runs inside the exchange, on the rows that arrive. Padding
    tokens (valid False) reach it with an out-of-range expert id (to be
    skipped) or not at all, and their routed output is 0.
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

  # FSDP: without expert parallelism a kernel that gathers one expert's
  # weight at a time (`embed_axes`) takes the weights as stored, the width
  # split over the axes FSDP puts it on; else shard_map gathers every
  # expert's weight at once (10.5 GiB per V3 layer at tensor=2). With expert
  # parallelism the overflow rounds run under a cond whose branch may differ
  # between FSDP peers: no collective may sit inside, so the map gathers.
  embed = ()
  if ep == 1 and getattr(kernel, "gathers_weights", False) \
      and not isinstance(w1, fp8_lib.Quantized):
    embed = tuple(a for a in as_axes(spec_for(("exp", "embed", "mlp_moe"), rules,
                                                w1.shape, sizes)[1])
                  if a not in frozenset(mesh.manual_axes) and sizes[a] > 1)
    if embed:
      kernel = functools.partial(kernel, embed_axes=embed)

  def local(x, valid, gate, bias, w1, w3, w2):
    # routed_ffn hands the kernel x.reshape(b s, d): valid.reshape(-1) matches.
    if ep > 1:
      kern = functools.partial(_exchanging_kernel, axis=exp_axes[0], ep=ep, kernel=kernel,
                               capacity=cfg.moe_ep_capacity, token_valid=valid.reshape(-1),
                               batch_axes=tuple(batch), mlp_axes=tuple(mlp_axes))
    else:
      kern = functools.partial(_masked_kernel, kernel=kernel, token_valid=valid.reshape(-1))
    out, load, nums, den = ffn(x, valid, gate, bias, w1, w3, w2, kern)
    if mlp_axes:
      out = jax.lax.psum(out, mlp_axes)        # each tensor rank held a hidden slice
    if batch:
      load, nums, den = jax.tree.map(lambda v: jax.lax.psum(v, batch), (load, nums, den))
    return out, load, {key: v / jnp.maximum(den, 1.0) for key, v in nums.items()}

  rows = _spec_entry(batch)
  e, f, dd = _spec_entry(exp_axes), _spec_entry(mlp_axes), _spec_entry(embed)
  # Inside a pipeline stage (parallel/pipeline.py) `pipe` is already manual:
  # this map takes the remaining axes.
  free = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
  fn = jax.shard_map(
      local, mesh=mesh, axis_names=free,
      in_specs=(P(rows), P(rows), P(), P(), P(e, dd, f), P(e, dd, f), P(e, f, dd)),
      out_specs=(P(rows), P(), P()))
  return fn(x, valid, gate, bias, w1, w3, w2)
