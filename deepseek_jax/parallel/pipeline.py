"""Pipeline parallelism over the mesh's `pipe` axis, driven by the simulator's
timelines (DESIGN.md §4; schedules in `parallel/schedules.py`).

    grad_fn = pipeline_value_and_grad(cfg, train_cfg, mesh, rules,
                                      schedule="dualpipe", n_microbatches=8)
    (loss, aux), grads = grad_fn(params, router_bias, batch)

is what `jax.value_and_grad(train.step.pretraining_loss(...), has_aux=True)`
returns for the same arguments (same loss, same gradients, same metrics and
expert loads, up to float summation order), computed by a pipeline.

Stages
------
The L = n_dense_layers + n_moe_layers blocks are cut into PP = mesh `pipe`
contiguous stages (`split_layers`: as even as possible, the earlier stages
taking the extra layers; or the sizes you give). Stage 0 also runs the
embedding; the last stage the final norm, the output head, the MTP modules
and the loss, as in DeepSeek-V3. A stage holds "slots" for dense and for MoE
blocks; every stage has the same number of each (SPMD: one program for all
ranks), and a stage with fewer layers of a kind leaves its extra slots
inactive (they pass activations through; their padded weights get zero
gradients and are dropped). The embedding, head, final norm and MTP weights
are replicated over `pipe`; their gradients are summed over it.

Stored by stage. The train state on a pipe mesh keeps the layer stacks in
this [PP, slots, ...] layout (`stage_tree`; `state_layout` gives it for a
mesh), the stage axis split over `pipe` (logical axis `stages`), so a rank
stores only its stage's blocks and their optimizer moments, as V3 does;
the executor then takes them as they are (`staged=True`). Checkpoints
record the layout; `unstage_tree` converts back to the model's layout
(export, evaluation, a resume on another pipe count).

Executor
--------
`simulate`'s per-rank operation lists, re-timed with every op lasting one
tick (the order is the schedule's; a result is usable the tick after it is
made, on any rank), become a table: for every tick and rank, which op
(idle, F, B, I, W or DualPipe's overlapped FB pair), for which micro-batch,
reading which buffer slots. Inside one `jax.shard_map` manual over `pipe`
(the other mesh axes stay automatic: data/FSDP/tensor sharding and the MoE's
expert-parallel shard_map work inside a stage as they do without a
pipeline), a `lax.scan` over ticks runs `lax.switch` on the rank's op, then
two `ppermute`s per direction move the activation made this tick to the next
stage and the input gradient to the previous one, and the receivers store
them in the slots the table names. Slots are allocated from the timeline (a
micro-batch's stage input is held from its arrival until its backward (B, or
W when split) ends), so the activation memory per rank is what the schedule
holds in flight: bounded by PP for 1F1B / ZB1P, PP+1 for DualPipe, M for
GPipe.

Backward ops recompute their stage's forward from the held stage input and
apply its VJP (per micro-batch VJPs, so that a schedule can put any op
anywhere; nothing is differentiated through the schedule): B takes the input
and weight gradients, I only the input gradient, W only the weight gradients
(ZeroBubble's split; the weight part of the VJP is dead code in I and XLA
drops it, and vice versa). The price is one extra stage forward per
micro-batch, as with full activation recomputation.

DualPipe holds two chunks per rank: rank r runs stage r for the micro-batches
entering at rank 0 (direction 0) and stage PP-1-r for those entering at rank
PP-1 (direction 1), so every stage's weights exist twice (the report's 2x
parameters): the step gathers the reversed copy in, and adds its gradients
back onto the stage's.

Loss. The unpipelined loss is a mean over the whole batch's target tokens
(and the balance loss a mean over its non-empty sequences), so each
micro-batch contributes its token sums divided by the whole batch's counts,
which are computed from the batch before the pipeline starts: the pipelined
loss is the same number, not a mean of micro-batch means.

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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.block import Block
from deepseek_jax.model.layers import Einsum, Embed, RMSNorm
from deepseek_jax.model.mla import attention_bias
from deepseek_jax.model.mtp import MTPModule, shift_left
from deepseek_jax.model.transformer import checkpoint_policy
from deepseek_jax.parallel import schedules as sched

PIPE = "pipe"


# ---------------------------------------------------------------------------
# Stages

@dataclasses.dataclass(frozen=True)
class StageLayout:
  """Which blocks each pipeline stage runs. `layers[s]`: global block ids of
  stage s (0..L-1, the n_dense dense blocks first, as the model stacks them)."""
  layers: tuple[tuple[int, ...], ...]
  n_dense: int

  @property
  def n_stages(self) -> int:
    return len(self.layers)

  def ids(self, stage: int, moe: bool) -> list[int]:
    """Indices into the `moe_layers` (moe) or `dense_layers` stack of stage s."""
    if moe:
      return [i - self.n_dense for i in self.layers[stage] if i >= self.n_dense]
    return [i for i in self.layers[stage] if i < self.n_dense]

  def slots(self, moe: bool) -> int:
    return max(len(self.ids(s, moe)) for s in range(self.n_stages))

  def index(self, moe: bool) -> tuple[np.ndarray, np.ndarray]:
    """([PP, slots] stack index, [PP, slots] active): padded slots point at
    block 0 of the stack and are inactive."""
    n = self.slots(moe)
    idx = np.zeros((self.n_stages, n), np.int32)
    active = np.zeros((self.n_stages, n), bool)
    for s in range(self.n_stages):
      ids = self.ids(s, moe)
      idx[s, :len(ids)] = ids
      active[s, :len(ids)] = True
    return idx, active

  def describe(self) -> str:
    """One line per stage: its blocks, embedding / head when it has them."""
    lines = []
    for s, ids in enumerate(self.layers):
      extra = []
      if s == 0:
        extra.append("embedding")
      if s == self.n_stages - 1:
        extra.append("norm, head, MTP, loss")
      span = f"blocks {ids[0]}-{ids[-1]}" if len(ids) > 1 else f"block {ids[0]}"
      kinds = (f"{len(self.ids(s, False))} dense, {len(self.ids(s, True))} MoE")
      lines.append(f"stage {s}: {span} ({kinds})" + (f" + {', '.join(extra)}" if extra else ""))
    sizes = sorted({len(ids) for ids in self.layers})
    if len(sizes) > 1:
      lines.append(f"uneven split: stages hold {sizes[0]} to {sizes[-1]} blocks; each stage "
                   f"computes {self.slots(False)} dense + {self.slots(True)} MoE block slots")
    return "\n".join(lines)


def split_layers(cfg: ModelConfig, n_stages: int,
                 stage_layers: tuple[int, ...] | None = None) -> StageLayout:
  """Contiguous stages of the model's blocks. stage_layers: blocks per stage
  (summing to L); default as even as possible, earlier stages taking the
  remainder (the last stage also runs the head and MTP)."""
  total = cfg.n_dense_layers + cfg.n_moe_layers
  if n_stages < 1:
    raise ValueError(f"pipe={n_stages} must be at least 1.")
  if stage_layers is None:
    if total < n_stages:
      raise ValueError(
          f"the model's {total} blocks (n_dense_layers={cfg.n_dense_layers} + "
          f"n_moe_layers={cfg.n_moe_layers}) cannot be split into pipe={n_stages} stages "
          "of at least one block each; lower mesh.pipe or add layers.")
    base, extra = divmod(total, n_stages)
    stage_layers = tuple(base + (s < extra) for s in range(n_stages))
  stage_layers = tuple(stage_layers)
  if (len(stage_layers) != n_stages or any(n < 1 for n in stage_layers)
      or sum(stage_layers) != total):
    raise ValueError(
        f"stage_layers={list(stage_layers)} must give each of the pipe={n_stages} stages "
        f"at least one block and sum to the model's {total} blocks.")
  bounds = np.cumsum((0,) + stage_layers)
  return StageLayout(tuple(tuple(range(bounds[s], bounds[s + 1])) for s in range(n_stages)),
                     cfg.n_dense_layers)


_STACKS = (("dense_layers", False), ("moe_layers", True))


def _stack_of(path) -> bool | None:
  """Whether a pytree leaf at `path` lies in the MoE (True) or dense (False)
  layer stack, None outside both. Works for params, router biases and the
  optimizer's moments alike (a moment's path ends with its parameter's)."""
  names = dict(_STACKS)
  for entry in path:
    key = getattr(entry, "key", None)
    if key in names:
      return names[key]
  return None


def _inverse_index(layout: StageLayout, moe: bool) -> np.ndarray:
  """Flat [PP * slots] position of each block of a stack, in stack order."""
  idx, active = layout.index(moe)
  flat = np.flatnonzero(active.reshape(-1))
  return flat[np.argsort(idx.reshape(-1)[flat], kind="stable")].astype(np.int32)


def _map_stacks(layout: StageLayout, tree, fn):
  """fn(leaf, moe) on every layer-stack leaf of `tree` (found by path), the
  other leaves unchanged."""
  def one(path, a):
    moe = _stack_of(path)
    if moe is None or not layout.slots(moe) or np.ndim(a) == 0:
      return a
    return fn(a, moe)
  return jax.tree_util.tree_map_with_path(one, tree)


def stage_tree(layout: StageLayout, tree):
  """Any pytree of the model's layout (params, router_bias, optimizer state)
  -> the stage layout the train state has on a mesh with pipe > 1: every
  layer-stack leaf [n, ...] becomes [PP, slots, ...] (axis 0 split over
  `pipe`: each rank stores only its stage's blocks; padded slots hold a copy
  of block 0 and are never used). Other leaves are unchanged."""
  return _map_stacks(layout, tree, lambda a, moe: a[jnp.asarray(layout.index(moe)[0])])


def unstage_tree(layout: StageLayout, tree):
  """Inverse of `stage_tree` (exact: a gather of the active slots)."""
  return _map_stacks(layout, tree, lambda a, moe: a.reshape((-1,) + a.shape[2:])[
      jnp.asarray(_inverse_index(layout, moe))])


def _zero_padded_slots(layout: StageLayout, tree):
  """Stage-layout stack leaves with their padded (inactive) slots zeroed."""
  def zero(a, moe):
    on = jnp.asarray(layout.index(moe)[1])
    return a * on.reshape(on.shape + (1,) * (a.ndim - 2)).astype(a.dtype)
  return _map_stacks(layout, tree, zero)


def state_layout(cfg: ModelConfig, mesh) -> StageLayout | None:
  """The stage layout of a train state on `mesh` (None without a pipe axis
  > 1: the model's own layout)."""
  pp = dict(mesh.shape).get(PIPE, 1) if mesh is not None else 1
  return split_layers(cfg, pp) if pp > 1 else None


def layout_from_sizes(cfg: ModelConfig, sizes) -> StageLayout | None:
  """The layout saved in a checkpoint's meta (`pipeline_stages`: blocks per
  stage, or None for the model's own layout)."""
  return split_layers(cfg, len(sizes), tuple(sizes)) if sizes else None


def layout_sizes(layout: StageLayout | None) -> list[int] | None:
  return [len(ids) for ids in layout.layers] if layout is not None else None


# ---------------------------------------------------------------------------
# The tick table

# A tick runs a forward half and a backward half (either may be empty; an
# FB op fills both). Their codes, per direction d: F = 1 + d; B = 1 + d,
# I = 3 + d, W = 5 + d.
NO_OP = 0
F_CODES = {"F": 1}
B_CODES = {"B": 1, "I": 3, "W": 5}
_FIELDS = ("f_op", "f_mb", "f_x", "b_op", "b_mb", "b_x", "b_g", "ra0", "ra1", "rg0", "rg1")


@dataclasses.dataclass(frozen=True)
class Table:
  """The executor's program: int32 [ticks, PP] per field (`_FIELDS`):
  f_op / f_mb / f_x (forward half: code, micro-batch, slot of its input),
  b_op / b_mb / b_x / b_g (backward half: code, micro-batch, slots of its
  input and of its output gradient), ra{d} / rg{d} (slot storing the activation / gradient arriving
  this tick on direction d's channel; the trash slot when none).
  n_slots: activation slots per rank (+1 trash slot in the buffers)."""
  fields: dict[str, np.ndarray]
  n_slots: int
  n_ticks: int
  directions: int


def _chunk_rank(chunk: int, direction: int, pp: int) -> int:
  return chunk if direction == 0 else pp - 1 - chunk


class _Slots:
  """Greedy slot allocation on one rank: a slot taken at tick t (stored after
  that tick's op) is free again for an arrival at the tick of its last read."""

  def __init__(self):
    self.free_at: list[int] = []     # per slot: tick from which it may be reused

  def take(self, tick: int, release: int) -> int:
    for i, t in enumerate(self.free_at):
      if t <= tick:
        self.free_at[i] = release
        return i
    self.free_at.append(release)
    return len(self.free_at) - 1


def build_table(schedule: str, n_stages: int, n_microbatches: int) -> Table:
  """The executor's tick table for `schedule` (see the module doc)."""
  pp, m = n_stages, n_microbatches
  sched._check_args(schedule, pp, m, {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 1.0})
  plans = sched._PLANS[schedule](pp, m)
  timeline, _ = sched._time_plans(plans, pp, {k: 1.0 for k in sched.KINDS})
  n_ticks = int(max(ops[-1].end for ops in timeline if ops))
  dirs = 2 if schedule == "dualpipe" else 1
  # When each (mb, chunk) is made / read: forward output tick, input-gradient
  # tick, and the tick of the op that last reads the chunk's held input.
  f_tick, i_tick, last_read = {}, {}, {}
  for ops in timeline:
    for op in ops:
      for t in op.tasks:
        key = (t.mb, t.chunk)
        if t.kind == "F":
          f_tick[key] = int(op.start)
        if t.kind in ("B", "I"):
          i_tick[key] = int(op.start)
        if t.kind in ("B", "W"):
          last_read[key] = int(op.start)
  direction = {t.mb: t.direction for ops in timeline for op in ops for t in op.tasks}
  x_slot, g_slot = {}, {}
  slots = {"x": [_Slots() for _ in range(pp)], "g": [_Slots() for _ in range(pp)]}
  # Arrivals in tick order, so that the greedy allocation sees them in time.
  arrivals = []
  for (mb, chunk), t in f_tick.items():
    if chunk < pp - 1:
      arrivals.append((t, "x", mb, chunk + 1))
  for (mb, chunk), t in i_tick.items():
    if chunk > 0:
      arrivals.append((t, "g", mb, chunk - 1))
  arrivals.sort()
  trash_later = []
  for tick, what, mb, chunk in arrivals:
    rank = _chunk_rank(chunk, direction[mb], pp)
    slot = slots[what][rank].take(tick, last_read[(mb, chunk)])
    (x_slot if what == "x" else g_slot)[(mb, chunk)] = slot
    trash_later.append((tick, what, mb, chunk, rank, slot))
  n_slots = max([len(s.free_at) for pool in slots.values() for s in pool] + [1])
  trash = n_slots
  fields = {name: np.full((n_ticks, pp), trash, np.int32) for name in _FIELDS}
  for name in ("f_op", "f_mb", "b_op", "b_mb"):
    fields[name][:] = 0
  for tick, what, mb, chunk, rank, slot in trash_later:
    fields[f"r{'a' if what == 'x' else 'g'}{direction[mb]}"][tick, rank] = slot
  for r, ops in enumerate(timeline):
    for op in ops:
      t = int(op.start)
      fwd = [x for x in op.tasks if x.kind == "F"]
      bwd = [x for x in op.tasks if x.kind != "F"]
      if fwd:
        f = fwd[0]
        fields["f_op"][t, r] = F_CODES["F"] + f.direction
        fields["f_mb"][t, r] = f.mb
        fields["f_x"][t, r] = x_slot.get((f.mb, f.chunk), trash)
      if bwd:
        b = bwd[0]
        fields["b_op"][t, r] = B_CODES[b.kind] + b.direction
        fields["b_mb"][t, r] = b.mb
        fields["b_x"][t, r] = x_slot.get((b.mb, b.chunk), trash)
        fields["b_g"][t, r] = g_slot.get((b.mb, b.chunk), trash)
  return Table(fields, n_slots, n_ticks, dirs)


# ---------------------------------------------------------------------------
# One stage's computation

def _remat(fn, cfg: ModelConfig):
  if cfg.remat_policy == "none":
    return fn
  return jax.checkpoint(fn, policy=checkpoint_policy(cfg), prevent_cse=False)


def _run_slots(cfg: ModelConfig, moe: bool, params, bias, active, x, positions, mask, valid):
  """The stage's blocks of one kind, slot by slot (lax.scan over the slot axis);
  an inactive slot passes x through. Returns (x, balance [slots], load [slots, E])."""
  block = Block(cfg, moe, "train")

  def body(x, xs):
    p, b, on = xs
    variables = {"params": p, **({"router_bias": b} if moe else {})}
    y, aux = block.apply(variables, x, positions, mask, valid)
    return jnp.where(on, y, x), (jnp.where(on, aux["balance_loss"], 0.0),
                                 jnp.where(on, aux["load"], 0.0))
  xs = (params, bias if moe else jnp.zeros(active.shape), active)
  x, (balance, load) = jax.lax.scan(_remat(body, cfg), x, xs)
  return x, balance, load


def _zero_terms(cfg: ModelConfig) -> dict:
  """The last stage's loss terms and MTP loads, all zero (other stages' value)."""
  zero = jnp.zeros((), jnp.float32)
  return {"ce": zero, "mtp": zero, "balance": zero,
          "mtp_load": jnp.zeros((max(cfg.n_mtp_depth, 1), max(cfg.n_routed_experts, 1)),
                                jnp.float32)}


def _head_terms(cfg: ModelConfig, shared, shared_bias, h_pre, mb, totals, weights):
  """The last stage: final norm, head, MTP; this micro-batch's share of the
  loss terms (sums over its tokens / the whole batch's counts)."""
  from deepseek_jax.train import losses
  h = RMSNorm(cfg).apply({"params": shared["norm"]}, h_pre)
  head = Einsum(cfg.replace(dtype="float32"), (cfg.dim, cfg.vocab_size), "bsd,dv->bsv")
  logits = head.apply({"params": shared["head"]}, h)
  ce, n = losses.cross_entropy(logits, mb["targets"], mb["loss_mask"])
  out = dict(_zero_terms(cfg), ce=ce * n / jnp.maximum(totals["target_tokens"], 1e-9))
  if cfg.n_mtp_depth:
    valid = mb["segment_ids"] != 0
    mask = attention_bias(mb["segment_ids"])
    moe = cfg.n_moe_layers > 0
    loads = []
    for k in range(1, cfg.n_mtp_depth + 1):
      emb = Embed(cfg).apply({"params": shared["embed"]}, shift_left(mb["targets"], k - 1))
      name = f"mtp_{k - 1}"
      variables = {"params": shared[name]}
      if moe:
        variables["router_bias"] = shared_bias[name]
      h, aux = MTPModule(cfg, moe, "train").apply(variables, h, emb, mb["positions"], mask,
                                                  valid)
      t_k, w_k = losses.mtp_targets(mb["targets"], mb["loss_mask"], mb["segment_ids"], k)
      ce_k, n_k = losses.cross_entropy(head.apply({"params": shared["head"]}, h), t_k, w_k)
      out["mtp"] = out["mtp"] + ce_k * n_k / jnp.maximum(totals["mtp_tokens"][k - 1], 1e-9)
      out["balance"] = out["balance"] + aux["balance_loss"] * weights["seq_share"]
      loads.append(aux["load"])
    out["mtp"] = out["mtp"] / cfg.n_mtp_depth
    out["mtp_load"] = jnp.stack(loads)
  return out


def _stage_fn(cfg: ModelConfig, train_cfg, dense_active, moe_active):
  """f(stage_params, stage_bias, shared, shared_bias, x_in, mb, totals,
  is_first, is_last) -> (x_out, local_loss, metrics): the stage's blocks (with
  the embedding when first, the head and loss terms when last).
  `local_loss` is this stage's part of the total loss for this micro-batch:
  its blocks' balance terms, plus CE, MTP and the MTP blocks' balance when last."""

  def f(stage_p, stage_b, shared, shared_b, x_in, mb, totals, is_first, is_last):
    valid = mb["segment_ids"] != 0
    mask = attention_bias(mb["segment_ids"])
    emb = Embed(cfg).apply({"params": shared["embed"]}, mb["tokens"])
    x = jnp.where(is_first, emb.astype(x_in.dtype), x_in)
    seq_share = ((valid.any(-1)).sum().astype(jnp.float32)
                 / jnp.maximum(totals["sequences"], 1.0))
    balance = jnp.zeros((), jnp.float32)
    load = jnp.zeros((max(moe_active.shape[-1], 1), max(cfg.n_routed_experts, 1)),
                     jnp.float32)
    if "dense_layers" in stage_p:
      x, _, _ = _run_slots(cfg, False, stage_p["dense_layers"], None, dense_active, x,
                           mb["positions"], mask, valid)
    if "moe_layers" in stage_p:
      x, bal, load = _run_slots(cfg, True, stage_p["moe_layers"], stage_b["moe_layers"],
                                moe_active, x, mb["positions"], mask, valid)
      balance = bal.sum() * seq_share
    head = jax.lax.cond(
        is_last,
        lambda x: _head_terms(cfg, shared, shared_b, x, mb, totals, {"seq_share": seq_share}),
        lambda x: _zero_terms(cfg), x)
    balance = balance + head["balance"]
    local = (head["ce"] + train_cfg.mtp_weight * head["mtp"]
             + train_cfg.balance_weight * balance)
    metrics = {"ce": head["ce"], "mtp": head["mtp"], "balance": balance, "load": load,
               "mtp_load": head["mtp_load"]}
    return x, local, metrics
  return f


# ---------------------------------------------------------------------------
# The executor

def _batch_totals(cfg: ModelConfig, batch: dict) -> dict:
  """The whole batch's denominators (module doc, "Loss")."""
  from deepseek_jax.train import losses
  mtp = [losses.mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"],
                            k)[1].sum() for k in range(1, cfg.n_mtp_depth + 1)]
  return {"target_tokens": batch["loss_mask"].astype(jnp.float32).sum(),
          "mtp_tokens": jnp.stack(mtp) if mtp else jnp.zeros((1,), jnp.float32),
          "sequences": (batch["segment_ids"] != 0).any(-1).sum().astype(jnp.float32)}


def check_pipeline(cfg: ModelConfig, train_cfg, n_stages: int, schedule: str,
                   n_microbatches: int, batch_rows: int | None = None) -> None:
  """Clear errors, before anything compiles, for what the pipeline cannot run."""
  try:
    sched._check_args(schedule, n_stages, n_microbatches,
                      {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 1.0})
  except ValueError as e:     # the simulator's names -> the config fields
    raise ValueError(f"pipeline_schedule={schedule!r}, num_microbatches={n_microbatches}, "
                     f"mesh.pipe={n_stages}: {e}") from None
  if batch_rows is not None and batch_rows % n_microbatches:
    raise ValueError(
        f"batch of {batch_rows} rows does not split into num_microbatches={n_microbatches} "
        "equal micro-batches; make the batch size a multiple of num_microbatches.")
  if any((train_cfg.expert_balance_weight, train_cfg.device_balance_weight,
          train_cfg.comm_balance_weight)):
    raise NotImplementedError(
        "DeepSeek-V2's balance losses (expert/device/comm_balance_weight > 0) are not "
        "computed by the pipeline executor; set them to 0 or use mesh.pipe=1.")


def pipeline_value_and_grad(cfg: ModelConfig, train_cfg, mesh, rules, *, schedule: str,
                            n_microbatches: int,
                            stage_layers: tuple[int, ...] | None = None,
                            staged: bool = False) -> Callable:
  """f(params, router_bias, batch) -> ((loss, aux), grads), the contract of
  `jax.value_and_grad(pretraining_loss(cfg, train_cfg), has_aux=True)`
  (aux: {"metrics", "expert_load", "mtp_expert_load"}), run as a pipeline
  over mesh axis `pipe` (module doc). Call it inside `parallel.activate(mesh,
  rules)` (as the train step does), jitted or not.

  staged: params and router_bias come in the stage layout (`stage_tree`, the
  train state's on a pipe mesh: each rank stores its own stage's blocks) and
  the layer-stack gradients go out in it (padded slots' exactly zero); aux
  then also has "bias_load", the expert loads in the stage layout [PP,
  slots, E] for the router-bias update. Otherwise both are in the model's
  layout and the stages are gathered from it every call."""
  pp = dict(mesh.shape)[PIPE]
  check_pipeline(cfg, train_cfg, pp, schedule, n_microbatches)
  layout = split_layers(cfg, pp, stage_layers)
  table = build_table(schedule, pp, n_microbatches)
  dirs = table.directions
  # Only the halves this schedule uses become switch branches (each is traced).
  present = {k: np.unique(table.fields[k]) for k in ("f_op", "b_op")}
  compact = {k: np.searchsorted(v, table.fields[k]).astype(np.int32)
             for k, v in present.items()}
  _, dense_on = layout.index(False)
  _, moe_on = layout.index(True)

  def run(params, router_bias, batch):
    rows = batch["tokens"].shape[0]
    check_pipeline(cfg, train_cfg, pp, schedule, n_microbatches, rows)
    totals = _batch_totals(cfg, batch)
    stacks = [name for name, _ in _STACKS]
    if not staged:     # gathered from the model's layout every call
      params, router_bias = stage_tree(layout, params), stage_tree(layout, router_bias)
    stage_p = {k: v for k, v in params.items() if k in stacks}
    stage_b = {k: v for k, v in router_bias.items() if k in stacks}
    shared = {k: v for k, v in params.items() if k not in stacks}
    shared_b = {k: v for k, v in router_bias.items() if k not in stacks}
    # Micro-batch j takes rows j, j + M, j + 2M, ...: the split keeps each
    # data shard's rows on its devices.
    mbs = {k: v.reshape((rows // n_microbatches, n_microbatches) + v.shape[1:])
           for k, v in batch.items()}
    chunks = [stage_p]
    chunks_b = [stage_b]
    if dirs == 2:      # DualPipe: rank r also holds stage PP-1-r
      chunks.append(jax.tree.map(lambda a: a[::-1], stage_p))
      chunks_b.append(jax.tree.map(lambda a: a[::-1], stage_b))
    fields = {k: jnp.asarray(v) for k, v in table.fields.items()}
    fields.update({k: jnp.asarray(v) for k, v in compact.items()})
    on = {"dense": jnp.asarray(dense_on), "moe": jnp.asarray(moe_on)}
    on_rev = {k: v[::-1] for k, v in on.items()}
    seq, dim = batch["tokens"].shape[1], cfg.dim
    x_dtype = jnp.dtype(cfg.dtype)

    def body(staged, staged_b, shared, shared_b, mbs, totals, fields, on, on_rev):
      rank = jax.lax.axis_index(PIPE)
      squeeze = lambda t: jax.tree.map(lambda a: a[0], t)          # noqa: E731
      staged = [squeeze(t) for t in staged]
      staged_b = [squeeze(t) for t in staged_b]
      fields = {k: v[:, 0] for k, v in fields.items()}
      actives = [squeeze(on), squeeze(on_rev)]
      fns = [_stage_fn(cfg, train_cfg, actives[d]["dense"], actives[d]["moe"])
             for d in range(dirs)]
      chunk = [rank, pp - 1 - rank]
      firsts = [chunk[d] == 0 for d in range(dirs)]
      lasts = [chunk[d] == pp - 1 for d in range(dirs)]
      mb_rows = rows // n_microbatches

      def micro(j):
        return {k: jax.lax.dynamic_index_in_dim(v, j, axis=1, keepdims=False)
                for k, v in mbs.items()}

      def forward(state, d, j, slot):
        x_in = state["x"][slot]
        y, _, metrics = fns[d](staged[d], staged_b[d], shared, shared_b, x_in, micro(j),
                               totals, firsts[d], lasts[d])
        acc = dict(state["acc"])
        for key in ("ce", "mtp", "balance", "mtp_load"):
          acc[key] = acc[key] + metrics[key]
        acc["load"] = acc["load"].at[d].add(metrics["load"])
        return dict(state, acc=acc), y

      def backward(state, d, j, x_slot, g_slot, want_input: bool, want_weights: bool):
        mb = micro(j)
        x_in = state["x"][x_slot]
        dy = jnp.where(lasts[d], jnp.zeros_like(x_in), state["g"][g_slot])

        def f(sp, sh, x):
          y, local, _ = fns[d](sp, staged_b[d], sh, shared_b, x, mb, totals, firsts[d],
                               lasts[d])
          return y, local
        new = dict(state)
        if want_weights and want_input:
          _, pull = jax.vjp(f, staged[d], shared, x_in)
          g_sp, g_sh, g_x = pull((dy, jnp.ones((), jnp.float32)))
        elif want_weights:
          _, pull = jax.vjp(lambda sp, sh: f(sp, sh, x_in), staged[d], shared)
          g_sp, g_sh = pull((dy, jnp.ones((), jnp.float32)))
          g_x = None
        else:
          _, pull = jax.vjp(lambda x: f(staged[d], shared, x), x_in)
          (g_x,) = pull((dy, jnp.ones((), jnp.float32)))
        if want_weights:
          grads = list(new["grads"])
          grads[d] = jax.tree.map(jnp.add, grads[d], g_sp)
          new["grads"] = tuple(grads)
          new["shared_grads"] = jax.tree.map(jnp.add, new["shared_grads"], g_sh)
        if g_x is not None:
          g_x = jnp.where(firsts[d], jnp.zeros_like(g_x), g_x)
        return new, g_x

      zeros_x = jnp.zeros((mb_rows, seq, dim), x_dtype)

      def no_op(state, row):
        return state, [zeros_x] * dirs

      def op_f(d):
        def run_op(state, row):
          state, y = forward(state, d, row["f_mb"], row["f_x"])
          acts = [zeros_x] * dirs
          acts[d] = y.astype(x_dtype)
          return state, acts
        return run_op

      def op_b(d, want_input, want_weights):
        def run_op(state, row):
          state, g = backward(state, d, row["b_mb"], row["b_x"], row["b_g"], want_input,
                              want_weights)
          grads = [zeros_x] * dirs
          if g is not None:
            grads[d] = g.astype(x_dtype)
          return state, grads
        return run_op

      make_f = {NO_OP: no_op, 1: op_f(0), 2: op_f(min(1, dirs - 1))}
      make_b = {NO_OP: no_op}
      for kind, (wi, ww) in (("B", (True, True)), ("I", (True, False)), ("W", (False, True))):
        for d in range(dirs):
          make_b[B_CODES[kind] + d] = op_b(d, wi, ww)
      f_branches = [make_f[int(c)] for c in present["f_op"]]
      b_branches = [make_b[int(c)] for c in present["b_op"]]

      n_buf = table.n_slots + 1
      state = {
          "x": jnp.zeros((n_buf, mb_rows, seq, dim), x_dtype),
          "g": jnp.zeros((n_buf, mb_rows, seq, dim), x_dtype),
          "grads": tuple(jax.tree.map(jnp.zeros_like, staged[d]) for d in range(dirs)),
          "shared_grads": jax.tree.map(jnp.zeros_like, shared),
          "acc": dict(_zero_terms(cfg), load=jnp.zeros(
              (dirs, max(moe_on.shape[-1], 1), max(cfg.n_routed_experts, 1)), jnp.float32)),
      }
      # Direction 0 moves activations up the ranks and gradients down;
      # direction 1 the other way round.
      up = [(i, i + 1) for i in range(pp - 1)]
      down = [(i + 1, i) for i in range(pp - 1)]

      def tick(state, row):
        state, acts = jax.lax.switch(row["f_op"], f_branches, state, row)
        state, grads = jax.lax.switch(row["b_op"], b_branches, state, row)
        x, g = state["x"], state["g"]
        for d in range(dirs):
          got_a = jax.lax.ppermute(acts[d], PIPE, up if d == 0 else down)
          got_g = jax.lax.ppermute(grads[d], PIPE, down if d == 0 else up)
          x = x.at[row[f"ra{d}"]].set(got_a)
          g = g.at[row[f"rg{d}"]].set(got_g)
        return dict(state, x=x, g=g), None

      state, _ = jax.lax.scan(tick, state, fields)
      acc = state["acc"]
      metrics = {k: jax.lax.psum(acc[k], PIPE) for k in ("ce", "mtp", "balance", "mtp_load")}
      shared_grads = jax.lax.psum(state["shared_grads"], PIPE)
      expand = lambda t: jax.tree.map(lambda a: a[None], t)        # noqa: E731
      return (tuple(expand(g) for g in state["grads"]), shared_grads, metrics,
              acc["load"][None])

    staged_spec = [jax.tree.map(lambda _: P(PIPE), t) for t in chunks]
    staged_b_spec = [jax.tree.map(lambda _: P(PIPE), t) for t in chunks_b]
    rep = lambda t: jax.tree.map(lambda _: P(), t)                  # noqa: E731
    fn = jax.shard_map(
        body, mesh=mesh, axis_names={PIPE}, check_vma=False,
        in_specs=(staged_spec, staged_b_spec, rep(shared), rep(shared_b), rep(mbs),
                  rep(totals), jax.tree.map(lambda _: P(None, PIPE), fields),
                  jax.tree.map(lambda _: P(PIPE), on), jax.tree.map(lambda _: P(PIPE), on_rev)),
        out_specs=(tuple(jax.tree.map(lambda _: P(PIPE), t) for t in chunks), rep(shared),
                   {"ce": P(), "mtp": P(), "balance": P(), "mtp_load": P()}, P(PIPE)))
    stage_grads, shared_grads, metrics, loads = fn(chunks, chunks_b, shared, shared_b, mbs,
                                                   totals, fields, on, on_rev)
    g_stage = stage_grads[0]
    if dirs == 2:
      g_stage = jax.tree.map(lambda a, b: a + b[::-1], g_stage, stage_grads[1])
      loads = loads[:, 0] + loads[::-1, 1]
    else:
      loads = loads[:, 0]
    g_stage = _zero_padded_slots(layout, g_stage)
    grads = dict(shared_grads, **(g_stage if staged else unstage_tree(layout, g_stage)))
    aux = {}
    if cfg.n_moe_layers:
      # Back into the model's [n_moe_layers, E] expert loads.
      expert_load = unstage_tree(layout, {"moe_layers": loads})["moe_layers"]
      if staged:
        aux["bias_load"] = loads
    else:
      expert_load = jnp.zeros((0, max(cfg.n_routed_experts, 1)), jnp.float32)
    aux["expert_load"] = expert_load
    if cfg.n_mtp_depth and cfg.n_moe_layers:
      aux["mtp_expert_load"] = metrics["mtp_load"]
    loss = (metrics["ce"] + train_cfg.mtp_weight * metrics["mtp"]
            + train_cfg.balance_weight * metrics["balance"])
    aux["metrics"] = {
        "ce": metrics["ce"], "mtp": metrics["mtp"], "balance": metrics["balance"],
        "loss": loss, "target_tokens": totals["target_tokens"],
        "tokens": (batch["segment_ids"] != 0).sum().astype(jnp.float32)}
    return (loss, aux), grads

  run.layout = layout
  run.table = table
  return run


__all__ = ["StageLayout", "Table", "split_layers", "stage_tree", "unstage_tree", "state_layout",
           "layout_from_sizes", "layout_sizes", "build_table", "check_pipeline",
           "pipeline_value_and_grad"]
