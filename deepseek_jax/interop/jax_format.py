"""The project's own checkpoint format: model_config.json + variables.safetensors.

A directory with `model_config.json` (ModelConfig.to_dict) and one
`variables.safetensors` keyed by flattened paths like
`params/moe_layers/ffn/w1`: our variables exactly as they are (every dtype,
the router bias included, no key map), for moving a model between tools
without the HF layout's transposes. launch/convert.py reads and writes it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import safetensors

from deepseek_jax.config import ModelConfig
from deepseek_jax.files import atomic_json, atomic_write
from deepseek_jax.interop.safetensors_io import corrupt_error, unflatten, write_safetensors
from deepseek_jax.interop.variables import check_shapes, check_variables

JAX_CONFIG_NAME = "model_config.json"
JAX_VARIABLES_NAME = "variables.safetensors"


def save_jax_variables(cfg: ModelConfig, variables: Mapping[str, Any], directory: str) -> None:
  """Writes `model_config.json` + `variables.safetensors` (flattened paths)."""
  flat = check_variables(cfg, variables)
  os.makedirs(directory, exist_ok=True)
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
  atomic_write(os.path.join(directory, JAX_VARIABLES_NAME),
               lambda tmp: write_safetensors(tensors, tmp, {"format": "deepseek_jax"}))
  atomic_json(cfg.to_dict(), os.path.join(directory, JAX_CONFIG_NAME))


def load_jax_variables(directory: str) -> tuple[ModelConfig, dict]:
  """Reads what `save_jax_variables` wrote: (cfg, variables)."""
  config_path = os.path.join(directory, JAX_CONFIG_NAME)
  weights_path = os.path.join(directory, JAX_VARIABLES_NAME)
  for p in (config_path, weights_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: a deepseek_jax checkpoint directory holds "
                              f"{JAX_CONFIG_NAME} and {JAX_VARIABLES_NAME}.")
  cfg = ModelConfig.from_json(config_path)
  try:
    with safetensors.safe_open(weights_path, framework="numpy") as f:
      shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
      check_shapes(cfg, shapes, weights_path)
      flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise corrupt_error(weights_path, e) from None
  return cfg, unflatten(flat)
