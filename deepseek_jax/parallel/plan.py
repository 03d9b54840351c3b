"""Per-device memory of a training run on a mesh, from abstract shapes only.

Nothing is allocated and no devices are needed: the caller passes the train
state's shapes (`train.step.abstract_train_state(cfg, train_cfg)`, leaves of
`jax.ShapeDtypeStruct`; launch/plan.py builds it), each leaf's sharding comes
from the rule set, and a leaf takes nbytes / (product of the mesh axes its
spec uses) on every device.

  params    every parameter (param_dtype), as sharded by the rules
  grads     the same shapes and shardings as the parameters
  opt_state AdamW's two moments per parameter (same dtype and sharding) and
            its counters, as `optax` builds them
  activations what the compiled step holds besides the state (`remat_policy=
            "full"`, the setting at this scale), read from XLA's buffer
            assignment of the V3-width step (launch.plan --compile with
            XLA_FLAGS=--xla_dump_to; the peak's live buffers); t = tokens
            per device = batch * seq / (data*fsdp*expert), b the bytes of
            `dtype`, k routed experts per token, ep the expert-parallel
            degree, T the tensor degree. Each term is returned in
            `activation_terms_bytes`:
    layer_inputs  n_layers * t * dim * b: the blocks' inputs kept for the
                  backward
    attention     blockwise (seq > attn_block_size): seqs * (heads/T) * seq *
                  (4 (4 dqk + 2 dv) + b (2 dqk + 3 dv)), dqk = 192 and dv =
                  128 at V3: q, k (and their float32 gradient accumulators
                  and copies), v, dv in float32, q, k, v, o, do in `dtype`;
                  the [block, block] score tiles are small. Naive (short
                  sequences): 3 seqs (heads/T) seq^2 4 (scores, probabilities,
                  their gradient)
    residual_f32  8 t dim 4: the block's float32 residual-stream temporaries
                  (norms, their cotangents)
    layer_weights 2 * 4 * (the largest block's weights outside the routed
                  experts) / T: gathered (FSDP) whole in float32, and their
                  float32 gradient before the reduce-scatter
    expert_weights uses * X * (b + 4), X the elements of one MoE layer's
                  routed-expert weights as the kernel holds them (with
                  expert parallelism the shard_map's E/ep experts whole but
                  for the mlp_moe split, 3 (E/ep) dim (moe_inter/T); without,
                  the stored FSDP slice: the blocked kernel gathers one
                  expert at a time): the layer's copy in `dtype` and in
                  float32 (XLA:CPU runs bfloat16 dots in float32; over-counts
                  X * 4 per use on a GPU); uses = the scanned layer + the MTP
                  block + (ep > 1) the exchange's overflow rounds, which take
                  their own copy inside their conditional
    expert_rows   N dim (5 b + 2 * 4) + 6 N (moe_inter/T) b: the blocked
                  kernel's padded rows, N = (ceil(R / bs) + E') bs for its R
                  rows over E' experts (R = t k, E' = E without expert
                  parallelism; R = ep C, E' = E/ep with it; bs as
                  model.moe.default_block_size): the gathered rows and their
                  cotangents (forward, recompute) in `dtype`, twice in float32
                  (the CPU dots), the hidden [N, moe_inter/T] activations
    exchange      (ep > 1) ep C dim (b + 3 * 4): a round's [ep, C, dim] send
                  buffer and its three float32 results (kernel output, masked,
                  returned), C = expert.exchange_capacity(t k, ep,
                  moe_ep_capacity) (~2 t k / ep at the default 2; a skewed
                  step sends the rest in extra rounds of C)
    head          3 t min(VOCAB_CHUNK, vocab/T) 4: one vocabulary chunk of
                  float32 logits, their exponentials and cotangent (the
                  chunked loss never holds [t, vocab])
    update        4 * (elements of the largest parameter shard): AdamW's
                  float32 update, one leaf at a time (optax)
            Measured (8 fake devices, V3 widths, 4 layers, batch 8 x 4096,
            bfloat16 moments): expert=8 ep_fsdp compiled 118.70 GiB, planned
            121.38; tensor=2 fsdp=4 fsdp_tp compiled 100.68, planned 106.67.
            The gradients of the stacked layers are the `grads` row (float32
            accumulators the scan's backward adds each layer's into).

Pipeline parallelism (sizes["pipe"] = PP > 1, with a `pipeline_schedule`
and M micro-batches; DESIGN.md §4, schedules in parallel/schedules.py)
-------------------------------------------------------------------------
The layer stack is split by layer (the train state's stage layout, logical
axis `stages` -> `pipe`: parallel/pipeline_layout.py stage_tree). Where V3
keeps the embedding and head (the end ranks) is what is counted here; our
executor keeps those shared weights on every pipe rank (split over the other
axes like any weight), so its non-end ranks hold P_embed + P_last more than
this.
The L = n_layers blocks (dense first, then MoE, as the model stacks them) are
cut into PP contiguous chunks as the executor cuts them (`split_layers`):
chunk c has L // PP layers, one more for the first L % PP chunks (V3: 61 =
13 x 4 + 3 x 3). Chunk 0 also
holds the embedding, chunk PP-1 the final norm, the output head and the MTP
modules (V3 report sec. 3.2.3: with DualPipe one rank holds both ends, so MTP
shares the embedding and head physically; with the other schedules MTP's
embedding lookup is left to stage 0: no second copy is counted).
Rank r holds chunk r; DualPipe's rank r holds chunk r (direction 0) AND chunk
PP-1-r (direction 1): two copies of the model across the pipeline
(param_copies = 2, V3 Table 2), 2 L / PP layers per rank, and ranks 0 and
PP-1 hold the embedding and the head + MTP both. DualPipeV cuts the blocks
into 2 PP chunks (`split_layers` into 2 PP; `layers_per_stage` then lists
the 2 PP chunks) and rank r holds chunks r and 2PP-1-r: one copy of the
model, rank 0 holding the embedding and the head + MTP; its activations
count chunks of L / 2PP layers (peak 2 PP + 1) and one working set X: the
executor runs an F&B tick's forward and backward one after the other (the
compiled V3-width step, 4 layers, pipe=2 x expert=4, M=4, batch 16 x 4096:
161.48 GiB, 1.05x this plan's 154.44; DualPipe keeps V3's two working sets
here). Per rank r:

  params_r  = sum over its chunks c of  dense_c * P_dense + moe_c * P_moe
              + [c = 0] P_embed + [c = PP-1] P_last
  grads_r   = params_r;  opt_state_r the same sum over the moments, plus the
              optimizer's counters (on every rank)
  activations_r = peak_r * A_r + X + [rank holds chunk PP-1] logits + update
     A_r    one micro-batch's layer inputs of the rank's largest chunk,
            layers_c * t * dim * b with t = batch * seq / (M * data*fsdp*expert)
            the tokens per device of ONE micro-batch
     peak_r the (micro-batch, chunk) activations the schedule holds at once on
            rank r, from `simulate(schedule, PP, M)`: GPipe M on every rank,
            1F1B PP - r, ZB1P PP, DualPipe PP + 1 (Table 2's column is the max;
            M >= PP, resp. >= 2 PP for DualPipe)
     X      the working set of one block (the terms above but layer_inputs,
            head and update, for one micro-batch), twice for DualPipe: its
            F&B op runs a forward and a backward at once
     logits the head term above for one micro-batch: the last chunk takes
            the loss and its gradient with respect to its output in one go,
            so no schedule keeps them
     (+ update on every rank)

with dense_c / moe_c the dense / MoE layers of chunk c, P_dense / P_moe the
per-layer bytes of the dense / MoE stack (their stacked leaves divided by
their length), P_embed / P_last the sharded bytes of those leaves. Every
`*_bytes_per_device` is the largest over the ranks (each some rank's real
need; `*_per_rank` lists them all) and `total_bytes_per_device` the largest
rank total. The MTP blocks' own layer inputs are left out, as above.
DualPipe's two copies each keep their own moments here; the mirror ranks r
and PP-1-r could split them (not modelled), as could a ZeRO-1 split over
`data` (V3's; here `data` replicates the optimizer state).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import numpy as np

from deepseek_jax.config import VOCAB_CHUNK, ModelConfig, default_moe_block_size
from deepseek_jax.parallel.expert import exchange_capacity
from deepseek_jax.parallel.pipeline_layout import StageLayout, split_layers, split_layers_v
from deepseek_jax.parallel.rules import (BATCH_AXES, axes_size, check_divisible,
                                         logical_axes, mesh_axes_of, resolve, spec_for)
from deepseek_jax.parallel.schedules import SCHEDULES, simulate

_STACKS = ("dense_layers", "moe_layers")


def _leaf_bytes(tree: Any, sizes: dict[str, int], rules) -> Iterator[tuple[list[str], Any, int]]:
  """(path keys, leaf, bytes of its shard on one device) for every leaf."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = logical_axes(path, leaf.ndim)
    if names[:1] == ("stages",):
      raise ValueError(
          f"state leaf {jax.tree_util.keystr(path)} is in a pipeline's stage layout "
          f"{leaf.shape}; pass the model's layout: train.step.abstract_train_state("
          "cfg, train_cfg) without a mesh (the planner splits the stacks itself).")
    spec = spec_for(names, rules, leaf.shape, sizes)
    check_divisible(jax.tree_util.keystr(path), leaf.shape, names, spec, sizes)
    split = math.prod(axes_size(sizes, entry) for entry in spec)
    keys = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    yield keys, leaf, int(np.prod(leaf.shape)) * leaf.dtype.itemsize // split


def _sharded_bytes(tree: Any, sizes: dict[str, int], rules) -> int:
  return sum(n for _, _, n in _leaf_bytes(tree, sizes, rules))


def _place(keys: list[str], ndim: int) -> str:
  """Where a leaf lives in a pipeline: a layer stack (split by layer), "first"
  (the embedding, chunk 0), "last" (final norm, head, MTP: chunk PP-1) or
  "every" (scalars: the optimizer's counters)."""
  for stack in _STACKS:
    if stack in keys:
      return stack
  if any(k.startswith("mtp_") for k in keys):
    return "last"
  for i in range(len(keys) - 1):
    if (keys[i], keys[i + 1]) == ("embed", "embedding"):
      return "first"
    if (keys[i], keys[i + 1]) in (("head", "kernel"), ("norm", "scale")):
      return "last"
  if ndim == 0:
    return "every"
  raise ValueError(f"{'/'.join(keys)}: the pipeline planner does not know which stage holds "
                   "this leaf; add it to deepseek_jax/parallel/plan.py `_place`.")


def _stage_bytes(tree: Any, sizes: dict[str, int], rules) -> dict[str, int]:
  """Sharded bytes by place; a stack's entry is per layer (bytes / its length)."""
  out = dict.fromkeys(_STACKS + ("first", "last", "every"), 0)
  for keys, leaf, n in _leaf_bytes(tree, sizes, rules):
    place = _place(keys, leaf.ndim)
    out[place] += n // leaf.shape[0] if place in _STACKS else n
  return out


def _chunk_bytes(per: dict[str, int], layout: StageLayout) -> list[int]:
  """Bytes of each chunk's share of a tree (`per` from `_stage_bytes`)."""
  last = layout.n_stages - 1
  return [len(layout.ids(c, False)) * per["dense_layers"]
          + len(layout.ids(c, True)) * per["moe_layers"]
          + (per["first"] if c == 0 else 0) + (per["last"] if c == last else 0)
          for c in range(layout.n_stages)]


def _check_pipeline(cfg: ModelConfig, pp: int, schedule: str | None,
                    num_microbatches: int | None) -> StageLayout | None:
  """The stage split of a pipe mesh (None without one); names the missing field."""
  if pp == 1:
    if schedule is not None:
      raise ValueError(f"pipeline_schedule={schedule!r} needs a pipeline: set the mesh's "
                       "pipe axis > 1 (e.g. --mesh=pipe=16,...), or drop the schedule.")
    if num_microbatches not in (None, 1):
      raise ValueError(f"num_microbatches={num_microbatches!r} applies only to a pipeline "
                       "(mesh pipe > 1 with a pipeline_schedule); drop it or add the pipe "
                       "axis.")
    return None
  if schedule is None:
    raise ValueError(f"mesh pipe={pp} needs a pipeline_schedule (launch.plan: --schedule), "
                     f"one of {list(SCHEDULES)} (V3: dualpipe), and num_microbatches.")
  if num_microbatches is None:
    raise ValueError(f"mesh pipe={pp} with pipeline_schedule={schedule!r} needs "
                     "num_microbatches (launch.plan: --num_microbatches), the micro-batches "
                     f"per step (dualpipe: even and >= 2 * pipe = {2 * pp}; dualpipev: "
                     f">= {2 * pp}).")
  if schedule == "dualpipev":       # its 2 PP chunks, as split_layers_v cuts them
    split_layers_v(cfg, pp)
    return split_layers(cfg, 2 * pp)
  return split_layers(cfg, pp)


def _routed_leaves(state: Any, sizes: dict[str, int], rules) -> Iterator[tuple[Any, int]]:
  """(leaf, shard bytes) of the MoE stack's routed-expert weights (w1, w3, w2)."""
  for keys, leaf, n in _leaf_bytes(state.params, sizes, rules):
    if "moe_layers" in keys and keys[-1] in ("w1", "w2", "w3") \
        and "shared_experts" not in keys:
      yield leaf, n


def _expert_weight_elems(cfg: ModelConfig, sizes: dict[str, int], rules, state: Any) -> int:
  """Elements of one MoE layer's routed-expert weights as the kernel holds
  them on a device: with expert parallelism the expert shard_map gathers its
  E/ep experts whole but for the `mlp_moe` split; without it the blocked
  kernel takes the stored (FSDP-sliced) shard and gathers one expert at a
  time (module doc)."""
  ep = axes_size(sizes, mesh_axes_of("exp", rules))
  if ep > 1:
    f = cfg.moe_inter_dim // axes_size(sizes, mesh_axes_of("mlp_moe", rules))
    return 3 * cfg.n_routed_experts // ep * cfg.dim * f
  return sum(n // leaf.dtype.itemsize // leaf.shape[0]
             for leaf, n in _routed_leaves(state, sizes, rules))


def _gathered_layer_elems(state: Any, tensor: int) -> int:
  """Elements of the largest block's weights outside the routed experts, whole
  but for the tensor split: what a layer gathers (FSDP) to run."""
  per = dict.fromkeys(_STACKS, 0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    stack = next((k for k in _STACKS if k in keys), None)
    if stack is None or (keys[-1] in ("w1", "w2", "w3") and "shared_experts" not in keys
                         and stack == "moe_layers"):
      continue
    per[stack] += int(np.prod(leaf.shape[1:]))
  return max(per.values()) // tensor


def _kernel_rows(cfg: ModelConfig, rows: int, n_exp: int) -> int:
  """Rows of the blocked kernel's padded buffer: n_blocks * bs for `rows`
  routed rows over `n_exp` experts (model/moe.py experts_blocked)."""
  bs = cfg.moe_block_size or default_moe_block_size(rows, n_exp)
  return (-(-rows // bs) + n_exp) * bs


def _transient_terms(cfg: ModelConfig, sizes: dict[str, int], rules, *, seqs: int,
                     seq_len: int, state: Any) -> tuple[int, int, int, dict[str, int]]:
  """(one layer's layer-input bytes, the working set X of one block's
  forward + backward, the head's working set, {term: bytes}) for `seqs`
  sequences per device (module doc)."""
  b = np.dtype(cfg.dtype).itemsize
  t = seqs * seq_len                                     # tokens per device
  tensor = axes_size(sizes, mesh_axes_of("heads", rules))
  vocab_split = axes_size(sizes, mesh_axes_of("vocab", rules))
  ep = axes_size(sizes, mesh_axes_of("exp", rules))
  heads = max(cfg.n_heads // tensor, 1)
  dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
  if cfg.attention == "gqa":                             # dense models: one head width
    dqk = dv = cfg.gqa_head_dim
  if 0 < cfg.attn_block_size < seq_len:                  # blockwise: linear in seq
    attention = seqs * heads * seq_len * (4 * (4 * dqk + 2 * dv) + b * (2 * dqk + 3 * dv))
  else:                                                  # naive: scores, probs, grad
    attention = 3 * seqs * heads * seq_len ** 2 * 4
  terms = {"attention": attention,
           "residual_f32": 8 * t * cfg.dim * 4,
           "layer_weights": 2 * _gathered_layer_elems(state, tensor) * 4}
  if cfg.n_moe_layers:
    routed = t * cfg.n_activated_experts
    f = cfg.moe_inter_dim // axes_size(sizes, mesh_axes_of("mlp_moe", rules))
    if ep > 1:
      cap = exchange_capacity(routed, ep, cfg.moe_ep_capacity)
      n_rows = _kernel_rows(cfg, ep * cap, cfg.n_routed_experts // ep)
      terms["exchange"] = ep * cap * cfg.dim * (b + 3 * 4)
    else:
      n_rows = _kernel_rows(cfg, routed, cfg.n_routed_experts)
    terms["expert_rows"] = n_rows * cfg.dim * (5 * b + 2 * 4) + 6 * n_rows * f * b
    uses = 1 + (cfg.n_mtp_depth > 0) + (ep > 1)
    terms["expert_weights"] = uses * _expert_weight_elems(cfg, sizes, rules, state) * (b + 4)
  head = 3 * t * min(VOCAB_CHUNK, cfg.vocab_size // vocab_split) * 4
  return t * cfg.dim * b, sum(terms.values()), head, terms


def _update_bytes(state: Any, sizes: dict[str, int], rules) -> int:
  """AdamW's float32 temporaries: the update of the largest parameter shard."""
  return max(n // leaf.dtype.itemsize * 4 for _, leaf, n in
             _leaf_bytes(state.params, sizes, rules))


def memory_plan(cfg: ModelConfig, sizes: dict[str, int], rules: str, *, state: Any,
                batch_size: int, seq_len: int, pipeline_schedule: str | None = None,
                num_microbatches: int | None = None) -> dict[str, Any]:
  """Bytes per device of params, grads, optimizer state and activations.

  sizes: {axis: size} for all five mesh axes (MeshConfig.shape(n)); pipe > 1
    needs `pipeline_schedule` (one of schedules.SCHEDULES) and
    `num_microbatches` M, with batch_size a multiple of M * data*fsdp*expert.
  state: the abstract train state to measure, in the model's layout: any
    object with `.params` and `.opt_state` pytrees of shaped leaves, e.g.
    `train.step.abstract_train_state(cfg, train_cfg)` (its moments_dtype and
    optimizer decide the optimizer state's bytes).
  """
  rule_set = resolve(rules)
  pp = sizes.get("pipe", 1)
  layout = _check_pipeline(cfg, pp, pipeline_schedule, num_microbatches)
  rows = axes_size(sizes, BATCH_AXES)
  if batch_size % rows:
    raise ValueError(f"batch_size={batch_size} must be a multiple of data*fsdp*expert={rows}.")
  sim = simulate(pipeline_schedule, pp, num_microbatches) if pp > 1 else None
  m = num_microbatches if pp > 1 else 1
  if batch_size % (m * rows):
    raise ValueError(f"batch_size={batch_size} does not split into num_microbatches={m} "
                     f"micro-batches over data*fsdp*expert={rows} devices: make it a multiple "
                     f"of {m} * {rows} = {m * rows}.")
  layer_in, transient, logits, terms = _transient_terms(
      cfg, sizes, rule_set, seqs=batch_size // (m * rows), seq_len=seq_len, state=state)
  update = _update_bytes(state, sizes, rule_set)
  if layout is None:
    layers, held = [cfg.n_layers], [(0,)]
    params = [_sharded_bytes(state.params, sizes, rule_set)]
    opt = [_sharded_bytes(state.opt_state, sizes, rule_set)]
    activations = [cfg.n_layers * layer_in + transient + logits + update]
    peak, copies = 1, 1
  else:
    layers = [len(ids) for ids in layout.layers]
    dual = pipeline_schedule in ("dualpipe", "dualpipev")
    if pipeline_schedule == "dualpipev":      # layout: the 2 PP chunks
      held = [(r, 2 * pp - 1 - r) for r in range(pp)]
    else:
      held = [(r, pp - 1 - r) if dual else (r,) for r in range(pp)]
    last = layout.n_stages - 1
    p_per = _stage_bytes(state.params, sizes, rule_set)
    o_per = _stage_bytes(state.opt_state, sizes, rule_set)
    p_chunk, o_chunk = _chunk_bytes(p_per, layout), _chunk_bytes(o_per, layout)
    params = [p_per["every"] + sum(p_chunk[c] for c in cs) for cs in held]
    opt = [o_per["every"] + sum(o_chunk[c] for c in cs) for cs in held]
    activations = [sim["activations"][r] * max(layers[c] for c in cs) * layer_in
                   + transient * (2 if pipeline_schedule == "dualpipe" else 1)
                   + (logits if last in cs else 0) + update
                   for r, cs in enumerate(held)]
    peak, copies = sim["peak_activations"], sim["param_copies"]
  totals = [2 * p + o + a for p, o, a in zip(params, opt, activations)]
  return {
      "devices": math.prod(sizes.values()),
      "mesh": dict(sizes), "rules": rules, "batch_size": batch_size, "seq_len": seq_len,
      "params_bytes_per_device": max(params),
      "grads_bytes_per_device": max(params),
      "opt_state_bytes_per_device": max(opt),
      "activation_bytes_per_device": int(max(activations)),
      "total_bytes_per_device": int(max(totals)),
      "pipe": pp, "pipeline_schedule": pipeline_schedule, "num_microbatches": m,
      "microbatch_size": batch_size // m,
      "layers_per_stage": layers,
      "layers_per_rank": [sum(layers[c] for c in cs) for cs in held],
      "peak_activations": peak, "param_copies": copies,
      "params_bytes_per_rank": params,
      "opt_state_bytes_per_rank": opt,
      "activation_bytes_per_rank": [int(a) for a in activations],
      "activation_terms_bytes": {"layer_inputs": cfg.n_layers * layer_in, **terms,
                                 "head": logits, "update": update},
  }
