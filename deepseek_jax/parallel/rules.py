"""Logical axis names for every parameter, and rule sets mapping them to the mesh.

Each weight dimension has a logical name (MaxText's vocabulary):

  batch, seq      activations
  embed           the model width `dim` (FSDP shards it)
  vocab           the vocabulary (tensor-parallel head and embedding)
  heads, head_dim attention heads and their per-head widths
  kv_heads        grouped-query attention's key/value heads (dense models)
  q_lora, kv_lora the MLA compression ranks (`kv_lora_rope`: W_dkv's output,
                  c_kv and the shared rope key, never split)
  mlp             hidden units of dense MLPs and shared experts
  exp, mlp_moe    routed experts and their hidden units (`exp` goes to
                  `expert` in every rule set)
  layers          the stacked-layer axis of `nn.scan`
  stages          on a mesh with pipe > 1 the train state stores each layer
                  stack as [stages, layers, ...] (parallel/pipeline_layout.py
                  `stage_tree`): `stages` goes to `pipe` in every rule set
  norm, router, exp_bias, mtp_concat   small or unsplittable: replicated
  o_groups, o_in, o_lora   DeepSeek-V4's grouped output projection
                  (model/v4.py): wo_a [o_groups, o_in = H hd / g, o_lora] maps
                  each group of heads to its own rank-o_lora output; wo_b
                  [g o_lora, dim] reads the groups' outputs side by side.
                  `o_groups` goes to `tensor` (a tensor rank holds whole
                  groups: wo_a's input is its share of the heads and wo_b,
                  whose group-major rows are named o_groups too, is
                  row-parallel); `o_in` is FSDP'd like `embed` (V4-Flash:
                  4096, where o_lora = 1024 would not take fsdp x expert =
                  2048); o_lora stays whole. V4's mHC mixers `fn` [n dim, .]
                  are FSDP'd along their input (named `embed`: hc_mult
                  streams of the width, flattened); their biases, the
                  compressors' per-slot bias's slots and the hash-routing
                  table `tid2eid` [vocab, k] (int, not trained) are replicated.

A rule set is an ordered list of (logical name, mesh axes). A dimension takes
the first rule for its name whose mesh axes are all still unused in that
array's spec, else stays unsplit. So in `ep_fsdp` an expert weight
[exp, embed, mlp_moe] puts `exp` on `expert`, then skips
`embed -> (fsdp, expert)` (expert is taken) for `embed -> fsdp`; every other
weight puts `embed` on (fsdp, expert): outside the MoE FFN the expert axis is
one more FSDP axis, so no parameter is replicated across it (as DeepSeek-V3).

A rule for the name `*` (LEFTOVER) is a last resort for weights, applied
after every dimension has had its turn (and only when shapes are known): if
its axes are still unused in the array, they join the first dimension they
divide (not `layers`, and not the small replicated names). `ep_fsdp` has
`* -> expert`: on V3 with expert=64, fsdp=16, the MLA rank q_lora = 1536 does
not divide fsdp x expert = 1024 and falls back to fsdp, and the leftover rule
then splits the heads over `expert` instead of replicating the weight 64 times.

Parameters stay plain (unboxed) arrays: the names live here, keyed by the
module and parameter names (`logical_axes`), and a new parameter without an
entry is an error, not a silently replicated tensor.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]
BATCH_AXES = ("data", "fsdp", "expert")
# Every rule set: the batch over the batch axes, a pipeline's train state split
# by stage over `pipe` (each rank stores its own stage's layer stacks), and the
# routed experts over `expert`, so a mesh with expert > 1 runs expert
# parallelism (parallel/expert.py) whichever set is chosen.
_BASE = (("batch", BATCH_AXES), ("stages", "pipe"), ("exp", "expert"))
_FSDP = (("embed", "fsdp"), ("q_lora", "fsdp"), ("kv_lora", "fsdp"), ("o_in", "fsdp"))
LEFTOVER = "*"
# Names a leftover axis never joins: the scan axis, activations, small vectors.
_NO_LEFTOVER = {None, "stages", "layers", "batch", "seq", "norm", "router", "exp_bias"}
_TENSOR = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
           ("mlp_moe", "tensor"), ("vocab", "tensor"), ("o_groups", "tensor"))

RULE_SETS: dict[str, Rules] = {
    # Data parallelism: the batch split, every weight whole on every device
    # but the routed experts (split over `expert` when it is > 1).
    "dp": _BASE,
    # ZeRO-3: weights and optimizer state split over `fsdp` along the width.
    "fsdp": _BASE + _FSDP,
    # FSDP + Megatron tensor parallelism over heads / hidden units / vocab.
    "fsdp_tp": _BASE + _FSDP + _TENSOR,
    # DeepSeek-V3: as fsdp_tp, and outside the routed experts `expert` is one
    # more FSDP axis, so no weight is replicated over it.
    "ep_fsdp": (_BASE
                + (("embed", ("fsdp", "expert")), ("q_lora", ("fsdp", "expert")),
                   ("kv_lora", ("fsdp", "expert")), ("o_in", ("fsdp", "expert")))
                + _FSDP + _TENSOR + (("*", "expert"),)),
}

# (module name, parameter name) -> logical names of the unstacked weight.
_PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("head", "kernel"): ("embed", "vocab"),
    ("wq_a", "kernel"): ("embed", "q_lora"),
    ("wq_b", "kernel"): ("q_lora", "heads", "head_dim"),
    ("wq", "kernel"): ("embed", "heads", "head_dim"),
    ("wkv_a", "kernel"): ("embed", "kv_lora_rope"),
    ("wkv_b", "kernel"): ("kv_lora", "heads", "head_dim"),
    ("wo", "kernel"): ("heads", "head_dim", "embed"),
    # Grouped-query attention (model/gqa.py; its wq / wo reuse the entries above).
    ("wk", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("wv", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("wq", "bias"): ("heads", "head_dim"),
    ("wk", "bias"): ("kv_heads", "head_dim"),
    ("wv", "bias"): ("kv_heads", "head_dim"),
    ("w1", "kernel"): ("embed", "mlp"),
    ("w3", "kernel"): ("embed", "mlp"),
    ("w2", "kernel"): ("mlp", "embed"),
    ("ffn", "gate"): ("embed", "router"),
    ("ffn", "w1"): ("exp", "embed", "mlp_moe"),
    ("ffn", "w3"): ("exp", "embed", "mlp_moe"),
    ("ffn", "w2"): ("exp", "mlp_moe", "embed"),
    ("ffn", "bias"): ("exp_bias",),
    ("eh_proj", "kernel"): ("mtp_concat", "embed"),
    # V3.2's lightning indexer (model/dsa.py; its wq_b reuses the entry above).
    ("wk_index", "kernel"): ("embed", "head_dim"),
    ("k_norm", "bias"): ("norm",),
    ("weights_proj", "kernel"): ("embed", "heads"),
    # DeepSeek-V4 (model/v4.py, model/hyper.py; its wq_a / wq_b / q_norm,
    # the indexer's wq_b / weights_proj and the MoE reuse the entries above).
    # The single shared key/value head and the compressors' key and gate
    # projections [dim, (2 x) width]: the width is a head's, never split.
    ("wkv", "kernel"): ("embed", "head_dim"),
    ("wgate", "kernel"): ("embed", "head_dim"),
    ("compressor", "ape"): (None, "head_dim"),
    ("attn", "sinks"): ("heads",),
    ("wo_a", "kernel"): ("o_groups", "o_in", "o_lora"),
    # [g o_lora, dim], group-major: split over `tensor` it is split by group.
    ("wo_b", "kernel"): ("o_groups", "embed"),
    # mHC mixers: fn [n dim, (2 + n) n] (the head's [n dim, n]) FSDP'd along
    # the n streams' flattened width (V4-Flash: 16384 x 24 per mixer, 129 MiB
    # a device in all if replicated); base replicated; their `scale` [3] / [1]
    # takes the norm rule below.
    ("attn_hc", "fn"): ("embed", None),
    ("attn_hc", "base"): (None,),
    ("ffn_hc", "fn"): ("embed", None),
    ("ffn_hc", "base"): (None,),
    ("hc_head", "fn"): ("embed", None),
    ("hc_head", "base"): (None,),
    # A reward model's value head (rl/reward_model.py), beside the model's
    # parameters: [dim] read against the final hidden state; its bias is a scalar.
    ("value_head", "kernel"): ("embed",),
}

# Leaves named by their own name alone, whatever module holds them: V4's
# hash-routing table sits in its block's scope (`layers_{i}/tid2eid`, in the
# router_bias collection): int32 [vocab, k] token -> experts, not trained.
_LEAF_AXES: dict[str, tuple[str | None, ...]] = {
    "tid2eid": (None, None),
}


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
  """Logical names of the leaf at `path` (a pytree key path) with `ndim` dims.

  Works for parameters, router biases and optimizer moments alike (an optax
  moment's path ends with its parameter's path). A stacked (scanned) weight
  has one more leading dim: `layers`, and two in the stage layout of a
  pipeline's train state: `stages`, `layers`. Scalars (step counters) have
  none.
  """
  if ndim == 0:
    return ()
  keys = [_key_name(p) for p in path]
  name = "/".join(keys)
  if keys and keys[-1] == "scale":
    base = ("norm",)
  elif len(keys) >= 2 and (keys[-2], keys[-1]) in _PARAM_AXES:
    base = _PARAM_AXES[(keys[-2], keys[-1])]
  elif keys and keys[-1] in _LEAF_AXES:
    base = _LEAF_AXES[keys[-1]]
  else:
    raise ValueError(f"no logical axis names for {name} (rank {ndim}); add its "
                     "(module, parameter) entry to deepseek_jax/parallel/rules.py.")
  if ndim == len(base) + 1:
    return ("layers",) + base
  if ndim == len(base) + 2 and any(k in ("dense_layers", "moe_layers") for k in keys):
    return ("stages", "layers") + base
  if ndim != len(base):
    raise ValueError(f"{name} has rank {ndim}; its logical names {base} expect "
                     f"{len(base)} (or {len(base) + 1} when stacked, {len(base) + 2} "
                     "in a pipeline's stage layout).")
  return base


def as_axes(axes) -> tuple[str, ...]:
  """A PartitionSpec entry (None, an axis name or a tuple of them) as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


_as_tuple = as_axes


def spec_for(names: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None,
             axis_sizes: dict[str, int] | None = None) -> PartitionSpec:
  """PartitionSpec of an array whose dims have logical `names` (see module doc).

  With `shape` and `axis_sizes`, a rule whose axes do not divide the dimension
  gives way to the next rule for the same name (ep_fsdp: V3's dim 7168 on
  fsdp x expert = 2048 falls back to fsdp alone); the last rule for a name is
  kept even then, and `check_divisible` reports it.
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    candidates = [_as_tuple(axes) for logical, axes in rules
                  if logical == name and _as_tuple(axes)]
    candidates = [axes for axes in candidates if not used & set(axes)]
    chosen = None
    for j, axes in enumerate(candidates):
      fits = (shape is None or axis_sizes is None
              or shape[i] % axes_size(axis_sizes, axes) == 0)
      if fits or j == len(candidates) - 1:
        chosen = axes
        break
    if chosen:
      used |= set(chosen)
      out.append(chosen)
    else:
      out.append(())
  if shape is not None and axis_sizes is not None:
    for logical, axes in rules:
      axes = _as_tuple(axes)
      if logical != LEFTOVER or not axes or used & set(axes):
        continue
      for i, name in enumerate(names):
        joined = out[i] + axes
        if name not in _NO_LEFTOVER and shape[i] % axes_size(axis_sizes, joined) == 0:
          out[i] = joined
          used |= set(axes)
          break
  return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in out))


def mesh_axes_of(name: str, rules: Rules) -> tuple[str, ...]:
  """Mesh axes a lone dimension named `name` goes to (() = unsplit)."""
  return _as_tuple(spec_for((name,), rules)[0])


def axes_size(axis_sizes: dict[str, int], axes) -> int:
  """Devices a dimension is split over: the product of its mesh axes' sizes
  (`axes` a spec entry: None, one axis name or a tuple of them)."""
  return math.prod(axis_sizes[a] for a in _as_tuple(axes))


def check_divisible(what: str, shape: Sequence[int], names: Sequence[str | None],
                    spec: PartitionSpec, axis_sizes: dict[str, int]) -> None:
  for dim, (size, name, axes) in enumerate(zip(shape, names, spec)):
    axes = _as_tuple(axes)
    n = axes_size(axis_sizes, axes)
    if size % n:
      raise ValueError(
          f"{what}: dimension {dim} ({name}, size {size}) is not divisible by mesh "
          f"axes {axes} of total size {n}; change those axis sizes or pick a rule set "
          "that leaves this dimension unsplit.")


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding per leaf (arrays or ShapeDtypeStructs), divisibility checked."""
  sizes = dict(mesh.shape)

  def one(path, leaf):
    names = logical_axes(path, leaf.ndim)
    spec = spec_for(names, rules, leaf.shape, sizes)
    check_divisible(jax.tree_util.keystr(path), leaf.shape, names, spec, sizes)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """[batch, seq] inputs: rows split over the batch axes, sequences whole."""
  return NamedSharding(mesh, spec_for(("batch", "seq"), rules))


def current_rules() -> Rules | None:
  """The rule set of the enclosing `activate` (None outside one or without a mesh)."""
  if jax.sharding.get_abstract_mesh().empty:
    return None
  rules = tuple(nn.get_logical_axis_rules())
  return rules or None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `activate`."""
  rules = current_rules()
  if rules is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(names, rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules | str) -> Iterator[None]:
  """Makes `mesh` current (jax.set_mesh) and `rules` the logical rules.

  Trace (first call of a jitted function) and call inside it: the model reads
  both to place activations and to run the MoE dispatch in shard_map.
  """
  rules = resolve(rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def resolve(rules: Rules | str) -> Rules:
  """A rule set given by name (a key of RULE_SETS) or as rules."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"rules={rules!r} is not a rule set; choose one of {sorted(RULE_SETS)}.")
    return RULE_SETS[rules]
  return tuple(rules)
