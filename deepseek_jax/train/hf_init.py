"""Fine-tuning from a published Hugging Face checkpoint (`TrainConfig.init_from_hf`).

A run with `init_from_hf=DIR` and no checkpoint of its own starts from the
weights in DIR (DeepSeek-V3 / R1 or V2 / V2-Lite, `deepseek_jax.interop`): parameters
and router biases (`e_score_correction_bias`; zero for V2) as published, a
fresh optimizer, step 0. The model config is the checkpoint's
(`finetune_configs`); a run's own model overrides may change only what keeps
every parameter's shape (context length and YaRN, numerics, kernels,
`n_mtp_depth=0` to leave the MTP module out), and an override that would add
or reshape a parameter is refused, naming it; one addition is allowed:
index_topk / index_n_heads / index_head_dim turn a V3 checkpoint into a
V3.2 model whose lightning indexers start fresh (seed), as `init_from` does
from a V3 run. Once the run has checkpoints it
resumes from them and ignores init_from_hf.

Memory: tensors stream from the safetensors shards into the model's leaves
one at a time (`load_hf_checkpoint`; with a mesh each device's shard is built
from the tensors it overlaps), so the host holds the model plus one tensor;
the optimizer state is then created from the loaded parameters, never a
second, random copy of the model.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from deepseek_jax import interop
from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.safetensors_io import flatten, unflatten
from deepseek_jax.model import abstract_variables, init_variables
from deepseek_jax.parallel.pipeline_layout import stage_tree, state_layout
from deepseek_jax.parallel.rules import Rules
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import TrainState, make_tx, state_shardings

TOKENIZER_NAME = "tokenizer.json"


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in flatten(abstract_variables(cfg)).items()}


def adds_indexers(base: ModelConfig, cfg: ModelConfig) -> bool:
  """Whether `cfg` is `base` (a DeepSeek-V3 checkpoint, no DSA) turned into
  V3.2 by index_topk / index_n_heads / index_head_dim: its lightning
  indexers, which the checkpoint lacks, then start fresh (init_state_from_hf),
  as `init_from` does from a V3 run (train/start.py)."""
  return cfg.use_dsa and not base.use_dsa and not cfg.is_v4 and not base.is_v4


def check_shapes_kept(base: ModelConfig, cfg: ModelConfig, where: str) -> None:
  """ValueError unless every variable `cfg` builds exists in `base` with the
  same shape (leaving variables out, e.g. the MTP module, is allowed; so is
  adding V3.2's indexers to a V3 checkpoint: adds_indexers); the message
  names the config fields that differ."""
  have, want = _shapes(base), _shapes(cfg)
  fresh = adds_indexers(base, cfg)
  bad = sorted(k for k, shape in want.items() if have.get(k) != shape
               and not (fresh and k not in have and "/indexer/" in k))
  if not bad:
    return
  fields = [f"{f.name}: {getattr(base, f.name)!r} -> {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if getattr(base, f.name) != getattr(cfg, f.name)]
  shown = ", ".join(f"{k} {have.get(k, 'absent')} -> {want[k]}" for k in bad[:3])
  raise ValueError(
      f"init_from_hf={where!r}: the model overrides ({'; '.join(fields)}) change parameter "
      f"shapes the checkpoint does not have ({shown}{', ...' if len(bad) > 3 else ''}); only "
      "shape-keeping fields (max_seq_len, rope_factor, mscale, dtype, param_dtype, moe_impl, "
      "remat_policy, fp8, n_mtp_depth=0, ...) may differ from the checkpoint's config, and "
      "index_topk / index_n_heads / index_head_dim may add V3.2's indexers to a V3 one.")


def finetune_model_config(path: str, overrides: Mapping[str, Any] | None = None
                          ) -> ModelConfig:
  """The checkpoint's ModelConfig (its tensors checked from the headers) with
  `overrides` (ModelConfig fields) applied where they keep every shape."""
  base = interop.check_hf_checkpoint(path)
  overrides = dict(overrides or {})
  cfg = ModelConfig.from_dict(overrides, base=base)
  check_shapes_kept(base, cfg, path)
  return cfg


def finetune_configs(path: str, train_values: Mapping[str, Any],
                     model_overrides: Mapping[str, Any] | None = None):
  """(ModelConfig, TrainConfig) of a run fine-tuning the checkpoint in `path`:
  the model from the checkpoint (+ shape-keeping overrides), the train config
  from `train_values` with init_from_hf=path and, unless tokenizer_path is
  set, the checkpoint's tokenizer.json when it has one."""
  model_cfg = finetune_model_config(path, model_overrides)
  values = dict(train_values, init_from_hf=path)
  tokenizer = os.path.join(path, TOKENIZER_NAME)
  if not values.get("tokenizer_path") and os.path.isfile(tokenizer):
    values["tokenizer_path"] = tokenizer
  return model_cfg, TrainConfig.from_dict(values)


def init_state_from_hf(cfg: ModelConfig, train_cfg: TrainConfig, path: str, mesh=None,
                       rules: Rules | None = None) -> TrainState:
  """TrainState at step 0 holding the checkpoint's parameters and router
  biases (cast to cfg.param_dtype; variables cfg does not build, e.g. MTP
  with n_mtp_depth=0, are dropped) and a fresh optimizer state built from
  them, placed in the training shardings when a mesh is given."""
  check_shapes_kept(interop.check_hf_checkpoint(path), cfg, path)
  _, loaded = interop.load_hf_checkpoint(path, dtype=cfg.param_dtype, mesh=mesh, rules=rules)
  want = abstract_variables(cfg)
  flat = flatten(loaded)
  layout = state_layout(cfg, mesh, train_cfg.pipeline_schedule)
  sh = state_shardings(cfg, train_cfg, mesh, rules) if mesh is not None else None
  new = [k for k in flatten(want) if k not in flat]   # V3.2's indexers (check_shapes_kept)
  if new:
    placed = (flatten({"params": sh.params, "router_bias": sh.router_bias})
              if sh is not None and layout is None else {})
    flat.update(_fresh_leaves(cfg, new, train_cfg.seed, placed))
  kept = unflatten({k: flat.pop(k) for k in flatten(want)})
  del flat, loaded
  tx, _ = make_tx(train_cfg)

  kept.setdefault("router_bias", {})
  if layout is not None:     # a pipe mesh: each stage's blocks on its ranks (one copy)
    kept = jax.jit(partial(stage_tree, layout),
                   out_shardings={"params": sh.params, "router_bias": sh.router_bias})(kept)

  def fresh(params):
    return jnp.zeros((), jnp.int32), tx.init(params)
  if mesh is None:
    step, opt_state = jax.jit(fresh)(kept["params"])
  else:
    step, opt_state = jax.jit(fresh, out_shardings=(sh.step, sh.opt_state))(kept["params"])
  params, bias = kept["params"], kept["router_bias"]
  return TrainState(step=step, params=params, opt_state=opt_state, router_bias=bias)


def _fresh_leaves(cfg: ModelConfig, names: list[str], seed: int,
                  shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Leaves `names` of init_variables(cfg, key(seed)), the values a random
  start would give them, under one jit (XLA may drop the rest of the init), and
  placed in `shardings` where it names them."""
  def pick(rng):
    flat = flatten(init_variables(cfg, rng))
    return {k: flat[k] for k in names}
  if shardings:
    return jax.jit(pick, out_shardings={k: shardings[k] for k in names})(jax.random.key(seed))
  return jax.jit(pick)(jax.random.key(seed))
