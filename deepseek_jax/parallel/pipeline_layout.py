"""Pipeline stages: which blocks each rank runs, and the train state stored by stage
(DESIGN.md §4; the executor is parallel/pipeline.py, its tick table
parallel/pipeline_table.py).

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
record the layout (`layout_sizes`, read back by `layout_from_sizes`);
`unstage_tree` converts back to the model's layout (export, evaluation, a
resume on another pipe count).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig

PIPE = "pipe"

# The model's layer stacks (params keys) and whether their blocks are MoE.
STACKS = (("dense_layers", False), ("moe_layers", True))


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

  def active(self) -> dict[str, np.ndarray]:
    """{stack key: bool [PP, slots]}: which slots hold a block, for each
    stack the model has (a stage's `active` argument to the model's blocks)."""
    return {name: self.index(moe)[1] for name, moe in STACKS if self.slots(moe)}

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


def _stack_of(path) -> bool | None:
  """Whether a pytree leaf at `path` lies in the MoE (True) or dense (False)
  layer stack, None outside both. Works for params, router biases and the
  optimizer's moments alike (a moment's path ends with its parameter's)."""
  names = dict(STACKS)
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


def zero_padded_slots(layout: StageLayout, tree):
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


__all__ = ["PIPE", "STACKS", "StageLayout", "split_layers", "stage_tree", "unstage_tree",
           "zero_padded_slots", "state_layout", "layout_from_sizes", "layout_sizes"]
