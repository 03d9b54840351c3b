"""Pipeline parallelism over the mesh's `pipe` axis, driven by the simulator's
timelines (DESIGN.md §4; schedules in parallel/schedules.py, stages and the
state stored by stage in parallel/pipeline_layout.py, the tick table in
parallel/pipeline_table.py).

    grad_fn = pipeline_value_and_grad(fns, mesh, layout, schedule="dualpipe",
                                      n_microbatches=8)
    (loss, aux), grads = grad_fn(params, router_bias, batch, loss_args)

is `jax.value_and_grad` of the loss that `fns` (a `StageFns`: the model's
stage functions and the loss, passed in; this layer imports neither) compose,
computed by a pipeline: the same loss, gradients and aux up to float
summation order. train/step.py wires the model's stages (model/stages.py) and
the pretraining loss (train/losses.py) into it (`pipelined_pretraining_grad`).

Executor
--------
Inside one `jax.shard_map` manual over `pipe` (the other mesh axes stay
automatic: data/FSDP/tensor sharding and the MoE's expert-parallel shard_map
work inside a stage as they do without a pipeline), a `lax.scan` over the
table's ticks runs `lax.switch` on the rank's op, then two `ppermute`s per
direction move the activation made this tick to the next stage and the
input gradient to the previous one, and the receivers store them in the
slots the table names. A switch takes and returns only what its op reads
and makes: the backward half returns its weight gradients (zeros from I
and idle ops, made after the op's input gradient so that XLA does not hold
them through its VJP) and the tick adds them to the accumulators in place,
since XLA copies every array a conditional's branch passes through
unchanged. The accumulators hold one row per block of the rank's chunks
(`_accumulator_rows`), not one per slot and chunk: padded slots have none.

Backward ops recompute their stage's forward from the held stage input and
apply its VJP (per micro-batch VJPs, so that a schedule can put any op
anywhere; nothing is differentiated through the schedule): B takes the input
and weight gradients, I only the input gradient, W only the weight gradients
(ZeroBubble's split; the weight part of the VJP is dead code in I and XLA
drops it, and vice versa). The price is one extra stage forward per
micro-batch, as with full activation recomputation. An op with weight
gradients takes the VJP in parts (`_Rank.weight_backward`): head and loss,
then the blocks inside a `lax.cond`, so that the buffer the blocks' weight
gradients fill exists only from the blocks' backward on.

DualPipe holds two chunks per rank: rank r runs stage r for the micro-batches
entering at rank 0 (direction 0) and stage PP-1-r for those entering at rank
PP-1 (direction 1), so every stage's weights exist twice (the report's 2x
parameters): the state stores each stage once (rank r: stage r), the step
gathers the reversed copy in (one collective-permute of a stage's weights),
and at its end each rank sends its chunk-1 gradients to the rank storing
that stage (one ppermute), which adds them to its own.

DualPipeV (schedule "dualpipev", the layout of pipeline_layout.split_layers_v)
cuts the blocks into 2 PP chunks and rank r stores chunks r and 2PP-1-r as
its own stage (one parameter copy; nothing gathered, nothing sent home):
direction 0 runs chunk r (the embedding on rank 0), direction 1 chunk
2PP-1-r (the head, MTP and loss on rank 0); at rank PP-1 a micro-batch
turns from chunk PP-1 to chunk PP locally (the table's rah / rgh slots, no
message). A chunk's blocks are run one slot at a time from the rank's stack
(`_Rank.blocks`: a dynamic slice per slot, as the model's own scan takes,
no copy of the chunk). A backward op runs in two switches per tick
(`_Rank.v_tail`, `_Rank.v_blocks`): the head's and loss's VJP first (its
shared-weight gradients added to the accumulators between the two), then
the blocks one slot at a time from the slot inputs the first kept, their
weight gradients filling only the chunk's slots; the accumulators are the
rank's own stack.

Loss. An unpipelined loss is a mean over the whole batch's target tokens
(and a balance loss a mean over its non-empty sequences), so each
micro-batch contributes its sums divided by the whole batch's counts
(`StageFns.totals`, computed from the batch before the pipeline starts): the
pipelined loss is the same number, not a mean of micro-batch means. A
stage's part of the loss (what its VJP differentiates) is the loss of its
own blocks' and (last stage) head's terms; the loss is linear in them.

What XLA realises of DualPipe's overlap. The point of DualPipe's FB pairs is
that one micro-batch's forward computes while the other's backward
communicates (the MoE all-to-all, and the pipeline sends). Here an FB op is
the two computations in one branch of one XLA program: on GPU, XLA's
latency-hiding scheduler may overlap the collectives of one with the
computation of the other inside the branch, and the per-tick `ppermute`s are
asynchronous collectives it can start early; nothing forces the overlap, and
the control flow (one `switch` per tick) is a scheduling barrier between
ticks. On CPU collectives are synchronous, so nothing overlaps: the schedules
differ in order, bubble and memory, not in hidden communication. Every
schedule gives the unpipelined loss and gradients (tests/test_pipeline.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from deepseek_jax.buffers import zeros_after
from deepseek_jax.parallel import schedules as sched
from deepseek_jax.parallel.pipeline_layout import (PIPE, STACKS, StageLayout, layout_sizes,
                                                   stage_tree, unstage_tree, zero_padded_slots)
from deepseek_jax.parallel.pipeline_table import B_CODES, CHECK_TIMES, NO_OP, Table, build_table


@dataclasses.dataclass(frozen=True)
class StageFns:
  """What a stage computes, as pure functions of arrays (the caller's model
  and loss; the executor composes them per rank and knows nothing else).
  `mb` is a micro-batch (the batch dict, rows j, j + M, ...); `totals` is
  what `totals` returned for the whole batch; parameters are the caller's
  trees split by key: `stacks` the layer stacks (keys of pipeline_layout's
  STACKS, [slots, ...] on a stage), `shared` the rest (replicated).

    totals(batch) -> totals             the whole batch's denominators
    embed(shared, mb) -> x              stage 0's input [rows, seq, dim]
    blocks(stacks, stacks_bias, x, mb, totals, active) -> (x, layers)
        a stage's block slots; active {stack key: bool [slots]}; layers:
        {stack key: pytree of [slots, ...]} (a padded slot's zero), the
        per-layer outputs, summed over micro-batches, returned in the
        model's layer order
    head(shared, shared_bias, x, mb, totals) -> head
        the last stage's outputs (any pytree, summed over micro-batches)
    loss(layers, head, totals, loss_args) -> (loss, aux)
        linear in (layers, head): a stage's own part of the loss is its
        loss(layers, head or zeros)[0]; the result is loss(the sums).
  """
  totals: Callable[[dict], Any]
  embed: Callable[..., jax.Array]
  blocks: Callable[..., tuple[jax.Array, Any]]
  head: Callable[..., Any]
  loss: Callable[..., tuple[jax.Array, Any]]


def check_pipeline(n_stages: int, schedule: str, n_microbatches: int,
                   batch_rows: int | None = None) -> None:
  """Clear errors, before anything compiles, for what the pipeline cannot run."""
  try:
    sched._check_args(schedule, n_stages, n_microbatches, CHECK_TIMES)
  except ValueError as e:     # the simulator's names -> the config fields
    raise ValueError(f"pipeline_schedule={schedule!r}, num_microbatches={n_microbatches}, "
                     f"mesh.pipe={n_stages}: {e}") from None
  if batch_rows is not None and batch_rows % n_microbatches:
    raise ValueError(
        f"batch of {batch_rows} rows does not split into num_microbatches={n_microbatches} "
        "equal micro-batches; make the batch size a multiple of num_microbatches.")


def _zeros(spec):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def _cond_head(pred, fn, spec, shared, y, rest, *, grad_shared: bool):
  """fn(shared, y, *rest) where pred holds, zeros of spec elsewhere.

  With a custom VJP. Differentiating the `lax.cond` itself made its forward
  hand out the head's residuals as outputs of the cond, i.e. copies of its
  operands (the MTP block's bfloat16 expert weights: 5.25 GiB at V3 widths,
  live until the backward). Here the residuals are the operands themselves
  and the backward is its own cond that recomputes the head and takes its
  VJP (the head's forward twice on the last chunk: a tail of the whole
  step's FLOPs) or returns zeros. grad_shared False: the caller does not
  differentiate shared (no weight gradient computed for it); rest is never
  differentiated."""
  def switch(pred, shared, y, rest):
    return jax.lax.cond(pred, fn, lambda *_: _zeros(spec), shared, y, *rest)

  def fwd(pred, shared, y, rest):
    return switch(pred, shared, y, rest), (pred, shared, y, rest)

  def bwd(res, ct):
    pred, shared, y, rest = res
    # Only the float cotangents pass the cond; integer outputs' are float0.
    leaves, tdef = jax.tree.flatten(ct)
    floats = [c for c in leaves if c.dtype != jax.dtypes.float0]

    def grads(floats, shared, y):
      it = iter(floats)
      ct = tdef.unflatten([np.zeros(c.shape, c.dtype) if c.dtype == jax.dtypes.float0
                           else next(it) for c in leaves])
      if grad_shared:
        return jax.vjp(lambda sh, y: fn(sh, y, *rest), shared, y)[1](ct)
      return None, jax.vjp(lambda y: fn(shared, y, *rest), y)[1](ct)[0]

    def zeros(floats, shared, y):
      return (zeros_after(shared, y) if grad_shared else None, zeros_after(y, y))
    g_sh, g_y = jax.lax.cond(pred, grads, zeros, floats, shared, y)
    return None, g_sh, g_y, None

  f = jax.custom_vjp(switch)
  f.defvjp(fwd, bwd)
  return f(pred, shared, y, rest)


class _Rank:
  """One rank's program inside the shard_map (the per-rank view: stage
  params squeezed to [slots, ...], table fields to [ticks])."""

  def __init__(self, fns: StageFns, pp: int, dirs: int, stacks, stacks_b, active, shared,
               shared_b, mbs, totals, loss_args, rows, n_rows, parts=None):
    rank = jax.lax.axis_index(PIPE)
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)          # noqa: E731
    self.fns, self.pp, self.dirs = fns, pp, dirs
    # {stack key: [dirs, slots]}: each chunk slot's accumulator row (n_rows[key]: padded)
    self.rows, self.n_rows = squeeze(rows), n_rows
    self.stacks = [squeeze(t) for t in stacks]
    self.stacks_b = [squeeze(t) for t in stacks_b]
    self.active = [squeeze(t) for t in active]
    self.shared, self.shared_b, self.mbs = shared, shared_b, mbs
    self.totals, self.loss_args = totals, loss_args
    # DualPipeV (parts: per direction {stack key: (first slot, slots)} of the
    # rank's one stack): chunk r (d = 0) starts at the embedding, chunk
    # 2PP-1-r (d = 1) ends at rank 0 with the head; a static False skips them.
    self.parts = parts
    if parts is not None:
      self.stacks, self.stacks_b = self.stacks * dirs, self.stacks_b * dirs
      self.first, self.last = [rank == 0, False], [False, rank == 0]
    else:
      chunk = [rank, pp - 1 - rank]
      self.first = [chunk[d] == 0 for d in range(dirs)]
      self.last = [chunk[d] == pp - 1 for d in range(dirs)]
    mb = self.micro(0)
    self.x_spec = jax.eval_shape(fns.embed, shared, mb)
    self.head_spec = jax.eval_shape(fns.head, shared, shared_b, self.x_spec, mb, totals)
    on = (self.active[0] if parts is None else
          {k: jnp.ones(jax.tree.leaves(v)[0].shape[:1], bool)
           for k, v in self.stacks[0].items()})
    self.layers_spec = jax.eval_shape(fns.blocks, self.stacks[0], self.stacks_b[0],
                                      self.x_spec, mb, totals, on)[1]

  def micro(self, j):
    return {k: jax.lax.dynamic_index_in_dim(v, j, axis=1, keepdims=False)
            for k, v in self.mbs.items()}

  def embed(self, d, shared, x_in, mb):
    """Chunk d's input: the embedding on the first chunk, else x_in."""
    if self.first[d] is False:
      return x_in
    return jnp.where(self.first[d], self.fns.embed(shared, mb).astype(x_in.dtype), x_in)

  def head(self, d, shared, y, mb, grad_shared: bool = True):
    """The head's outputs after the model's last chunk, zeros elsewhere
    (`_cond_head`; grad_shared: see there)."""
    if self.last[d] is False:
      return _zeros(self.head_spec)
    def fn(shared, y, shared_b, mb, totals):
      return self.fns.head(shared, shared_b, y, mb, totals)
    return _cond_head(self.last[d], fn, self.head_spec, shared, y,
                      (self.shared_b, mb, self.totals), grad_shared=grad_shared)

  def blocks(self, d, stacks, x, mb):
    """(y, layers) of chunk d's blocks: its stage's slots, or (DualPipeV) the
    chunk's slots of the rank's stack one at a time (`_slot`: no copy of
    the chunk's weights), layers [slots of chunk d, ...]."""
    if self.parts is None:
      return self.fns.blocks(stacks, self.stacks_b[d], x, mb, self.totals, self.active[d])
    layers = {}
    for key, (off, n) in self.parts[d].items():
      def body(x, i, key=key, off=off):
        return self._slot(d, key, off, i, stacks[key], x, mb)
      x, lay = jax.lax.scan(body, x, jnp.arange(n))
      if lay is not None:
        layers[key] = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), lay)
    return x, layers

  def _slot(self, d, key, off, i, stack, x, mb):
    """(y, layers [1, ...] or None) of slot i of chunk d's `key` stack, its
    weights `stack`'s row off + i."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, off + i, 1)   # noqa: E731
    bias = {k: jax.tree.map(take, v) for k, v in self.stacks_b[d].items() if k == key}
    on = {key: jax.lax.dynamic_slice_in_dim(self.active[d][key], i, 1)}
    w = stack if jax.tree.leaves(stack)[0].shape[0] == 1 else jax.tree.map(take, stack)
    y, lay = self.fns.blocks({key: w}, bias, x, mb, self.totals, on)
    return y, lay.get(key)

  # --- DualPipeV's backward: two switches per tick -----------------------------
  # An op's backward runs as a tail phase (chunk forward, keeping each slot's
  # input; the head's / loss's VJP: the shared-weight gradients and the
  # blocks' output cotangent) and, in a second switch after the tick has
  # added the shared gradients, a blocks phase (one slot at a time, newest
  # first: recompute and VJP; weight gradients into the chunk's rows; the
  # embedding's VJP on the first chunk). So the shared weights' gradient
  # buffer (head, MTP, embedding) and the blocks' weight gradients are never
  # live together.

  def _n_max(self):
    """{stack key: the most slots a chunk of this rank has}."""
    return {k: max(p.get(k, (0, 0))[1] for p in self.parts) for k in self.stacks[0]}

  def v_tail(self, d, j, x_in, dy, want_weights):
    """(carry, shared-weight gradients) of chunk d's op on micro-batch j;
    carry: the blocks' output cotangent, the layers' cotangents and the slot
    inputs, each padded to the most slots a chunk has."""
    mb, stacks, n_max = self.micro(j), self.stacks[d], self._n_max()
    dy = dy if self.last[d] is False else jnp.where(self.last[d], jnp.zeros_like(x_in), dy)
    x = self.embed(d, self.shared, x_in, mb)
    inputs, layers = {}, {}
    for key, (off, n) in self.parts[d].items():
      def fwd(x, i, key=key, off=off):
        y, lay = self._slot(d, key, off, i, stacks[key], x, mb)
        return y, (x, lay)
      x, (inputs[key], lay) = jax.lax.scan(fwd, x, jnp.arange(n))
      if lay is not None:
        layers[key] = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), lay)

    def tail(shared, y, layers, grad_shared=True):
      head = self.head(d, shared, y, mb, grad_shared)
      return self.fns.loss(self._full_layers(d, layers), head, self.totals, self.loss_args)[0]
    one = jnp.ones((), jnp.float32)
    if want_weights:
      g_sh, ct_y, ct_layers = jax.vjp(tail, self.shared, x, layers)[1](one)
    else:
      ct_y, ct_layers = jax.vjp(lambda y, l: tail(self.shared, y, l, False), x, layers)[1](one)
      g_sh = self.zero_shared(ct_y)
    ct_y = ct_y + dy.astype(ct_y.dtype)

    def pad(a, n):
      return jnp.zeros((n,) + a.shape[1:], a.dtype).at[:a.shape[0]].set(a)
    x_spec = jnp.zeros((1,) + x_in.shape, x_in.dtype)
    carry = {"ct": ct_y,
             "inputs": {k: pad(inputs.get(k, x_spec[:0]), n) for k, n in n_max.items()},
             "layers": {k: jax.tree.map(
                 lambda s, k=k: pad(jnp.zeros((0,) + s.shape[1:], s.dtype), n_max[k]), spec)
                 for k, spec in self.layers_spec.items()}}
    for k, ct in ct_layers.items():
      carry["layers"][k] = jax.tree.map(lambda c, z: z.at[:c.shape[0]].set(c.astype(z.dtype)),
                                        ct, carry["layers"][k])
    return carry, g_sh

  def v_blocks(self, d, j, carry, want_input, want_weights):
    """(input gradient or None, chunk d's stage-weight gradients (zeros
    without weights), the embedding's gradients [used shared leaves]) from
    v_tail's carry."""
    mb, stacks = self.micro(j), self.stacks[d]
    ct, grads = carry["ct"], self.zero_stacks()
    for key, (off, n) in reversed(list(self.parts[d].items())):
      cl = carry["layers"].get(key)
      cl = None if cl is None else jax.tree.map(lambda a: a[:n, None], cl)

      def bwd(ct, xs, key=key, off=off):
        i, x_i, cl_i = xs
        if not want_weights:
          out, f_vjp = jax.vjp(lambda x: self._slot(d, key, off, i, stacks[key], x, mb), x_i)
          return f_vjp((ct, cl_i if out[1] is not None else None))[0], None
        w = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, off + i, 1), stacks[key])
        out, f_vjp = jax.vjp(lambda w, x: self._slot(d, key, off, i, w, x, mb), w, x_i)
        g_w, g_x = f_vjp((ct, cl_i if out[1] is not None else None))
        return g_x, g_w
      ct, g = jax.lax.scan(bwd, ct, (jnp.arange(n), carry["inputs"][key][:n], cl),
                           reverse=True)
      if want_weights:
        g = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), g)
        grads[key] = jax.tree.map(lambda z, a: z.at[:n].set(a.astype(z.dtype)), grads[key], g)
    if not want_weights:        # zeros made after the input gradient (`zeros_after`)
      grads = zeros_after(grads, ct)
    used = self._embed_leaves()
    leaves = jax.tree.leaves(self.shared)
    g_emb = zeros_after([leaves[i] for i in used], ct)
    if self.first[d] is not False and want_weights:
      tdef = jax.tree.structure(self.shared)

      def emb(part):
        full = list(leaves)
        for i, a in zip(used, part):
          full[i] = a
        return self.fns.embed(jax.tree.unflatten(tdef, full), mb).astype(ct.dtype)
      (g_emb,) = jax.vjp(emb, [leaves[i] for i in used])[1](
          jnp.where(self.first[d], ct, jnp.zeros_like(ct)))
    g_x = None
    if want_input:
      g_x = jnp.where(self.first[d], jnp.zeros_like(ct), ct) if self.first[d] is not False else ct
    return g_x, grads, g_emb

  def _embed_leaves(self) -> list[int]:
    """Indices (flattened) of the shared leaves the embedding reads (traced
    once)."""
    if getattr(self, "_embed_idx", None) is not None:
      return self._embed_idx
    leaves, tdef = jax.tree.flatten(self.shared)
    closed = jax.make_jaxpr(lambda *a: self.fns.embed(jax.tree.unflatten(tdef, a),
                                                      self.micro(0)))(*leaves)
    read = {id(v) for e in closed.jaxpr.eqns for v in e.invars}
    read |= {id(v) for v in closed.jaxpr.outvars}
    self._embed_idx = [i for i, v in enumerate(closed.jaxpr.invars) if id(v) in read]
    return self._embed_idx

  def stage(self, d, stacks, shared, x_in, mb, grad_shared: bool = True):
    """(y, the stage's part of the loss, layers, head) of chunk d
    (grad_shared: `_cond_head`'s)."""
    x = self.embed(d, shared, x_in, mb)
    y, layers = self.blocks(d, stacks, x, mb)
    head = self.head(d, shared, y, mb, grad_shared)
    loss, _ = self.fns.loss(self._full_layers(d, layers), head, self.totals, self.loss_args)
    return y, loss, layers, head

  def _full_layers(self, d, layers):
    """Chunk d's layers in the accumulator's shape (DualPipeV: the rank's
    slots, chunk d's at its offset; zeros elsewhere)."""
    if self.parts is None:
      return layers
    def place(key, spec):
      z = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
      if key not in layers:
        return z
      off, _ = self.parts[d][key]
      return jax.tree.map(lambda a, v: jax.lax.dynamic_update_slice_in_dim(
          a, v.astype(a.dtype), off, 0), z, layers[key])
    return {key: place(key, spec) for key, spec in self.layers_spec.items()}

  def forward(self, acc, d, j, x_in):
    """(acc plus chunk d's per-layer sums and head of micro-batch j, its y)."""
    y, _, layers, head = self.stage(d, self.stacks[d], self.shared, x_in, self.micro(j))
    if self.parts is not None:   # the rank's slots: chunk d's rows
      layers, d = self._full_layers(d, layers), 0
    acc = {"layers": jax.tree.map(lambda a, v: a.at[d].add(v), acc["layers"], layers),
           "head": jax.tree.map(jnp.add, acc["head"], head)}
    return acc, y

  def backward(self, d, j, x_in, dy, want_input: bool, want_weights: bool):
    """(input gradient or None, stage-weight gradients, shared-weight
    gradients; zeros where not wanted) of chunk d's VJP on micro-batch j."""
    mb = self.micro(j)
    dy = dy if self.last[d] is False else jnp.where(self.last[d], jnp.zeros_like(x_in), dy)
    one = jnp.ones((), jnp.float32)

    def f(stacks, shared, x, grad_shared=True):
      return self.stage(d, stacks, shared, x, mb, grad_shared)[:2]
    g_x, g_st, g_sh = None, self.zero_stacks(), self.zero_shared()
    if want_weights:
      g_x, g_st, g_sh = self.weight_backward(d, mb, x_in, dy, j >= 0)
      g_x = g_x if want_input else None
    else:
      (g_x,) = jax.vjp(lambda x: f(self.stacks[d], self.shared, x, False), x_in)[1]((dy, one))
      # The zero weight gradients of an I op, made after the input gradient
      # (`zeros_after`): zeros with no operand were scheduled first, so the
      # switch's result buffers (a chunk's and the shared weights' f32
      # gradients, 31.5 GiB at V3 widths) stayed live through the op's
      # stage recompute and VJP.
      g_st, g_sh = zeros_after((g_st, g_sh), g_x)
    if g_x is not None and self.first[d] is not False:
      g_x = jnp.where(self.first[d], jnp.zeros_like(g_x), g_x)
    return g_x, g_st, g_sh

  def weight_backward(self, d, mb, x_in, dy, gate):
    """(input gradient, stage-weight gradients, shared-weight gradients) of
    chunk d's stage, the VJP taken in parts: embedding, blocks, head and
    loss; the blocks' backward inside a `lax.cond` on `gate` (true at run
    time, unknown to XLA). XLA scheduled the zero-initialised buffer that
    the blocks' transposed scan fills with the layers' weight gradients (a
    chunk's f32 weights: 21 GiB at V3 widths on pipe=2 x expert=4) at the
    start of the op, live through the head's and MTP's backward; inside the
    cond it exists from the blocks' backward on."""
    def tail(shared, y, layers):
      head = self.head(d, shared, y, mb)
      return self.fns.loss(self._full_layers(d, layers), head, self.totals, self.loss_args)[0]
    x, vjp_embed = jax.vjp(lambda sh, x: self.embed(d, sh, x, mb), self.shared, x_in)
    (y, layers), vjp_blocks = jax.vjp(lambda st, x: self.blocks(d, st, x, mb), self.stacks[d],
                                      x)
    g_sh, ct_y, ct_layers = jax.vjp(tail, self.shared, y, layers)[1](
        jnp.ones((), jnp.float32))
    ct_y = ct_y + dy.astype(ct_y.dtype)
    g_st, g_x = jax.lax.cond(gate, lambda: vjp_blocks((ct_y, ct_layers)),
                             lambda: (self.zero_stacks(), jnp.zeros_like(x)))
    g_sh_embed, g_x = vjp_embed(g_x)
    return g_x, g_st, jax.tree.map(jnp.add, g_sh, g_sh_embed)

  def zero_stacks(self):
    """Zero stage-weight gradients of one op: [slots, ...] per stack, or
    (DualPipeV) [the most slots a chunk has, ...]."""
    if self.parts is None:
      return jax.tree.map(jnp.zeros_like, self.stacks[0])
    n = self._n_max()
    return {k: jax.tree.map(lambda a: jnp.zeros((n[k],) + a.shape[1:], a.dtype), v)
            for k, v in self.stacks[0].items()}

  def zero_shared(self, anchor=None):
    """Zero shared-weight gradients (made after anchor when given: `zeros_after`)."""
    if anchor is not None:
      return zeros_after(self.shared, anchor)
    return jax.tree.map(jnp.zeros_like, self.shared)

  def branches(self, present: dict[str, np.ndarray]):
    """The switch branches of the forward and backward halves: only the op
    codes this table uses (each is traced). Their operands and results are
    what the op reads and makes, never the state it leaves alone: XLA copies
    every array a conditional's branch passes through unchanged (in the
    V3-width DualPipe step, the f32 gradient accumulators: 57 GiB at the
    peak), so the backward half returns its weight gradients (zeros from I
    and idle ops) and the tick adds them."""
    zeros_x = jnp.zeros(self.x_spec.shape, self.x_spec.dtype)
    dirs = self.dirs

    def no_op_f(acc, x_in, row):
      return acc, [zeros_x] * dirs

    def op_f(d):
      def run_op(acc, x_in, row):
        acc, y = self.forward(acc, d, row["f_mb"], x_in)
        out = [zeros_x] * dirs
        out[d] = y.astype(zeros_x.dtype)
        return acc, out
      return run_op

    def no_op_b(x_in, dy, row):
      return [zeros_x] * dirs, self.zero_stacks(), self.zero_shared()

    def op_b(d, want_input, want_weights):
      def run_op(x_in, dy, row):
        g, g_st, g_sh = self.backward(d, row["b_mb"], x_in, dy, want_input, want_weights)
        out = [zeros_x] * dirs
        if g is not None:
          out[d] = g.astype(zeros_x.dtype)
        return out, g_st, g_sh
      return run_op

    make_f = {NO_OP: no_op_f, 1: op_f(0), 2: op_f(min(1, dirs - 1))}
    if self.parts is not None:
      return [make_f[int(c)] for c in present["f_op"]], self.v_branches(present)
    make_b = {NO_OP: no_op_b}
    for kind, (wi, ww) in (("B", (True, True)), ("I", (True, False)), ("W", (False, True))):
      for d in range(dirs):
        make_b[B_CODES[kind] + d] = op_b(d, wi, ww)
    return ([make_f[int(c)] for c in present["f_op"]],
            [make_b[int(c)] for c in present["b_op"]])

  def _zero_carry(self):
    n_max, x = self._n_max(), self.x_spec
    return {"ct": jnp.zeros(x.shape, x.dtype),
            "inputs": {k: jnp.zeros((n,) + x.shape, x.dtype) for k, n in n_max.items()},
            "layers": {k: jax.tree.map(lambda s, k=k: jnp.zeros((n_max[k],) + s.shape[1:],
                                                                s.dtype), spec)
                       for k, spec in self.layers_spec.items()}}

  def v_branches(self, present):
    """DualPipeV's two backward switches' branches (tail, then blocks: see
    v_tail), for the op codes the table uses."""
    zeros_x = jnp.zeros(self.x_spec.shape, self.x_spec.dtype)
    leaves = jax.tree.leaves(self.shared)

    def no_tail(x_in, dy, row):
      return self._zero_carry(), self.zero_shared(x_in)

    def no_blocks(carry, row):
      return ([zeros_x] * self.dirs, zeros_after(self.zero_stacks(), carry["ct"]),
              zeros_after([leaves[i] for i in self._embed_leaves()], carry["ct"]))

    def tail(d, want_weights):
      return lambda x_in, dy, row: self.v_tail(d, row["b_mb"], x_in, dy, want_weights)

    def blocks(d, want_input, want_weights):
      def run_op(carry, row):
        g, g_st, g_emb = self.v_blocks(d, row["b_mb"], carry, want_input, want_weights)
        out = [zeros_x] * self.dirs
        if g is not None:
          out[d] = g.astype(zeros_x.dtype)
        return out, g_st, g_emb
      return run_op
    make = {NO_OP: (no_tail, no_blocks)}
    for kind, (wi, ww) in (("B", (True, True)), ("I", (True, False)), ("W", (False, True))):
      for d in range(self.dirs):
        make[B_CODES[kind] + d] = (tail(d, ww), blocks(d, wi, ww))
    return ([make[int(c)][0] for c in present["b_op"]],
            [make[int(c)][1] for c in present["b_op"]])

  def v_backward(self, state, b_branches, row):
    """The tick's backward half on DualPipeV: (state with the op's weight
    gradients added, its input gradients [dirs])."""
    tails, blocks = b_branches
    x, g = state["x"], state["g"]
    carry, g_sh = jax.lax.switch(row["b_op"], tails, x[row["b_x"]], g[row["b_g"]], row)
    shared = jax.tree.map(jnp.add, state["shared_grads"], g_sh)
    out, g_st, g_emb = jax.lax.switch(row["b_op"], blocks, carry, row)
    flat, tdef = jax.tree.flatten(shared)
    for i, a in zip(self._embed_leaves(), g_emb):
      flat[i] = flat[i] + a
    return dict(state, grads=self.add_grads(state["grads"], g_st, row["b_dir"]),
                shared_grads=jax.tree.unflatten(tdef, flat)), out

  def add_grads(self, grads, g_st, d):
    """grads (one row per block of this rank's chunks) plus chunk d's stage
    gradients g_st [slots, ...]: each slot into its block's row, padded
    slots dropped (their gradients are zero)."""
    def one(key):
      rows = jax.lax.dynamic_index_in_dim(self.rows[key], d, keepdims=False)
      return jax.tree.map(lambda a, v: a.at[rows].add(v, mode="drop"), grads[key], g_st[key])
    return {key: one(key) for key in grads}

  def stage_grads(self, grads):
    """The rank's own stage's gradients [slots, ...] (padded slots zero) from
    the accumulator rows: with two directions, chunk 1's (stage PP-1-r's)
    go to rank PP-1-r, which stores that stage, and are added there."""
    def take(d):
      return {key: jax.tree.map(lambda a: jnp.take(a, self.rows[key][d], axis=0, mode="fill",
                                                   fill_value=0), grads[key])
              for key in grads}
    if self.parts is not None:   # DualPipeV: one row per slot of the rank's own stack
      return grads
    own = take(0)
    if self.dirs == 1:
      return own
    back = jax.lax.ppermute(take(1), PIPE, [(r, self.pp - 1 - r) for r in range(self.pp)])
    return jax.tree.map(jnp.add, own, back)

  def run(self, table: Table, fields, present) -> dict:
    """The tick loop; returns the final state (stage-weight gradients, one
    row per block the rank's chunks hold (`_accumulator_rows`), shared
    gradients, accumulators)."""
    pp, dirs = self.pp, self.dirs
    f_branches, b_branches = self.branches(present)
    buffers = jnp.zeros((table.n_slots + 1,) + self.x_spec.shape, self.x_spec.dtype)
    state = {
        "x": buffers, "g": buffers,
        "grads": {key: jax.tree.map(lambda a: jnp.zeros((self.n_rows[key],) + a.shape[1:],
                                                        a.dtype), self.stacks[0][key])
                  for key in self.stacks[0]},
        "shared_grads": self.zero_shared(),
        "acc": {"layers": jax.tree.map(
                    lambda s: jnp.zeros((1 if table.v else dirs,) + s.shape, s.dtype),
                    self.layers_spec),
                "head": _zeros(self.head_spec)}}
    # Direction 0 moves activations up the ranks and gradients down;
    # direction 1 the other way round.
    up = [(i, i + 1) for i in range(pp - 1)]
    down = [(i + 1, i) for i in range(pp - 1)]

    def tick(state, row):
      x, g = state["x"], state["g"]
      acc, acts = jax.lax.switch(row["f_op"], f_branches, state["acc"], x[row["f_x"]], row)
      if self.parts is not None:
        state, grads = self.v_backward(dict(state, acc=acc), b_branches, row)
      else:
        grads, g_st, g_sh = jax.lax.switch(row["b_op"], b_branches, x[row["b_x"]],
                                           g[row["b_g"]], row)
        # In place: the backward op's chunk's rows of the accumulators.
        state = dict(state, acc=acc, grads=self.add_grads(state["grads"], g_st, row["b_dir"]),
                     shared_grads=jax.tree.map(jnp.add, state["shared_grads"], g_sh))
      for d in range(dirs):
        x = x.at[row[f"ra{d}"]].set(jax.lax.ppermute(acts[d], PIPE, up if d == 0 else down))
        g = g.at[row[f"rg{d}"]].set(jax.lax.ppermute(grads[d], PIPE, down if d == 0 else up))
      if table.v:       # DualPipeV's turn at rank PP-1: chunk PP-1 <-> PP, no message
        x = x.at[row["rah"]].set(acts[0])
        g = g.at[row["rgh"]].set(grads[1])
      return dict(state, x=x, g=g), None

    state, _ = jax.lax.scan(tick, state, fields)
    return state


def _split(tree: dict) -> tuple[dict, dict]:
  """(the layer stacks, the rest) of a params or router_bias tree."""
  keys = {name for name, _ in STACKS}
  return ({k: v for k, v in tree.items() if k in keys},
          {k: v for k, v in tree.items() if k not in keys})


def _accumulator_rows(layout: StageLayout, pp: int, dirs: int) -> tuple[dict, dict]:
  """Where a rank accumulates its chunks' weight gradients: ({stack key:
  int32 [PP, dirs, slots]}, {stack key: rows}). Rank r's chunk d runs stage
  r (d = 0) or PP-1-r (d = 1); each real block of those stages gets one row
  (a stage twice on a rank would share its rows), padded slots the row
  `rows` (out of range: their zero gradients are dropped). So a rank's
  accumulators hold its blocks once: not [dirs, slots], which stores every
  padded slot of both chunks (at V3 widths on pipe=2, layers=4: one MoE
  layer's float32 weights, 10.5 GiB per device)."""
  table, sizes = {}, {}
  for key, moe in STACKS:
    if not layout.slots(moe):
      continue
    active = layout.index(moe)[1]
    idx = np.full((pp, dirs, active.shape[1]), -1, np.int32)
    for r in range(pp):
      seen = {}
      for d in range(dirs):
        stage = r if d == 0 else pp - 1 - r
        for i in np.flatnonzero(active[stage]):
          idx[r, d, i] = seen.setdefault((stage, int(i)), len(seen))
    sizes[key] = max(int(idx.max()) + 1, 1)
    table[key] = np.where(idx < 0, sizes[key], idx).astype(np.int32)
  return table, sizes


def _parts_v(layout: StageLayout) -> list[dict[str, tuple[int, int]]]:
  """DualPipeV: per direction d (chunk position d of every rank), {stack key:
  (first slot, slots)} of the chunk in the rank's stack (keys with slots)."""
  parts = [{}, {}]
  for key, moe in STACKS:
    per = layout.part_slots(moe)
    for d in range(2):
      if per[d]:
        parts[d][key] = (sum(per[:d]), per[d])
  return parts


def _accumulator_rows_v(layout: StageLayout, pp: int) -> tuple[dict, dict]:
  """DualPipeV's `_accumulator_rows`: the rank's stack is its two chunks, so
  its rows are its slots; chunk d's slot i adds into row (first slot of d)
  + i, padded slots into the dropped row `slots`. [PP, 2, the most slots a
  chunk has]."""
  table, sizes = {}, {}
  for key, moe in STACKS:
    if not layout.slots(moe):
      continue
    per, active = layout.part_slots(moe), layout.index(moe)[1]
    n = layout.slots(moe)
    idx = np.full((pp, 2, max(per)), n, np.int32)
    for d in range(2):
      off = sum(per[:d])
      for i in range(per[d]):
        idx[:, d, i] = np.where(active[:, off + i], off + i, n)
    table[key], sizes[key] = idx, n
  return table, sizes


def _program(fns: StageFns, table: Table, pp: int, n_rows: dict, parts=None):
  """(the shard_map body, the table's fields it reads): one rank's ticks,
  then its outputs (stage gradients and per-layer sums split over pipe, the
  rest summed over it). Only the op codes the table uses become switch
  branches (each is traced): the op fields index those."""
  present = {k: np.unique(table.fields[k]) for k in ("f_op", "b_op")}
  fields = dict(table.fields, **{k: np.searchsorted(v, table.fields[k]).astype(np.int32)
                                 for k, v in present.items()})
  # The backward op's direction (codes B_CODES[kind] + d; 0 when idle, whose
  # gradients are zeros): where the tick adds its weight gradients.
  codes, bases = table.fields["b_op"], np.array(sorted(B_CODES.values()))
  base = bases[np.maximum(np.searchsorted(bases, codes, side="right") - 1, 0)]
  fields["b_dir"] = np.where(codes == NO_OP, 0, codes - base).astype(np.int32)

  def body(stacks, stacks_b, active, shared, shared_b, mbs, totals, fields, loss_args, rows):
    rank = _Rank(fns, pp, table.directions, stacks, stacks_b, active, shared, shared_b, mbs,
                 totals, loss_args, rows, n_rows, parts)
    state = rank.run(table, {k: v[:, 0] for k, v in fields.items()}, present)
    expand = lambda t: jax.tree.map(lambda a: a[None], t)        # noqa: E731
    return (expand(rank.stage_grads(state["grads"])),
            jax.lax.psum(state["shared_grads"], PIPE),
            jax.lax.psum(state["acc"]["head"], PIPE), expand(state["acc"]["layers"]))
  return body, fields


def pipeline_value_and_grad(fns: StageFns, mesh, layout: StageLayout, *, schedule: str,
                            n_microbatches: int, staged: bool = False) -> Callable:
  """f(params, router_bias, batch, loss_args=None) -> ((loss, aux), grads):
  `jax.value_and_grad` (params only, has_aux) of the loss `fns` compose, run
  as a pipeline over mesh axis `pipe` with the blocks cut as `layout` says
  (module doc). loss_args: any pytree (traced scalars too), handed to
  fns.loss. Call it inside `parallel.activate(mesh, rules)`, jitted or not.

  staged: params and router_bias come in the stage layout (`stage_tree`,
  the train state's on a pipe mesh: each rank stores its own stage's
  blocks) and the layer-stack gradients go out in it (padded slots'
  exactly zero). Otherwise both are in the model's layout and the stages
  are gathered from it every call."""
  pp = dict(mesh.shape)[PIPE]
  check_pipeline(pp, schedule, n_microbatches)
  if layout.n_stages != pp:
    raise ValueError(f"a layout of {layout.n_stages} stages on mesh.pipe={pp}; split the "
                     f"layers into pipe={pp} stages (split_layers).")
  table = build_table(schedule, pp, n_microbatches)
  if (layout.chunks is not None) != table.v:
    raise ValueError(f"pipeline_schedule={schedule!r} runs on "
                     f"{'split_layers_v' if table.v else 'split_layers'}'s layout; got "
                     f"{layout_sizes(layout)} (use pipeline_layout.layout_for).")
  parts = None
  if table.v:                          # DualPipeV: both chunks in the rank's own stack
    parts = _parts_v(layout)
    acc_rows, n_rows = _accumulator_rows_v(layout, pp)
    full = layout.active()
    active = [{k: full[k][:, off:off + n] for k, (off, n) in parts[d].items()}
              for d in range(2)]
  else:
    acc_rows, n_rows = _accumulator_rows(layout, pp, table.directions)
    active = [layout.active()]
  if table.directions == 2 and not table.v:   # DualPipe: rank r also holds stage PP-1-r
    active.append(jax.tree.map(lambda a: a[::-1], active[0]))
  body, fields = _program(fns, table, pp, n_rows, parts)

  def run(params, router_bias, batch, loss_args=None):
    rows = batch["tokens"].shape[0]
    check_pipeline(pp, schedule, n_microbatches, rows)
    totals = fns.totals(batch)
    if not staged:     # gathered from the model's layout every call
      params, router_bias = stage_tree(layout, params), stage_tree(layout, router_bias)
    (stacks, shared), (stacks_b, shared_b) = _split(params), _split(router_bias)
    # Micro-batch j takes rows j, j + M, j + 2M, ...: the split keeps each
    # data shard's rows on its devices.
    mbs = {k: v.reshape((rows // n_microbatches, n_microbatches) + v.shape[1:])
           for k, v in batch.items()}
    chunks, chunks_b = [stacks], [stacks_b]
    if table.directions == 2 and not table.v:
      chunks.append(jax.tree.map(lambda a: a[::-1], stacks))
      chunks_b.append(jax.tree.map(lambda a: a[::-1], stacks_b))
    split = lambda t: jax.tree.map(lambda _: P(PIPE), t)         # noqa: E731
    rep = lambda t: jax.tree.map(lambda _: P(), t)               # noqa: E731
    args = (chunks, chunks_b, jax.tree.map(jnp.asarray, active), shared, shared_b, mbs,
            totals, jax.tree.map(jnp.asarray, fields), loss_args,
            jax.tree.map(jnp.asarray, acc_rows))
    fn = jax.shard_map(
        body, mesh=mesh, axis_names={PIPE}, check_vma=False,
        in_specs=(split(chunks), split(chunks_b), split(active), rep(shared), rep(shared_b),
                  rep(mbs), rep(totals), jax.tree.map(lambda _: P(None, PIPE), fields),
                  rep(loss_args), split(acc_rows)),
        out_specs=(split(stacks), rep(shared), P(), P(PIPE)))
    stage_grads, shared_grads, head, by_rank = fn(*args)
    # Per-layer sums [PP, directions, slots, ...] per rank -> per stage:
    # direction 1 of rank r ran stage PP-1-r.
    layers = jax.tree.map(lambda a: a[:, 0], by_rank)
    if table.directions == 2 and not table.v:
      layers = jax.tree.map(lambda a, b: a + b[::-1, 1], layers, by_rank)
    g_stage = zero_padded_slots(layout, stage_grads)
    grads = dict(shared_grads, **(g_stage if staged else unstage_tree(layout, g_stage)))
    return fns.loss(unstage_tree(layout, layers), head, totals, loss_args), grads

  run.layout = layout
  run.table = table
  return run


__all__ = ["StageFns", "check_pipeline", "pipeline_value_and_grad"]
