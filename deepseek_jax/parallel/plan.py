"""Per-device memory of a training run on a mesh, from abstract shapes only.

Nothing is allocated and no devices are needed: the train state's shapes come
from `jax.eval_shape`, each leaf's sharding from the rule set, and a leaf
takes nbytes / (product of the mesh axes its spec uses) on every device.

  params    every parameter (param_dtype), as sharded by the rules
  grads     the same shapes and shardings as the parameters
  opt_state AdamW's two moments per parameter (same dtype and sharding) and
            its counters, as `optax` builds them
  activations (an estimate, with `remat_policy="full"`, the setting at this
            scale; t = tokens per device = batch * seq / (data*fsdp*expert)):
              layer inputs kept for the backward: n_layers * t * dim * b
            + one layer recomputed at a time, the largest of
                attention scores  (batch/dp) * (heads/tensor) * seq^2 * 4
                MoE exchange      2 * ep * C * dim * b   (send + receive buffers
                                  of C = expert.exchange_capacity(t*k, ep,
                                  moe_ep_capacity) rows per destination:
                                  ~2 t k at the default 2; a step skewed
                                  past it uses C = t*k, ep times that)
            + logits and their gradient  2 * t * (vocab/tensor) * 4 * (1 + D)
            with b the bytes of `dtype`, k the routed experts per token, ep the
            expert-parallel degree, D the MTP depth.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.expert import exchange_capacity
from deepseek_jax.parallel.rules import (BATCH_AXES, axes_size, check_divisible,
                                         logical_axes, mesh_axes_of, resolve, spec_for)


def _sharded_bytes(tree: Any, sizes: dict[str, int], rules) -> int:
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = logical_axes(path, leaf.ndim)
    spec = spec_for(names, rules, leaf.shape, sizes)
    check_divisible(jax.tree_util.keystr(path), leaf.shape, names, spec, sizes)
    split = math.prod(axes_size(sizes, entry) for entry in spec)
    total += int(np.prod(leaf.shape)) * leaf.dtype.itemsize // split
  return total


def memory_plan(cfg: ModelConfig, sizes: dict[str, int], rules: str, *, batch_size: int,
                seq_len: int, moments_dtype: str = "float32") -> dict[str, Any]:
  """Bytes per device of params, grads, optimizer state and activations.

  sizes: {axis: size} for all five mesh axes (MeshConfig.shape(n)).
  """
  from deepseek_jax.train.config import TrainConfig      # train imports parallel
  from deepseek_jax.train.step import abstract_train_state
  rule_set = resolve(rules)
  rows = axes_size(sizes, BATCH_AXES)
  if batch_size % rows:
    raise ValueError(f"batch_size={batch_size} must be a multiple of data*fsdp*expert={rows}.")
  state = abstract_train_state(cfg, TrainConfig(batch_size=batch_size, seq_len=seq_len,
                                                steps=1, warmup_steps=0,
                                                moments_dtype=moments_dtype))
  params = _sharded_bytes(state.params, sizes, rule_set)
  opt = _sharded_bytes(state.opt_state, sizes, rule_set)

  b = np.dtype(cfg.dtype).itemsize
  t = batch_size * seq_len // rows
  tensor = axes_size(sizes, mesh_axes_of("heads", rule_set))
  vocab_split = axes_size(sizes, mesh_axes_of("vocab", rule_set))
  ep = axes_size(sizes, mesh_axes_of("exp", rule_set))
  scores = (batch_size // rows) * max(cfg.n_heads // tensor, 1) * seq_len ** 2 * 4
  routed = t * cfg.n_activated_experts
  exchange = (2 * ep * exchange_capacity(routed, ep, cfg.moe_ep_capacity) * cfg.dim * b
              if cfg.n_moe_layers else 0)
  activations = (cfg.n_layers * t * cfg.dim * b + max(scores, exchange)
                 + 2 * t * (cfg.vocab_size // vocab_split) * 4 * (1 + cfg.n_mtp_depth))
  return {
      "devices": math.prod(sizes.values()),
      "mesh": dict(sizes), "rules": rules, "batch_size": batch_size, "seq_len": seq_len,
      "params_bytes_per_device": params,
      "grads_bytes_per_device": params,
      "opt_state_bytes_per_device": opt,
      "activation_bytes_per_device": int(activations),
  }
