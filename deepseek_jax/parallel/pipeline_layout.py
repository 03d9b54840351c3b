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

DualPipeV (`split_layers_v`, schedule "dualpipev") cuts the blocks into 2 PP
contiguous chunks and stage r stores two of them, chunk r then chunk
2PP-1-r (`StageLayout.chunks`): its block ids are not contiguous, and its
slots are chunk-major (each chunk position has its own slot count, the same
on every stage), so the executor finds chunk d of a rank at a fixed slot
offset. Stage 0 then holds the embedding and the head. The checkpoint meta
records it as [[blocks of chunk r, blocks of chunk 2PP-1-r] per stage].
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
  stage s (0..L-1, the n_dense dense blocks first, as the model stacks them).
  `chunks[s]` (DualPipeV; None: one chunk per stage, `layers[s]`): the
  stage's chunks, each a tuple of contiguous block ids, in stored order."""
  layers: tuple[tuple[int, ...], ...]
  n_dense: int
  chunks: tuple[tuple[tuple[int, ...], ...], ...] | None = None

  @property
  def n_stages(self) -> int:
    return len(self.layers)

  def parts(self, stage: int) -> tuple[tuple[int, ...], ...]:
    """Stage s's chunks (block ids each), in stored order."""
    return self.chunks[stage] if self.chunks is not None else (self.layers[stage],)

  def _kind(self, ids, moe: bool) -> list[int]:
    if moe:
      return [i - self.n_dense for i in ids if i >= self.n_dense]
    return [i for i in ids if i < self.n_dense]

  def ids(self, stage: int, moe: bool) -> list[int]:
    """Indices into the `moe_layers` (moe) or `dense_layers` stack of stage s."""
    return [i for part in self.parts(stage) for i in self._kind(part, moe)]

  def part_slots(self, moe: bool) -> list[int]:
    """Slots of each chunk position (the most blocks of this kind any stage's
    chunk at that position has): chunk p's slots start at sum(earlier)."""
    n = len(self.parts(0))
    return [max(len(self._kind(self.parts(s)[p], moe)) for s in range(self.n_stages))
            for p in range(n)]

  def slots(self, moe: bool) -> int:
    return sum(self.part_slots(moe))

  def index(self, moe: bool) -> tuple[np.ndarray, np.ndarray]:
    """([PP, slots] stack index, [PP, slots] active): padded slots point at
    block 0 of the stack and are inactive; chunk-major slots."""
    per = self.part_slots(moe)
    idx = np.zeros((self.n_stages, sum(per)), np.int32)
    active = np.zeros((self.n_stages, sum(per)), bool)
    for s in range(self.n_stages):
      for p, part in enumerate(self.parts(s)):
        ids, off = self._kind(part, moe), sum(per[:p])
        idx[s, off:off + len(ids)] = ids
        active[s, off:off + len(ids)] = True
    return idx, active

  def active(self) -> dict[str, np.ndarray]:
    """{stack key: bool [PP, slots]}: which slots hold a block, for each
    stack the model has (a stage's `active` argument to the model's blocks)."""
    return {name: self.index(moe)[1] for name, moe in STACKS if self.slots(moe)}

  def describe(self) -> str:
    """One line per stage: its blocks, embedding / head when it has them."""
    total = sum(len(ids) for ids in self.layers)
    lines = []
    for s, ids in enumerate(self.layers):
      extra = []
      if 0 in ids:
        extra.append("embedding")
      if total - 1 in ids:
        extra.append("norm, head, MTP, loss")
      spans = [f"blocks {p[0]}-{p[-1]}" if len(p) > 1 else f"block {p[0]}"
               for p in self.parts(s)]
      kinds = (f"{len(self.ids(s, False))} dense, {len(self.ids(s, True))} MoE")
      lines.append(f"stage {s}: {' + '.join(spans)} ({kinds})"
                   + (f" + {', '.join(extra)}" if extra else ""))
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


def split_layers_v(cfg: ModelConfig, n_stages: int,
                   chunk_layers: tuple[int, ...] | None = None) -> StageLayout:
  """DualPipeV's layout: the blocks cut into 2 PP contiguous chunks (as
  even as possible, earlier chunks taking the remainder, or the sizes you
  give); stage r stores chunk r, then chunk 2PP-1-r."""
  total = cfg.n_dense_layers + cfg.n_moe_layers
  if chunk_layers is None and total < 2 * n_stages:
    raise ValueError(
        f"the model's {total} blocks cannot be cut into the 2 * pipe = {2 * n_stages} chunks "
        "of at least one block DualPipeV runs; lower mesh.pipe, add layers or use another "
        "pipeline_schedule.")
  cut = split_layers(cfg, 2 * n_stages, chunk_layers)      # the 2 PP chunks
  chunks = tuple((cut.layers[r], cut.layers[2 * n_stages - 1 - r]) for r in range(n_stages))
  return StageLayout(tuple(a + b for a, b in chunks), cfg.n_dense_layers, chunks)


def layout_for(cfg: ModelConfig, n_stages: int, schedule: str | None = None,
               stage_layers=None) -> StageLayout:
  """The stage layout `schedule` runs on pipe = n_stages: DualPipeV's
  (`split_layers_v`; stage_layers then gives the 2 PP chunk sizes) or
  contiguous stages (`split_layers`)."""
  if schedule == "dualpipev":
    return split_layers_v(cfg, n_stages, stage_layers)
  return split_layers(cfg, n_stages, stage_layers)


def state_layout(cfg: ModelConfig, mesh, schedule: str | None = None) -> StageLayout | None:
  """The stage layout of a train state on `mesh` (None without a pipe axis
  > 1: the model's own layout); schedule: the run's pipeline_schedule
  (DualPipeV stores its chunks differently)."""
  pp = dict(mesh.shape).get(PIPE, 1) if mesh is not None else 1
  return layout_for(cfg, pp, schedule) if pp > 1 else None


def layout_from_sizes(cfg: ModelConfig, sizes) -> StageLayout | None:
  """The layout saved in a checkpoint's meta (`pipeline_stages`: blocks per
  stage, or per stage [chunk r, chunk 2PP-1-r] for DualPipeV; None for the
  model's own layout)."""
  if not sizes:
    return None
  if isinstance(sizes[0], (list, tuple)):
    pp = len(sizes)
    chunk_layers = [sizes[c][0] if c < pp else sizes[2 * pp - 1 - c][1] for c in range(2 * pp)]
    return split_layers_v(cfg, pp, tuple(chunk_layers))
  return split_layers(cfg, len(sizes), tuple(sizes))


def layout_sizes(layout: StageLayout | None) -> list | None:
  if layout is None:
    return None
  if layout.chunks is not None:
    return [[len(part) for part in parts] for parts in layout.chunks]
  return [len(ids) for ids in layout.layers]


__all__ = ["PIPE", "STACKS", "StageLayout", "split_layers", "split_layers_v", "layout_for",
           "stage_tree", "unstage_tree",
           "zero_padded_slots", "state_layout", "layout_from_sizes", "layout_sizes"]
