"""How a run starts: the mesh it trains on, and the state it starts from.

Every trainer (pretraining / SFT in loop.py, GRPO in rl/trainer.py) takes
these from here, through the run harness (runner.py):

  mesh_for        (mesh, rules) of a MeshConfig, with the batch and pipeline
                  checks done before anything compiles
  resume_or_start the latest checkpoint of the run (converted when it was
                  saved in another pipeline stage layout), or a fresh state
  fresh_state     random init, or the weights of another run (init_from:
                  load_init_from + with_variables) or of a Hugging Face
                  checkpoint (init_from_hf: hf_init), with a fresh optimizer
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel import MeshConfig
from deepseek_jax.parallel.pipeline import check_pipeline
from deepseek_jax.parallel.pipeline_layout import (layout_for, layout_from_sizes, layout_sizes,
                                                   stage_tree, state_layout, unstage_tree)
from deepseek_jax.train import checkpoint, export, hf_init
from deepseek_jax.train.config import TrainConfig, optimizer_change, schedule_changes
from deepseek_jax.train.step import (TrainState, abstract_train_state, init_train_state,
                                     model_variables, num_microbatches, state_shardings)


def describe_mesh(mesh) -> str:
  return " ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.size} devices)"


def mesh_for(mesh_cfg: MeshConfig | None, train_cfg: TrainConfig, model_cfg=None):
  """(mesh, rules) for training, or (None, None) for one device; checks that
  the batch splits over the batch axes (and, with a pipe axis, that the
  model, schedule and micro-batches fit the pipeline: pass model_cfg) before
  anything compiles."""
  if mesh_cfg is None:
    return None, None
  mesh_cfg.shape(len(jax.devices()))          # axis sizes vs devices: ValueError
  if len(jax.devices()) == 1:
    return None, None
  mesh, rules = parallel.setup(mesh_cfg)
  rows = parallel.rules.axes_size(dict(mesh.shape), parallel.rules.BATCH_AXES)
  if train_cfg.batch_size % rows:
    raise ValueError(f"batch_size={train_cfg.batch_size} must be a multiple of the batch "
                     f"mesh axes data*fsdp*expert={rows} ({describe_mesh(mesh)}).")
  if mesh_cfg.pipe > 1:
    m = num_microbatches(train_cfg, mesh_cfg.pipe)
    check_pipeline(mesh_cfg.pipe, train_cfg.pipeline_schedule, m)
    if model_cfg is not None:
      layout_for(model_cfg, mesh_cfg.pipe, train_cfg.pipeline_schedule)
    if train_cfg.batch_size % (m * rows):
      raise ValueError(
          f"batch_size={train_cfg.batch_size} must be a multiple of num_microbatches x the "
          f"batch mesh axes = {m} x {rows} (each micro-batch splits over data*fsdp*expert); "
          f"raise batch_size to a multiple of {m * rows} or change num_microbatches.")
  return mesh, rules


# ModelConfig fields a run may change from the run it starts from (init_from):
# the context extension (YaRN), how the same weights are computed, and the
# V3.2 training stage (dsa_stage: dense warm-up -> sparse).
INIT_FROM_MAY_CHANGE = (("max_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale",
                         "dtype", "param_dtype", "init_std", "dsa_stage")
                        + checkpoint.IMPLEMENTATION_FIELDS)
# ...and, from a run without DeepSeek Sparse Attention (index_topk 0: V3), the
# fields that add it: a V3 run's weights start a V3.2 model, its lightning
# indexers fresh (`with_fresh_indexer`).
INIT_FROM_ADDS_DSA = ("index_topk", "index_n_heads", "index_head_dim")


def load_init_from(model_cfg: ModelConfig, workdir: str) -> tuple[dict, int]:
  """(variables, step) of the latest checkpoint of the run in `workdir`.

  ValueError when that run's model differs from model_cfg in a field outside
  INIT_FROM_MAY_CHANGE (shapes or the function computed).
  """
  export.require_run(workdir, "init_from")
  src_cfg, _, variables, src_step = export.load_trained_run(workdir)
  src, dst = src_cfg.to_dict(), model_cfg.to_dict()
  may_change = INIT_FROM_MAY_CHANGE + (INIT_FROM_ADDS_DSA if not src_cfg.use_dsa else ())
  bad = [f"{k}: {src[k]!r} -> {dst[k]!r}" for k in dst
         if k not in may_change and src.get(k) != dst[k]]
  if bad:
    raise ValueError(f"init_from={workdir!r}: its model differs in " + "; ".join(bad)
                     + f". Only {may_change} may change; set the others "
                     "as that run had them.")
  return variables, src_step


def with_fresh_indexer(variables: dict, fresh: dict) -> dict:
  """`variables` (a run's {"params", "router_bias"}, the model's layout) with
  every `indexer` module of `fresh` (the new model's, same layout) that
  they lack added: a V3 run's weights for a V3.2 model. Any other
  difference in structure is left for `with_variables` to refuse."""
  def merge(have, new):
    if not isinstance(new, dict) or not isinstance(have, dict):
      return have
    out = dict(have)
    for key, value in new.items():
      if key not in have and key == "indexer":
        out[key] = value
      elif key in have:
        out[key] = merge(have[key], value)
    return out
  return {**variables, "params": merge(variables["params"], fresh["params"])}


def with_variables(state: TrainState, variables: dict, layout=None) -> TrainState:
  """state with `variables`' params and router biases (the model's layout),
  cast to and placed like state's (any mesh, any process count); `layout`:
  the state's stage layout on a pipe mesh (`state_layout`), None otherwise."""
  if layout is not None:
    variables = stage_tree(layout, jax.tree.map(np.asarray, jax.device_get(variables)))

  def place(new, old):
    host = np.asarray(jax.device_get(new)).astype(old.dtype)
    if not old.committed:   # one device: stay uncommitted like the rest of the
      return jnp.asarray(host)   # state, or the step compiles a second time
    return jax.make_array_from_callback(old.shape, old.sharding, lambda idx: host[idx])
  return state.replace(
      params=jax.tree.map(place, variables["params"], state.params),
      router_bias=jax.tree.map(place, variables["router_bias"], state.router_bias))


def fresh_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, rules,
                log: Callable[[str], None]) -> TrainState:
  """Step 0 of a run without checkpoints: the parameters and router biases of
  train_cfg.init_from_hf (an HF checkpoint) or train_cfg.init_from (another
  run), else random ones (seed); the optimizer state is always fresh."""
  if train_cfg.init_from_hf:
    state = hf_init.init_state_from_hf(model_cfg, train_cfg, train_cfg.init_from_hf,
                                       mesh, rules)
    log(f"initialised from {train_cfg.init_from_hf} (HF checkpoint): parameters and "
        "router biases; optimizer and data start fresh")
    return state
  init = load_init_from(model_cfg, train_cfg.init_from) if train_cfg.init_from else None
  state = init_train_state(model_cfg, train_cfg, jax.random.key(train_cfg.seed), mesh, rules)
  if init is not None:
    variables = init[0]
    if model_cfg.use_dsa:          # a V3 run's weights: the indexers start fresh
      fresh = model_variables(model_cfg, state, mesh, train_cfg.pipeline_schedule)
      variables = with_fresh_indexer(variables, fresh)
    state = with_variables(state, variables,
                           state_layout(model_cfg, mesh, train_cfg.pipeline_schedule))
    log(f"initialised from {train_cfg.init_from} (step {init[1]}): parameters and "
        "router biases; optimizer and data start fresh")
  return state


def restore_relayout(ckpts, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, rules,
                     saved_layout, layout):
  """(state, data state) of the latest checkpoint, saved in stage layout
  `saved_layout` (None: the model's own), converted to `layout` (a resume on
  another pipe count, or without one): read whole on every device, then
  re-split and placed in the state's shardings."""
  target = abstract_train_state(model_cfg, train_cfg, layout=saved_layout)
  if mesh is not None:
    whole = NamedSharding(mesh, P())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole),
                          target)
  state, saved = ckpts.restore(target)

  def convert(st):
    st = unstage_tree(saved_layout, st) if saved_layout is not None else st
    return stage_tree(layout, st) if layout is not None else st
  out = (None if mesh is None
         else state_shardings(model_cfg, train_cfg, mesh, rules))
  return jax.jit(convert, out_shardings=out)(state), saved


def resume_or_start(ckpts: checkpoint.Checkpoints, model_cfg: ModelConfig,
                    train_cfg: TrainConfig, mesh, rules, *, fresh: Callable[[], TrainState],
                    log: Callable[[str], None]) -> tuple[TrainState, dict, int | None]:
  """(state, the checkpoint's data state ({} when fresh), the step resumed
  from or None): the latest checkpoint in `ckpts` in the state layout of
  `mesh` (converted when saved on another pipe count), else `fresh()`.

  ValueError when train_cfg's learning-rate schedule would bend the saved
  run's mid-way (`schedule_changes`) or its optimizer is another
  (`optimizer_change`)."""
  resumed = ckpts.latest_step()
  if resumed is None:
    return fresh(), {}, None
  meta = ckpts.saved_meta()
  changed = schedule_changes(meta["train_config"], train_cfg)
  if changed:
    raise ValueError(
        f"the learning-rate schedule differs from the checkpointed run's in {ckpts.directory} "
        f"({'; '.join(changed)}): resuming would bend it mid-run. Keep the saved values "
        "(with decay_steps=0 the cosine runs to `steps`: to extend a run, set decay_steps "
        "to the saved resolved value), or start a new workdir with init_from.")
  refused = optimizer_change(meta["train_config"], train_cfg)
  if refused:
    raise ValueError(f"{ckpts.directory}: {refused}")
  layout = state_layout(model_cfg, mesh, train_cfg.pipeline_schedule)
  saved_stages = meta.get("pipeline_stages")
  if saved_stages == layout_sizes(layout):
    state, saved = ckpts.restore(abstract_train_state(model_cfg, train_cfg, mesh, rules))
  else:
    state, saved = restore_relayout(ckpts, model_cfg, train_cfg, mesh, rules,
                                    layout_from_sizes(model_cfg, saved_stages), layout)
    log(f"checkpoint converted from pipeline stages {saved_stages or 'none'} to "
        f"{layout_sizes(layout) or 'none (mesh.pipe=1)'}")
  log(f"resuming from {ckpts.directory} at step {resumed}"
      + (f" (ignoring init_from_hf={train_cfg.init_from_hf}: the run's own checkpoint "
         "comes first)" if train_cfg.init_from_hf else ""))
  return state, saved, resumed
